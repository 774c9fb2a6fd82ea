"""SMTP replies: the `Reply` value (code, RFC 3463 enhanced code, text lines) and the named catalogue of every
reply the protocol core emits, worded like IIS and Postfix.

Code elsewhere picks a constant from here instead of writing reply strings inline (aiosmtpd's statuscodes
idea), so one grep finds every wording and tests compare against the same objects. Replies that embed a value
are functions with upper-case names, so they read like the constants around them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3463 §2: class "." subject "." detail; class 2, 4 or 5; subject and detail 1 to 3 digits.
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# (code, enhanced) pairs that passed Reply._check_codes. Bounded: the client side builds Replies from what
# remote servers send, so a hostile one must not grow it without end (past the bound, pairs are just checked
# every time).
_CHECKED: set[tuple[int, str]] = set()
_CHECKED_MAX = 1024


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. `enhanced` is "" when the reply carries no RFC 3463 code (banner, EHLO, 354)."""

    code: int
    enhanced: str
    text: str
    more: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Validated on construction (h11 habit): a bad Reply fails where it is made, not when written out.
        code, enhanced = self.code, self.enhanced
        # Speed: a session builds several Replies, so a (code, enhanced) pair is checked once, then found in
        # _CHECKED. Exact types only: a float 250.0 equals (and hashes as) 250 but must still be refused.
        if type(code) is not int or type(enhanced) is not str or (code, enhanced) not in _CHECKED:
            self._check_codes()
        text, more = self.text, self.more
        if more == ():  # speed: the usual one-line reply, without building a tuple of lines
            if "\r" in text or "\n" in text:
                raise ValueError(f"CR or LF inside reply text: {text!r}")
            return
        for line in (text, *more):
            if "\r" in line or "\n" in line:
                raise ValueError(f"CR or LF inside reply text: {line!r}")

    def _check_codes(self) -> None:
        if not isinstance(self.code, int) or not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range 200..599: {self.code!r}")
        if self.enhanced:
            if not _ENHANCED.fullmatch(self.enhanced):
                raise ValueError(f"malformed enhanced status code: {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced} does not match the class of {self.code}")
        if type(self.code) is int and type(self.enhanced) is str and len(_CHECKED) < _CHECKED_MAX:
            _CHECKED.add((self.code, self.enhanced))

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text, *self.more)

    def _render(self, enhanced_codes: bool) -> list[str]:
        prefix = f"{self.enhanced} " if self.enhanced and enhanced_codes else ""
        lines = self.lines
        last = len(lines) - 1
        # RFC 5321 §4.2.1: every line but the last uses "-" after the code; the enhanced code repeats on
        # every line (RFC 2034 §4).
        return [f"{self.code}{'-' if i < last else ' '}{prefix}{line}" for i, line in enumerate(lines)]

    def to_bytes(self, enhanced_codes: bool = True) -> bytes:
        """The reply as written on the wire, CRLF after every line."""
        # Text is UTF-8: an SMTPUTF8 address may be echoed back (RFC 6531 §3.7.4.2 allows it).
        # The same lines as _render(), built directly (speed: this runs for every reply of every session).
        prefix = f"{self.enhanced} " if self.enhanced and enhanced_codes else ""
        if not self.more:
            return f"{self.code} {prefix}{self.text}\r\n".encode()
        *first, last = self.lines
        head = "".join([f"{self.code}-{prefix}{line}\r\n" for line in first])
        return f"{head}{self.code} {prefix}{last}\r\n".encode()

    def __str__(self) -> str:
        return "\n".join(self._render(True))

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600


# --- Positive ---------------------------------------------------------------------------------------------

OK = Reply(250, "2.0.0", "OK")
RESET = Reply(250, "2.0.0", "Resetting")
START_DATA = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")
VRFY_CANNOT = Reply(252, "2.1.5", "Cannot VRFY user, but will accept message and attempt delivery")
HELP_REPLY = Reply(
    214,
    "2.0.0",
    "Commands:",
    (
        "HELO EHLO MAIL RCPT DATA",
        "RSET NOOP QUIT HELP VRFY EXPN",
        "End of HELP info",
    ),
)


READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
XEXCH50_GO = Reply(354, "", "Send binary data")
LOGIN_USERNAME = Reply(334, "", "VXNlcm5hbWU6")  # AUTH LOGIN: base64 "Username:"
LOGIN_PASSWORD = Reply(334, "", "UGFzc3dvcmQ6")  # AUTH LOGIN: base64 "Password:"


def AUTH_CHALLENGE(challenge: str = "") -> Reply:
    """334 with a base64 server challenge ("" for the empty challenge, e.g. AUTH PLAIN without initial
    response, RFC 4954 §4)."""
    return Reply(334, "", challenge)


def BDAT_OK(octets: int) -> Reply:
    """250 to a BDAT chunk that is not the last one (RFC 3030)."""
    return Reply(250, "2.0.0", f"{octets} octets received")


def ETRN_OK(node: str) -> Reply:
    """RFC 1985: 250 "OK, queuing for node <x> started"."""
    return Reply(250, "2.0.0", f"Queuing for node {node} started")


def ETRN_NOTHING(node: str) -> Reply:
    """RFC 1985: 251 "OK, no messages waiting for node <x>"."""
    return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")


def GREETING(host: str) -> Reply:
    """The 220 banner (no enhanced code: RFC 2034 codes start after EHLO)."""
    return Reply(220, "", f"{host} smtpsvc ESMTP ready")


def HELO_REPLY(host: str, client: str) -> Reply:
    """250 to HELO: `<host> Hello [<client>]` (IIS wording)."""
    return Reply(250, "", f"{host} Hello [{client}]")


def EHLO_REPLY(host: str, client: str, keywords: list[str] | tuple[str, ...]) -> Reply:
    """250 to EHLO: greeting line, then one keyword per line (from ServerConnection.ehlo_keywords())."""
    return Reply(250, "", f"{host} Hello [{client}]", tuple(keywords))


def SENDER_OK(address: str) -> Reply:
    return Reply(250, "2.1.0", f"<{address}>....Sender OK")


def RCPT_OK(address: str) -> Reply:
    return Reply(250, "2.1.5", f"<{address}>")


def QUEUED(message_id: str) -> Reply:
    return Reply(250, "2.6.0", f"<{message_id}> Queued mail for delivery")


def QUIT_REPLY(host: str) -> Reply:
    return Reply(221, "2.0.0", f"{host} Service closing transmission channel")


# --- Transient (4xx) --------------------------------------------------------------------------------------

SERVICE_CLOSING_TIMEOUT = Reply(421, "4.4.2", "Timeout waiting for client input, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors")
TEMP_FAILURE = Reply(451, "4.3.0", "Temporary failure, please try again later")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")  # RFC 3207 §4
AUTH_TEMP_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")  # RFC 4954 §6
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many authentication failures")


def ETRN_UNKNOWN(node: str) -> Reply:
    """RFC 1985: 458 "Unable to queue messages for node <x>"."""
    return Reply(458, "4.0.0", f"Unable to queue messages for node {node}")


def ETRN_NOT_ALLOWED(node: str) -> Reply:
    """RFC 1985: 459 "Node <x> not allowed"."""
    return Reply(459, "4.0.0", f"Node {node} not allowed")


# --- Permanent (5xx) --------------------------------------------------------------------------------------

UNRECOGNIZED = Reply(500, "5.5.1", "Unrecognized command")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BAD_CHARS = Reply(500, "5.5.2", "Invalid character in command")
SYNTAX = Reply(501, "5.5.2", "Syntax error in parameters or arguments")
PARAM_SYNTAX = Reply(501, "5.5.4", "Invalid command arguments")
BAD_ADDRESS = Reply(501, "5.1.3", "Invalid address")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Send hello first")
NEED_MAIL = Reply(503, "5.5.1", "Need mail command")
NEED_RCPT = Reply(503, "5.5.1", "Need rcpt command")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NO_SERVICE = Reply(503, "5.5.1", "No SMTP service here, send QUIT")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
NO_VALID_RCPT = Reply(554, "5.5.1", "No valid recipients")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops")
PARAM_UNKNOWN = Reply(555, "5.5.4", "Unsupported parameter")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 §4
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")  # RFC 4954 §4
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")  # the client sent "*" (RFC 4954 §4)
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode response")  # not base64, or not what the mech wants
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
BINARYMIME_NEEDS_BDAT = Reply(503, "5.5.1", "BINARYMIME requires BDAT")  # RFC 3030
NEED_AUTH_XEXCH50 = Reply(504, "5.7.4", "Need to authenticate first")  # SPEC 2.5 (IIS event 7010)
# X-LINK2STATE from an authenticated peer: acknowledged so an Exchange peer carries on, never used (SPEC 2.5)
LINK2STATE_IGNORED = Reply(250, "2.0.0", "X-LINK2STATE ignored: link state is not used by this server")


def RELAY_DENIED(address: str) -> Reply:
    return Reply(550, "5.7.1", f"Unable to relay for <{address}>")
