"""ESMTP parameters of MAIL and RCPT (RFC 5321 §4.1.2 esmtp-param): splitting, checking against what we
advertise (SIZE, BODY (incl. BINARYMIME), SMTPUTF8, RET, ENVID; NOTIFY, ORCPT), and RFC 3461 xtext encoding.

The check functions return the reply to refuse with, or None: the server turns it into a Rejected event.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from . import replies
from .replies import Reply

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")  # esmtp-value: any printable ASCII except "="
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")  # RFC 3461 §4: xchar / hexchar
_ADDR_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # RFC 3461 §4.4


class ParamError(ValueError):
    """A parameter list that cannot be parsed; `reply` says how to refuse it."""

    def __init__(self, message: str, reply: Reply) -> None:
        super().__init__(message)
        self.reply = reply


def parse_params(text: str) -> dict[str, str | None]:
    """`"SIZE=123 BODY=8bitmime SMTPUTF8"` → {"SIZE": "123", "BODY": "8bitmime", "SMTPUTF8": None}.

    Keys are upper-cased (keywords are case-insensitive), values keep their case. Raises ParamError (501) on
    malformed or repeated parameters."""
    params: dict[str, str | None] = {}
    for word in text.split(" "):
        if not word:  # tolerate runs of spaces, as most servers do
            continue
        key, eq, value = word.partition("=")
        if not _KEYWORD.fullmatch(key) or (eq and not _VALUE.fullmatch(value)):
            raise ParamError(f"malformed parameter {word!r}", replies.PARAM_SYNTAX)
        key = key.upper()
        if key in params:
            raise ParamError(f"parameter {key} given twice", replies.PARAM_SYNTAX)
        params[key] = value if eq else None
    return params


def is_xtext(text: str) -> bool:
    return _XTEXT.fullmatch(text) is not None


def xtext_encode(text: str) -> str:
    """RFC 3461 §4 xtext: "+", "=", and octets outside 33..126 become "+HH" (UTF-8 octets for non-ASCII)."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(text: str) -> str:
    """Inverse of xtext_encode. Raises ValueError on malformed xtext."""
    if not is_xtext(text):
        raise ValueError(f"malformed xtext: {text!r}")
    raw = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    return raw.encode("latin-1").decode("utf-8", "replace")


def check_mail_params(
    params: Mapping[str, str | None],
    *,
    esmtp: bool,
    max_message_size: int,
    eightbitmime: bool,
    smtputf8: bool,
    dsn: bool,
    binarymime: bool = False,
) -> Reply | None:
    """Validate MAIL FROM parameters against what was advertised. None when all are acceptable.

    `binarymime`: BODY=BINARYMIME is in force (RFC 3030 §3: only together with CHUNKING)."""
    for key, value in params.items():
        # RFC 1869 §6: after HELO (not EHLO) no service extension is in force, so no parameter is.
        if not esmtp:
            return replies.PARAM_UNKNOWN
        if key == "SIZE":
            if value is None or not value.isdigit() or not value.isascii():
                return replies.PARAM_SYNTAX
            # RFC 1870 §6.1: refuse at MAIL when the announced size is already over the limit.
            if max_message_size and int(value) > max_message_size:
                return replies.TOO_BIG
        elif key == "BODY":
            if value is None:
                return replies.PARAM_SYNTAX
            allowed = {"7BIT", "8BITMIME"} if eightbitmime else {"7BIT"}
            if binarymime:
                allowed.add("BINARYMIME")
            if value.upper() not in allowed:
                return replies.PARAM_UNKNOWN
        elif key == "SMTPUTF8" and smtputf8:
            if value is not None:
                return replies.PARAM_SYNTAX
        elif key == "RET" and dsn:
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return replies.PARAM_SYNTAX
        elif key == "ENVID" and dsn:
            if value is None or len(value) > MAX_ENVID or not is_xtext(value):
                return replies.PARAM_SYNTAX
        else:
            return replies.PARAM_UNKNOWN
    return None


def _valid_notify(value: str) -> bool:
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return True
    return len(set(words)) == len(words) and all(w in _NOTIFY_WORDS for w in words)


def _valid_orcpt(value: str) -> bool:
    # RFC 3461 §4.2: addr-type ";" xtext (RFC 6533 utf-8-addr-xtext is xtext-shaped too).
    addr_type, semi, rest = value.partition(";")
    return bool(semi) and bool(rest) and _ADDR_TYPE.fullmatch(addr_type) is not None and is_xtext(rest)


def check_rcpt_params(params: Mapping[str, str | None], *, esmtp: bool, dsn: bool) -> Reply | None:
    """Validate RCPT TO parameters (only the RFC 3461 DSN ones exist so far)."""
    for key, value in params.items():
        if not esmtp or not dsn or key not in ("NOTIFY", "ORCPT"):
            return replies.PARAM_UNKNOWN
        if value is None:
            return replies.PARAM_SYNTAX
        if key == "NOTIFY" and not _valid_notify(value):
            return replies.PARAM_SYNTAX
        if key == "ORCPT" and not _valid_orcpt(value):
            return replies.PARAM_SYNTAX
    return None


def format_params(params: Mapping[str, str | None] | Iterable[tuple[str, str | None]]) -> str:
    """Client side: " KEY=value KEY2" (leading space included; "" when empty). Raises ValueError on a
    keyword or value that would not survive the wire."""
    items = params.items() if isinstance(params, Mapping) else params
    out = []
    for key, value in items:
        if not _KEYWORD.fullmatch(key):
            raise ValueError(f"bad ESMTP keyword: {key!r}")
        if value is None:
            out.append(f" {key}")
        elif _VALUE.fullmatch(value):
            out.append(f" {key}={value}")
        else:
            raise ValueError(f"bad ESMTP value for {key}: {value!r} (xtext-encode it)")
    return "".join(out)
