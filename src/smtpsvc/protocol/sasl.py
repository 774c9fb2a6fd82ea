"""SASL helpers for SMTP AUTH (RFC 4954) with the PLAIN (RFC 4616) and LOGIN mechanisms, and on the client
side the bearer-token mechanisms XOAUTH2 (Google's and Microsoft's) and OAUTHBEARER (RFC 7628): pure
functions, no state. The server core only frames the exchange (`Auth`, `AuthResponse` events); the
application decodes the responses with these and checks the credentials.

AUTH LOGIN (draft-murchison-sasl-login): the server sends `LOGIN_USERNAME_CHALLENGE`, the client answers with
the base64 user name, then `LOGIN_PASSWORD_CHALLENGE` and the base64 password; a client may also give the user
name as the initial response. Decode each answer with `decode_login`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Final

LOGIN_USERNAME_CHALLENGE: Final = "VXNlcm5hbWU6"  # base64 of "Username:"
LOGIN_PASSWORD_CHALLENGE: Final = "UGFzc3dvcmQ6"  # base64 of "Password:"
CANCEL: Final = "*"  # the client's response that cancels the exchange (RFC 4954 §4)
# After a bearer mechanism's error challenge (334 + base64 JSON) the client answers, and the server then sends
# its final failure: XOAUTH2 takes an empty line, OAUTHBEARER a single ^A (RFC 7628 §3.2.3), base64 "AQ==".
XOAUTH2_ERROR_ANSWER: Final = ""
OAUTHBEARER_ERROR_ANSWER: Final = "AQ=="

# RFC 6750 §2.1 b64token: what a bearer token may be made of.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 4648 §4 base64 with its padding, nothing else (no whitespace, no URL-safe alphabet).
_BASE64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


class SaslError(ValueError):
    """A response that cannot be decoded; answer `replies.AUTH_BAD_RESPONSE` (501 5.5.2)."""


def b64decode_strict(text: str) -> bytes:
    """Strict RFC 4648 base64 → bytes ("" → b""). Raises SaslError on anything else (stray characters,
    whitespace, missing or misplaced padding)."""
    if not _BASE64.fullmatch(text):
        raise SaslError("malformed base64")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern already excludes these
        raise SaslError("malformed base64") from None


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError(f"{what} is not UTF-8") from None


def decode_plain(b64: str) -> tuple[str, str, str]:
    """An AUTH PLAIN response → (authzid, authcid, password); authzid is "" when the client gave none.

    RFC 4616 §2: `[authzid] NUL authcid NUL passwd`, UTF-8, authcid and passwd not empty. Raises SaslError
    otherwise (never with the credentials in the message)."""
    parts = b64decode_strict(b64).split(b"\0")
    if len(parts) != 3:
        raise SaslError("PLAIN response needs exactly two NUL separators")
    authzid, authcid, password = (_utf8(p, "PLAIN response") for p in parts)
    if not authcid or not password:
        raise SaslError("PLAIN response with an empty user name or password")
    return authzid, authcid, password


def decode_login(b64: str) -> str:
    """One AUTH LOGIN response (the user name or the password) → text. Raises SaslError on bad base64,
    non-UTF-8 or a NUL inside."""
    text = _utf8(b64decode_strict(b64), "LOGIN response")
    if "\0" in text:
        raise SaslError("NUL in LOGIN response")
    return text


def encode_plain(user: str, password: str, authzid: str = "") -> str:
    """Client side: the base64 AUTH PLAIN response for `user`/`password` (RFC 4616)."""
    if any("\0" in part for part in (user, password, authzid)):
        raise ValueError("NUL in a PLAIN credential")
    if not user or not password:
        raise ValueError("PLAIN needs a user name and a password")
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode("ascii")


def encode_login(text: str) -> str:
    """Client side: one AUTH LOGIN response (user name or password) as base64."""
    if "\0" in text:
        raise ValueError("NUL in a LOGIN credential")
    return base64.b64encode(text.encode()).decode("ascii")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _check_bearer(user: str, token: str) -> None:
    if not _B64TOKEN.fullmatch(token):
        raise ValueError("the token is not an RFC 6750 bearer token")  # never the token itself
    if not user or any(c in user for c in "\x01\0\r\n"):
        raise ValueError("a bearer login needs a user name without control characters")


def encode_xoauth2(user: str, token: str) -> str:
    """Client side: the XOAUTH2 initial response, base64 of `user=U ^A auth=Bearer T ^A ^A`."""
    _check_bearer(user, token)
    return _b64(f"user={user}\x01auth=Bearer {token}\x01\x01")


def _saslname(text: str) -> str:
    """RFC 5801 §4: "," and "=" in a GS2 authzid are written "=2C" and "=3D"."""
    return text.replace("=", "=3D").replace(",", "=2C")


def encode_oauthbearer(user: str, token: str, host: str, port: int) -> str:
    """Client side: the OAUTHBEARER initial response (RFC 7628 §3.1): the GS2 header `n,a=U,` then
    `^A host=H ^A port=P ^A auth=Bearer T ^A ^A`, base64."""
    _check_bearer(user, token)
    if not host or any(c in host for c in "\x01\0\r\n"):
        raise ValueError("OAUTHBEARER needs the server's host name")
    return _b64(f"n,a={_saslname(user)},\x01host={host}\x01port={port}\x01auth=Bearer {token}\x01\x01")


@dataclass(frozen=True, slots=True)
class BearerError:
    """The server's error challenge to a bearer token (RFC 7628 §3.2.2; Google's and Microsoft's XOAUTH2
    send the same JSON): `status` "401" (invalid or expired token) "400" or "403" (the scope is not enough),
    the `scope` it wants. Nothing secret: it is safe in a transcript."""

    status: str
    scope: str = ""
    schemes: str = ""

    def describe(self) -> str:
        scope = f", scope {self.scope}" if self.scope else ""
        return f"the server refused the token (status {self.status or '?'}{scope})"


def decode_bearer_error(challenge: str) -> BearerError:
    """A 334 challenge after a bearer initial response → its error. Raises SaslError when it is not the
    base64 JSON object the RFC describes (the caller still answers it, and reads the final reply)."""
    try:
        data = json.loads(b64decode_strict(challenge.strip()))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors, SaslError too
        raise SaslError("the challenge is not base64 JSON") from None
    if not isinstance(data, dict):
        raise SaslError("the challenge is not a JSON object")
    return BearerError(
        status=str(data.get("status", "")),
        scope=str(data.get("scope", "")),
        schemes=str(data.get("schemes", "")),
    )
