"""RFC 5321 §4.1.2 Path / Mailbox parsing (plus RFC 6531 UTF-8 addresses), shared by server and client.

`parse_path("<@a,@b:user@example.com>")` → `ParsedPath("user@example.com", "@a,@b:")`. Addresses keep the case
and quoting the peer used; only syntax is checked here, never policy (relay tricks are only *detected*).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

# RFC 5321 §4.5.3.1: size limits, in octets.
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256  # including the angle brackets and the source route
_MAX_LABEL = 63  # RFC 1035 §2.3.4

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = "\u0080-\U0010ffff"  # RFC 6531 §3.3: UTF8-non-ascii is allowed in atext, qtext and sub-domains

_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# qtextSMTP is %d32-33 / %d35-91 / %d93-126; quoted-pairSMTP is "\" %d32-126.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
# The same with UTF8-non-ascii (SMTPUTF8), compiled at their first use (`_utf8`): a character class up to
# U+10FFFF takes about 20 ms to compile, which every process's start (each SMTP worker's) would pay for a
# path that few transactions take.
_UTF8_PATTERNS = {
    "dot-string": rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*",
    "quoted": rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"',
    "label": rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9{_UTF8}-]*[A-Za-z0-9{_UTF8}])?",
}
# An ASCII label: LDH, not starting or ending with "-", at most _MAX_LABEL (63) characters, which are octets.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A whole ASCII domain in one match (speed: no split, no match per label).
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# General-address-literal = Standardized-tag ":" 1*dcontent; dcontent = %d33-90 / %d94-126.
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}")


@functools.cache
def _utf8(kind: str) -> re.Pattern[str]:
    return re.compile(_UTF8_PATTERNS[kind])


class AddressError(ValueError):
    """The text is not a valid RFC 5321 path or mailbox."""


@dataclass(frozen=True, slots=True)
class ParsedPath:
    address: str  # "local@domain" as written (quoted local part kept quoted); "" for the null path <>
    source_route: str = ""  # "@a,@b:" when the path had an RFC 5321 A-d-l, else ""


def _octets(text: str) -> int:
    # Speed: an ASCII text (nearly every one) has as many octets as characters, without encoding it.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def is_valid_domain(domain: str, utf8: bool = False) -> bool:
    """RFC 5321 Domain (dot-separated LDH labels; U-labels too when `utf8`); no trailing dot."""
    if not utf8 or domain.isascii():
        # The rules below in one regex: in ASCII, the UTF-8 label matches what _LABEL does and octets are
        # characters. A domain that is not ASCII fails _DOMAIN, as it must without `utf8`.
        return len(domain) <= MAX_DOMAIN and _DOMAIN.fullmatch(domain) is not None
    if _octets(domain) > MAX_DOMAIN:
        return False
    label = _utf8("label")
    return all(label.fullmatch(part) and _octets(part) <= _MAX_LABEL for part in domain.split("."))


def is_valid_address_literal(literal: str) -> bool:
    """RFC 5321 address-literal including its brackets: [1.2.3.4], [IPv6:...], [tag:content]."""
    if len(literal) < 3 or literal[0] != "[" or literal[-1] != "]":
        return False
    inner = literal[1:-1]
    if _IPV4.fullmatch(inner):
        try:
            ipaddress.IPv4Address(inner)
        except ValueError:
            return False
        return True
    if inner[:5].lower() == "ipv6:":
        text = inner[5:]
        # ipaddress accepts "%scope" suffixes, which RFC 5321 does not.
        if "%" in text:
            return False
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            return False
        return True
    return _GENERAL_LITERAL.fullmatch(inner) is not None


def _check_domain_part(domain: str, utf8: bool) -> None:
    if domain.startswith("["):
        if not is_valid_address_literal(domain):
            raise AddressError(f"invalid address literal: {domain!r}")
    elif not is_valid_domain(domain, utf8):
        raise AddressError(f"invalid domain: {domain!r}")


def _split_mailbox(mailbox: str, utf8: bool) -> tuple[str, str]:
    """Split and validate `Local-part "@" (Domain / address-literal)`."""
    if mailbox.startswith('"'):
        m = (_utf8("quoted") if utf8 else _QUOTED).match(mailbox)
        if m is None:
            raise AddressError("unterminated or invalid quoted local part")
        local, rest = m.group(), mailbox[m.end() :]
        if not rest.startswith("@"):
            raise AddressError("missing @domain after the local part")
        domain = rest[1:]
    else:
        local, at, domain = mailbox.partition("@")
        if not at:
            raise AddressError("missing @domain")
        if not (_utf8("dot-string") if utf8 else _DOT_STRING).fullmatch(local):
            raise AddressError(f"invalid local part: {local!r}")
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    _check_domain_part(domain, utf8)
    return local, domain


def _check_source_route(route: str) -> None:
    """`@a,@b` (without the colon): A-d-l = At-domain *( "," At-domain )."""
    for at_domain in route.split(","):
        if not at_domain.startswith("@") or not is_valid_domain(at_domain[1:]):
            raise AddressError(f"invalid source route: {route!r}")


def parse_path(
    text: str, allow_null: bool = False, *, utf8: bool = False, allow_postmaster: bool = False
) -> ParsedPath:
    """Parse an RFC 5321 Path such as `<user@example.com>` (angle brackets optional, as Postfix and IIS
    accept them missing). `allow_null` accepts `<>` (reverse-path); `allow_postmaster` accepts the bare
    `<postmaster>` (forward-path, RFC 5321 §4.5.1); `utf8` allows RFC 6531 addresses (MAIL ... SMTPUTF8).
    Raises AddressError."""
    if text.startswith("<"):
        if len(text) < 2 or not text.endswith(">"):
            raise AddressError("unbalanced angle brackets")
        inner = text[1:-1]
    else:
        inner = text
    if _octets(inner) + 2 > MAX_PATH:
        raise AddressError("path longer than 256 octets")
    if inner == "":
        if allow_null and text == "<>":
            return ParsedPath("", "")
        raise AddressError("empty path")
    route = ""
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("source route without ':'")
        _check_source_route(inner[:colon])
        route, inner = inner[: colon + 1], inner[colon + 1 :]
    if allow_postmaster and not route and inner.lower() == "postmaster":
        return ParsedPath(inner, "")
    local, domain = _split_mailbox(inner, utf8)
    return ParsedPath(f"{local}@{domain}", route)


def path_end(text: str) -> int:
    """Length of the path at the start of `text` (a MAIL/RCPT argument after the colon): up to and including
    the `>` that closes it, skipping `>` inside a quoted local part; for a path without brackets, up to the
    first space. Raises AddressError when a `<` is never closed."""
    if not text.startswith("<"):
        space = text.find(" ")
        return len(text) if space < 0 else space
    close = text.find(">")
    if close >= 0 and '"' not in text[:close]:
        return close + 1  # speed: no quoted part before the first ">", so the loop below would stop there
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i + 1
    raise AddressError("unbalanced angle brackets")


def split_address(address: str) -> tuple[str, str]:
    """("local", "domain") at the last "@" (a quoted local part may hold "@"); ("postmaster", "") and ("", "")
    for addresses without a domain."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def local_part_is_relay_trick(local: str) -> bool:
    """True when the local part could route mail onwards by itself: `%` hack, `!` bang path, or an `@`
    inside a quoted local part (`"a@b"@c`). IIS accepted these and relayed; we refuse them up front."""
    return "%" in local or "!" in local or (local.startswith('"') and "@" in local)


def is_postmaster(address: str) -> bool:
    """The bare `postmaster` recipient every server must accept (RFC 5321 §4.5.1), any case."""
    return address.lower() == "postmaster"
