"""ServerConnection: the receiving side of SMTP as a sans-I/O state machine (h11 style).

The application feeds bytes in (`receive_data`), takes events out (`next_event`) and answers each event that
needs a reply with `send(reply)`, which returns the bytes to write. The core owns the protocol rules: command
syntax, sequencing (503s from the TRANSITIONS table below), ESMTP parameters, line and size limits, PIPELINING
buffering and DATA dot-unstuffing. The application owns policy (relay, quotas, spooling, timeouts).

The core also frames what is not a command line: BDAT chunks (RFC 3030) and the XEXCH50 blob are read as exact
octet counts, the lines after a 334 to AUTH (RFC 4954) become `AuthResponse` events, and after a 220 to
STARTTLS (RFC 3207) every byte is discarded until the application, having done the handshake, calls
`tls_established()`. The application owns the TLS handshake and the credential check (`sasl` decodes).

A refused BDAT (out of sequence, 530, bad syntax after a valid size) still has its octets drained before the
refusal is given, so they are never read as commands. When the size cannot be trusted (CHUNKING off: 502;
no valid size: 501; an over-long or garbled BDAT line) the refusal has `close=True` instead.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from . import replies
from .address import AddressError, is_valid_domain, parse_path, path_end
from .dotstuff import DotUnstuffer
from .errors import LocalProtocolError
from .events import (
    NEED_DATA,
    Auth,
    AuthResponse,
    Bdat,
    BdatEnd,
    ConnectionClosed,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
    Etrn,
    Event,
    Expn,
    Helo,
    Help,
    Mail,
    NeedData,
    Noop,
    Quit,
    Rcpt,
    Rejected,
    Rset,
    StartTls,
    Vrfy,
    Xexch50,
    Xexch50Blob,
    XLink2State,
)
from .params import ParamError, check_mail_params, check_rcpt_params, parse_params
from .replies import Reply

# RFC 5321 §4.5.3.1.4 caps a command line at 512 octets but lets extensions raise it, and RFC 1869 §4.1.2 (its
# successor RFC 5321 §4.1.2 esmtp-param) lets each MAIL/RCPT parameter extension lengthen those two commands:
# SIZE, BODY, RET, ENVID (100 octets of xtext), NOTIFY and ORCPT (up to 500) together. 500 extra octets cover
# them, as Postfix and Exim allow.
PARAMS_ALLOWANCE: Final = 500

_SASL_MECH = re.compile(r"[A-Z0-9_-]{1,20}")  # RFC 4422 §3.1 mechanism names (upper-case)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    max_command_line: int = 512  # octets incl. CRLF; MAIL and RCPT get PARAMS_ALLOWANCE more
    max_text_line: int = 1000  # DATA line limit incl. CRLF (RFC 5321 §4.5.3.1.6); 0 = unlimited
    max_message_size: int = 0  # 0 = unlimited; counted on the unstuffed message octets (BDAT: raw octets)
    max_recipients: int = 100  # 0 = unlimited
    pipelining: bool = True  # only advertised: pipelined input is always buffered and handled in order
    eightbitmime: bool = True
    smtputf8: bool = True  # in force only together with eightbitmime (RFC 6531 §3.1 requires 8BITMIME)
    dsn: bool = True
    enhanced_status_codes: bool = True
    starttls: bool = False  # a certificate is configured: STARTTLS is offered (until TLS is active)
    require_tls: bool = False  # mail commands, AUTH, ETRN, VRFY, EXPN, XEXCH50 get 530 until TLS is active
    auth_mechanisms: tuple[str, ...] = ()  # SASL mechanisms offered, e.g. ("PLAIN", "LOGIN"); () = no AUTH
    auth_requires_tls: bool = True  # AUTH only inside TLS (538 5.7.11 otherwise) ...
    auth_plaintext_allowed: bool = False  # ... unless this is set (the application does so for loopback)
    chunking: bool = False  # CHUNKING: BDAT (RFC 3030)
    binarymime: bool = False  # BINARYMIME: BODY=BINARYMIME; in force only together with chunking
    etrn: bool = False  # ETRN (RFC 1985)
    vrfy: bool = False  # only advertises VRFY: the application answers Vrfy events either way
    xexch50: bool = False  # XEXCH50 (SPEC 2.5); advertised to all, as by Exchange; usable after AUTH
    xexch50_max: int = 1_048_576  # the largest XEXCH50 blob accepted, octets
    x_link2state: bool = False  # X-LINK2STATE advertised and parsed (504 before AUTH, 250 after)
    max_auth_line: int = 12288  # octets incl. CRLF of an AUTH command and of each AUTH response (RFC 4954 §4)

    def __post_init__(self) -> None:
        if self.max_command_line < 16:
            raise ValueError("max_command_line must be at least 16 octets")
        for name in ("max_text_line", "max_message_size", "max_recipients"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.xexch50_max < 1:
            raise ValueError("xexch50_max must be at least 1 octet")
        if self.max_auth_line < 16:
            raise ValueError("max_auth_line must be at least 16 octets")
        mechanisms = tuple(m.upper() for m in self.auth_mechanisms)
        for mechanism in mechanisms:
            if not _SASL_MECH.fullmatch(mechanism):
                raise ValueError(f"not a SASL mechanism name: {mechanism!r}")
        object.__setattr__(self, "auth_mechanisms", mechanisms)  # frozen: normalise once, here

    @property
    def smtputf8_in_force(self) -> bool:
        return self.smtputf8 and self.eightbitmime

    @property
    def binarymime_in_force(self) -> bool:
        return self.binarymime and self.chunking  # RFC 3030 §3: BINARYMIME only with CHUNKING


class ServerState(enum.Enum):
    GREETING = "GREETING"  # connected; greeting() not called yet
    READY = "READY"  # banner sent, no HELO/EHLO accepted yet
    GREETED = "GREETED"  # HELO/EHLO accepted, no mail transaction
    MAIL = "MAIL"  # MAIL accepted, no RCPT accepted yet
    RCPT = "RCPT"  # at least one RCPT accepted
    DATA = "DATA"  # 354 sent: receiving message content
    CHUNKING = "CHUNKING"  # a BDAT chunk of the message answered, not the LAST one yet
    BDAT = "BDAT"  # reading the octets of a BDAT chunk (no reply owed until its BdatEnd)
    XEXCH50 = "XEXCH50"  # 354 sent to XEXCH50: reading the blob
    AUTH = "AUTH"  # 334 sent: the next line is a SASL response, not a command
    TLS = "TLS"  # 220 sent to STARTTLS: input is discarded until tls_established()
    REFUSED = "REFUSED"  # banner was 554: only QUIT is allowed (RFC 5321 §3.1)
    CLOSED = "CLOSED"  # QUIT answered, 421 sent, or EOF: input is ignored

    # Speed: Enum.__hash__ is a Python function (hash of the name), run for every TRANSITIONS lookup. Members
    # are singletons that compare by identity, so the identity hash is equivalent, and runs in C.
    __hash__ = object.__hash__


S = ServerState

# A transition key: an event type, or an event type refined by a tag when the event's fields decide the
# target (BdatEnd of the LAST chunk ends the transaction, of another chunk does not).
TransitionKey = type[Event] | tuple[type[Event], str]
LAST: Final = "LAST"

# The whole command sequencing of SMTP, as data (h11's EVENT_TRIGGERED_TRANSITIONS): in each state, the
# events that are in sequence and the state an *accepting* reply moves to (see ACCEPTED_BY). An event missing
# from a state's row is out of sequence: the core rejects it with SEQUENCE_ERRORS. Other replies leave the
# state as it is, except that any 421 closes. To add a verb: a row entry here, a parser in VERBS.
# `Bdat` needs no reply: its transition fires when next_event() returns it. Two moves are API calls rather
# than events: greeting() (GREETING → READY, REFUSED or CLOSED by the banner's code) and tls_established()
# (TLS → READY: the client must say EHLO again, RFC 3207 §4.2).
_ANYTIME: Final = (Rset, Noop, Help, Vrfy, Expn, XLink2State)
TRANSITIONS: Final[Mapping[ServerState, Mapping[TransitionKey, ServerState]]] = {
    S.GREETING: {},
    S.READY: {
        Helo: S.GREETED,
        Ehlo: S.GREETED,
        StartTls: S.TLS,
        Quit: S.CLOSED,
        **{e: S.READY for e in _ANYTIME},
    },
    S.GREETED: {
        Helo: S.GREETED,
        Ehlo: S.GREETED,
        Mail: S.MAIL,
        StartTls: S.TLS,
        Auth: S.AUTH,
        Etrn: S.GREETED,
        Quit: S.CLOSED,
        **{e: S.GREETED for e in _ANYTIME},
    },
    S.MAIL: {
        Helo: S.GREETED,
        Ehlo: S.GREETED,
        Rcpt: S.RCPT,
        Quit: S.CLOSED,
        **{e: S.MAIL for e in _ANYTIME},
        Rset: S.GREETED,
    },
    S.RCPT: {
        Helo: S.GREETED,
        Ehlo: S.GREETED,
        Rcpt: S.RCPT,
        Data: S.DATA,
        Bdat: S.BDAT,
        Xexch50: S.XEXCH50,
        Quit: S.CLOSED,
        **{e: S.RCPT for e in _ANYTIME},
        Rset: S.GREETED,
    },
    S.DATA: {DataEnd: S.GREETED},
    S.CHUNKING: {
        Helo: S.GREETED,
        Ehlo: S.GREETED,
        Bdat: S.BDAT,
        Quit: S.CLOSED,
        **{e: S.CHUNKING for e in _ANYTIME},
        Rset: S.GREETED,
    },
    S.BDAT: {BdatEnd: S.CHUNKING, (BdatEnd, LAST): S.GREETED},
    S.XEXCH50: {Xexch50Blob: S.RCPT},
    S.AUTH: {AuthResponse: S.GREETED, Rejected: S.GREETED},
    S.TLS: {},
    S.REFUSED: {Quit: S.CLOSED},
    S.CLOSED: {},
}

# Which replies accept an event (and so fire its transition). Anything not listed: a 2xx.
ACCEPTED_BY: Final[Mapping[type[Event], Callable[[Reply], bool]]] = {
    Data: lambda reply: reply.code == 354,
    Quit: lambda reply: reply.code == 221,
    DataEnd: lambda reply: True,  # the transaction is over whatever the verdict
    StartTls: lambda reply: reply.code == 220,
    Auth: lambda reply: reply.code == 334,  # a challenge: the exchange goes on (235 is handled apart)
    AuthResponse: lambda reply: reply.code != 334,  # anything but another challenge ends the exchange
    BdatEnd: lambda reply: True,  # a refused chunk refuses the message, and the chunking goes on (drained)
    Xexch50: lambda reply: reply.code == 354,
    Xexch50Blob: lambda reply: True,
    Rejected: lambda reply: True,  # only where a row lists it (a refused line ends an AUTH exchange)
}

# The reply for an out-of-sequence command; BAD_SEQUENCE when not listed.
_ALL_VERB_EVENTS: Final = (Helo, Ehlo, Mail, Rcpt, Data, Bdat, StartTls, Auth, Etrn, Xexch50, *_ANYTIME)
SEQUENCE_ERRORS: Final[Mapping[tuple[ServerState, type[Event]], Reply]] = {
    (S.READY, Mail): replies.NEED_HELO,
    (S.READY, Auth): replies.NEED_HELO,
    (S.READY, Etrn): replies.NEED_HELO,
    (S.READY, Rcpt): replies.NEED_MAIL,
    (S.GREETED, Rcpt): replies.NEED_MAIL,
    **{(state, e): replies.NEED_RCPT for state in (S.READY, S.GREETED) for e in (Data, Bdat, Xexch50)},
    (S.MAIL, Data): replies.NO_VALID_RCPT,  # MAIL accepted, every RCPT refused
    (S.MAIL, Bdat): replies.NO_VALID_RCPT,
    (S.MAIL, Xexch50): replies.NEED_RCPT,
    (S.MAIL, Mail): replies.NESTED_MAIL,
    (S.RCPT, Mail): replies.NESTED_MAIL,
    (S.CHUNKING, Mail): replies.NESTED_MAIL,
    **{(S.REFUSED, e): replies.NO_SERVICE for e in _ALL_VERB_EVENTS},
}

# States without a mail transaction: entering one forgets the recipients and the per-transaction flags.
_NO_TRANSACTION: Final = frozenset({S.READY, S.GREETED})
# The states in which the input is read as command lines (see ServerConnection._read_event).
_COMMAND_STATES: Final = frozenset(S) - {S.DATA, S.BDAT, S.XEXCH50, S.AUTH, S.TLS}
# The state the banner's code moves to (greeting()).
_GREETING_STATES: Final[Mapping[int, ServerState]] = {220: S.READY, 421: S.CLOSED, 554: S.REFUSED}
# Events that are owed no reply (next_event()).
_UNANSWERED: Final = frozenset({ConnectionClosed, Bdat, DataChunk})
# The reply a DataEnd carries for the limit the DotUnstuffer reports.
_DATA_ERRORS: Final[Mapping[str, Reply]] = {"line": replies.LINE_TOO_LONG, "size": replies.TOO_BIG}


def _key_name(key: TransitionKey) -> str:
    return key.__name__ if isinstance(key, type) else f"{key[0].__name__}[{key[1]}]"


def render_transitions() -> str:
    """The TRANSITIONS table as text, one `STATE --Event--> STATE` per line (docs and tests); a refined key
    renders as `Event[TAG]`, e.g. `BDAT --BdatEnd[LAST]--> GREETED`."""
    lines = []
    for state, row in TRANSITIONS.items():
        for key, new_state in row.items():
            lines.append(f"{state.value} --{_key_name(key)}--> {new_state.value}")
    return "\n".join(lines)


_BDAT_LAST: Final = (BdatEnd, LAST)  # the refined key of a BdatEnd of the LAST chunk


# --- Command parsing ---------------------------------------------------------------------------------------

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # NUL, bare CR, TAB and friends never belong in a command
# A browser or proxy client talking HTTP to us (cross-protocol attack): METHOD SP ("/"path | target SP HTTP/).
_HTTP = re.compile(rb"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|TRACE|PATCH) (?:/|\S+ HTTP/)")
_AUTH_LINE = re.compile(rb"[\x20-\x7e]*")  # a SASL response is base64 or "*": printable ASCII at most
_BDAT_ARGS = re.compile(r"([0-9]{1,18})(?: +(LAST))?", re.IGNORECASE)
# The chunk size of a BDAT line whatever else is wrong with it, so that its octets can be drained.
_BDAT_SIZE = re.compile(rb"BDAT +([0-9]{1,18})(?= |$)", re.IGNORECASE)
_XEXCH50_ARGS = re.compile(r"(-?[0-9]{1,18}) +(-?[0-9]{1,9})")
_ETRN_QUEUE = re.compile(r"#[\x21-\x7e]+")


class _TooLong:
    """Marker for a command line over the limit (already drained). `verb` is its first word."""

    __slots__ = ("verb",)

    def __init__(self, verb: str) -> None:
        self.verb = verb


_VERB_CHARS = re.compile(rb"[A-Za-z0-9-]{0,16}")


def _verb_of(line: bytes | bytearray) -> str:
    """The first word, upper-cased, for Rejected.verb and logs; "?" when it is not a plausible verb, so that
    no control character or binary junk reaches a log line."""
    word = bytes(line[:17]).split(b" ", 1)[0]
    # Speed: a known verb as clients send it (upper case) needs neither the regex nor the decoding.
    known = _UPPER_VERBS.get(word)
    if known is not None:
        return known
    return word.decode("ascii").upper() if _VERB_CHARS.fullmatch(word) else "?"


_Parser = Callable[["ServerConnection", str, str, bool], Event]


def _parse_hello(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    if not arg:
        return Rejected(replies.SYNTAX, verb)
    return Helo(arg) if verb == "HELO" else Ehlo(arg)


def _split_path_arg(arg: str, prefix: str) -> tuple[str, str] | None:
    """`FROM:<a@b> SIZE=1` → ("<a@b>", " SIZE=1"); None on a syntax error. A space after the colon is
    tolerated (common, and RFC 5321 §4.1.1.2 does not forbid it explicitly)."""
    if arg[: len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest:
        return None
    try:
        end = path_end(rest)
    except AddressError:
        return None
    tail = rest[end:]
    if tail and not tail.startswith(" "):
        return None
    return rest[:end], tail


def _parse_mail(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    split = _split_path_arg(arg, "FROM:")
    if split is None:
        return Rejected(replies.SYNTAX, verb)
    path_text, tail = split
    if utf8 and not tail.isascii():
        return Rejected(replies.BAD_CHARS, verb)
    # Speed: the usual MAIL has no parameters, so nothing to parse (parse_params("") is {}) or check.
    try:
        params = parse_params(tail) if tail else {}
    except ParamError as exc:
        return Rejected(exc.reply, verb)
    # UTF-8 is allowed in the address only, and only with the SMTPUTF8 parameter (RFC 6531 §3.4).
    if utf8 and "SMTPUTF8" not in params:
        return Rejected(replies.BAD_CHARS, verb)
    if params:
        opts = conn.options
        refusal = check_mail_params(
            params,
            esmtp=conn.esmtp,
            max_message_size=opts.max_message_size,
            eightbitmime=opts.eightbitmime,
            smtputf8=opts.smtputf8_in_force,
            dsn=opts.dsn,
            binarymime=opts.binarymime_in_force,
        )
        if refusal is not None:
            return Rejected(refusal, verb)
    try:
        path = parse_path(path_text, allow_null=True, utf8=utf8)
    except AddressError:
        return Rejected(replies.BAD_ADDRESS, verb)
    return Mail(path.address, params)


def _parse_rcpt(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    split = _split_path_arg(arg, "TO:")
    if split is None:
        return Rejected(replies.SYNTAX, verb)
    path_text, tail = split
    if utf8 and (not conn.transaction_smtputf8 or not tail.isascii()):
        return Rejected(replies.BAD_CHARS, verb)
    # Speed: as in _parse_mail, a RCPT without parameters skips parsing and checking them.
    try:
        params = parse_params(tail) if tail else {}
    except ParamError as exc:
        return Rejected(exc.reply, verb)
    refusal = check_rcpt_params(params, esmtp=conn.esmtp, dsn=conn.options.dsn) if params else None
    if refusal is not None:
        return Rejected(refusal, verb)
    try:
        path = parse_path(path_text, utf8=conn.transaction_smtputf8, allow_postmaster=True)
    except AddressError:
        return Rejected(replies.BAD_ADDRESS, verb)
    limit = conn.options.max_recipients
    if limit and conn.recipients_accepted >= limit:
        return Rejected(replies.TOO_MANY_RCPTS, verb)
    return Rcpt(path.address, params, path.source_route)


def _no_arg(event: Event) -> _Parser:
    def parse(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
        return Rejected(replies.SYNTAX, verb) if arg else event

    return parse


def _parse_data(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    if arg:
        return Rejected(replies.SYNTAX, verb)
    if conn.transaction_binarymime:
        return Rejected(replies.BINARYMIME_NEEDS_BDAT, verb)  # RFC 3030 §3: BINARYMIME content needs BDAT
    return Data()


def _parse_bdat(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    m = _BDAT_ARGS.fullmatch(arg)
    if m is None:
        return Rejected(replies.SYNTAX, verb)
    return Bdat(int(m.group(1)), m.group(2) is not None)


def _parse_noop(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Noop()  # RFC 5321 §4.1.1.9: the argument, if any, is ignored


def _parse_help(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Help(arg)


def _parse_vrfy(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Vrfy(arg) if arg else Rejected(replies.SYNTAX, verb)


def _parse_expn(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Expn(arg) if arg else Rejected(replies.SYNTAX, verb)


def _parse_starttls(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    if conn.tls:
        return Rejected(replies.TLS_ACTIVE, verb)
    return Rejected(replies.SYNTAX, verb) if arg else StartTls()


def _parse_auth(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    # RFC 4954 §4: AUTH needs EHLO (it is a service extension), only once, and not inside a transaction.
    if not conn.esmtp:
        return Rejected(replies.BAD_SEQUENCE, verb)
    if conn.authenticated:
        return Rejected(replies.ALREADY_AUTHENTICATED, verb)
    words = arg.split()
    if not 1 <= len(words) <= 2 or not _SASL_MECH.fullmatch(words[0].upper()):
        return Rejected(replies.SYNTAX, verb)
    opts = conn.options
    mechanism = words[0].upper()
    if mechanism not in opts.auth_mechanisms:
        return Rejected(replies.AUTH_MECH_UNKNOWN, verb)
    if not conn.tls and opts.auth_requires_tls and not opts.auth_plaintext_allowed:
        return Rejected(replies.AUTH_ENCRYPTION_REQUIRED, verb)
    if len(words) == 1:
        return Auth(mechanism, None)
    return Auth(mechanism, "" if words[1] == "=" else words[1])  # "=": an empty initial response


def _parse_etrn(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    # RFC 1985: ETRN <domain>, ETRN @<domain> (and its subdomains), ETRN #<queue name>.
    if arg.startswith("#"):
        valid = _ETRN_QUEUE.fullmatch(arg) is not None
    else:
        valid = is_valid_domain(arg[1:] if arg.startswith("@") else arg)
    return Etrn(arg) if valid else Rejected(replies.SYNTAX, verb)


def _parse_xexch50(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    m = _XEXCH50_ARGS.fullmatch(arg)
    if m is None:
        return Rejected(replies.SYNTAX, verb)
    size, version = int(m.group(1)), int(m.group(2))
    if not 0 < size <= conn.options.xexch50_max:
        return Rejected(replies.SYNTAX, verb)
    return Xexch50(size, version)


def _parse_xlink2state(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return XLink2State(arg)


@dataclass(frozen=True, slots=True)
class _Verb:
    event: type[Event]  # what the command becomes; its TRANSITIONS row entry decides if it is in sequence
    parse: _Parser  # argument syntax → the event, or a Rejected
    enabled: Callable[[ServerOptions], bool] | None = None  # None: always there
    disabled: Reply = replies.NOT_IMPLEMENTED  # the refusal when `enabled` says no
    needs_tls: bool = False  # refused with 530 while `require_tls` is on and TLS is not active


# Checked in this order: verb known (500), enabled (502, or 500 for the Exchange verbs), require_tls (530),
# in sequence (503, TRANSITIONS), then the argument syntax by `parse`.
VERBS: Final[Mapping[str, _Verb]] = {
    "HELO": _Verb(Helo, _parse_hello),
    "EHLO": _Verb(Ehlo, _parse_hello),
    "MAIL": _Verb(Mail, _parse_mail, needs_tls=True),
    "RCPT": _Verb(Rcpt, _parse_rcpt, needs_tls=True),
    "DATA": _Verb(Data, _parse_data, needs_tls=True),
    "BDAT": _Verb(Bdat, _parse_bdat, lambda o: o.chunking, needs_tls=True),
    "RSET": _Verb(Rset, _no_arg(Rset())),
    "QUIT": _Verb(Quit, _no_arg(Quit())),
    "NOOP": _Verb(Noop, _parse_noop),
    "HELP": _Verb(Help, _parse_help),
    "VRFY": _Verb(Vrfy, _parse_vrfy, needs_tls=True),
    "EXPN": _Verb(Expn, _parse_expn, needs_tls=True),
    "STARTTLS": _Verb(StartTls, _parse_starttls, lambda o: o.starttls),
    "AUTH": _Verb(Auth, _parse_auth, lambda o: bool(o.auth_mechanisms), needs_tls=True),
    "ETRN": _Verb(Etrn, _parse_etrn, lambda o: o.etrn, needs_tls=True),
    "XEXCH50": _Verb(Xexch50, _parse_xexch50, lambda o: o.xexch50, replies.UNRECOGNIZED, needs_tls=True),
    "X-LINK2STATE": _Verb(XLink2State, _parse_xlink2state, lambda o: o.x_link2state, replies.UNRECOGNIZED),
}
_LONG_VERBS: Final = frozenset({b"MAIL", b"RCPT"})
# What _verb_of() makes of each verb written in upper case: itself.
_UPPER_VERBS: Final[Mapping[bytes, str]] = {verb.encode("ascii"): verb for verb in VERBS}


class ServerConnection:
    """One inbound SMTP session, without I/O. See the module docstring for the calling pattern."""

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options if options is not None else ServerOptions()
        self._state = S.GREETING
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed input in _buf (compacted in receive_data)
        self._eof = False
        self._draining: str | None = None  # verb of an over-long command line being discarded
        self._owed: Event | None = None  # the event still waiting for its reply
        self._unstuffer: DotUnstuffer | None = None
        self._esmtp = False
        self._tls = False
        self._authenticated = False
        self._recipients = 0
        self._txn_smtputf8 = False
        self._txn_binarymime = False
        self._bdat_octets = 0  # octets announced by the BDAT chunks of this message so far
        self._bdat_error: Reply | None = None  # the message's chunks are refused with this
        self._chunk_size = 0  # octets of the current (or last) BDAT chunk
        self._chunk_left = 0  # octets of the current BDAT chunk still to read
        self._chunk_last = False
        self._skip = 0  # octets of a refused BDAT chunk still to discard before its refusal is given
        self._skip_then: Rejected | None = None
        self._blob = bytearray()  # the XEXCH50 blob so far
        self._blob_size = 0

    # --- introspection ---

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def recipients_accepted(self) -> int:
        return self._recipients

    @property
    def esmtp(self) -> bool:
        """The client said EHLO (not HELO): service extensions and their parameters are in force."""
        return self._esmtp

    @property
    def tls(self) -> bool:
        """TLS is active (tls_established() was called)."""
        return self._tls

    @property
    def authenticated(self) -> bool:
        """A 235 answered AUTH in this session (since the last STARTTLS, which forgets it)."""
        return self._authenticated

    @property
    def transaction_smtputf8(self) -> bool:
        """The accepted MAIL of the current transaction carried SMTPUTF8."""
        return self._txn_smtputf8

    @property
    def transaction_binarymime(self) -> bool:
        """The accepted MAIL of the current transaction carried BODY=BINARYMIME (DATA is then refused)."""
        return self._txn_binarymime

    @property
    def chunk_size(self) -> int:
        """Octets of the current (or last) BDAT chunk: for `replies.BDAT_OK(conn.chunk_size)` to a BdatEnd."""
        return self._chunk_size

    @property
    def message_octets(self) -> int:
        """Octets announced by the BDAT chunks of the current message so far."""
        return self._bdat_octets

    @property
    def awaiting_reply(self) -> Event | None:
        """The event whose reply is still owed, if any."""
        return self._owed

    @property
    def buffered(self) -> int:
        """Octets received but not yet turned into events (for tests and memory accounting)."""
        return len(self._buf) - self._pos

    def ehlo_keywords(self) -> list[str]:
        """The EHLO keywords for this moment of the session: they follow the options, TLS and AUTH state."""
        opts = self.options
        keywords = []
        if opts.pipelining:
            keywords.append("PIPELINING")
        keywords.append(f"SIZE {opts.max_message_size}" if opts.max_message_size else "SIZE")
        if opts.eightbitmime:
            keywords.append("8BITMIME")
        if opts.smtputf8_in_force:
            keywords.append("SMTPUTF8")
        if opts.dsn:
            keywords.append("DSN")
        if opts.enhanced_status_codes:
            keywords.append("ENHANCEDSTATUSCODES")
        if opts.starttls and not self._tls:
            keywords.append("STARTTLS")
        if opts.auth_mechanisms and not self._authenticated and self._auth_allowed_here():
            keywords.append("AUTH " + " ".join(opts.auth_mechanisms))
        if opts.chunking:
            keywords.append("CHUNKING")
        if opts.binarymime_in_force:
            keywords.append("BINARYMIME")
        if opts.etrn:
            keywords.append("ETRN")
        if opts.vrfy:
            keywords.append("VRFY")
        if opts.xexch50:
            # Exchange 2000/2003 lists it to anonymous clients too (the KB279616 telnet check looks for it);
            # using it still needs AUTH (the application answers 504 5.7.4).
            keywords.append("XEXCH50")
        if opts.x_link2state:
            keywords.append("X-LINK2STATE")
        keywords.append("HELP")
        return keywords

    def _auth_allowed_here(self) -> bool:
        opts = self.options
        return self._tls or not opts.auth_requires_tls or opts.auth_plaintext_allowed

    # --- input ---

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side. Between the 220 to STARTTLS and
        tls_established() everything received is discarded (plaintext injection, CVE-2011-0411)."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._state is S.CLOSED or self._state is S.TLS:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | NeedData:
        state = self._state
        if state is S.GREETING:
            raise LocalProtocolError("call greeting() before next_event()")
        if self._owed is not None:
            raise LocalProtocolError(f"a reply is still owed for {self._owed!r}")
        if state is S.CLOSED:
            return ConnectionClosed()
        # Speed: command lines, the usual input, skip _read_event's dispatch.
        event = self._next_command_event() if state in _COMMAND_STATES else self._read_event()
        if event is NEED_DATA:
            return event
        # Speed: one set lookup (events are exact types) for the usual case, an event owed a reply.
        if type(event) not in _UNANSWERED:
            self._owed = event
        elif isinstance(event, ConnectionClosed):
            self._enter(S.CLOSED)
        elif isinstance(event, Bdat):
            self._start_chunk(event)
        return event

    def tls_established(self) -> None:
        """The application finished the TLS handshake that followed a 220 to STARTTLS. The session starts
        over (RFC 3207 §4.2): no HELO/EHLO, no transaction, not authenticated; the client must EHLO again."""
        if self._state is not S.TLS:
            raise LocalProtocolError(
                f"tls_established() without an accepted STARTTLS (state {self._state.value})"
            )
        self._tls = True
        self._authenticated = False
        self._esmtp = False
        self._buf = bytearray()
        self._pos = 0
        self._draining = None
        self._enter(S.READY)

    # --- output ---

    def greeting(self, reply: Reply) -> bytes:
        """The banner: 220 to serve, 421 to turn the client away (closes), 554 to refuse service but wait for
        QUIT (RFC 5321 §3.1)."""
        if self._state is not S.GREETING:
            raise LocalProtocolError("greeting() sent twice")
        new_state = _GREETING_STATES.get(reply.code)
        if new_state is None:
            raise LocalProtocolError(f"a greeting must be 220, 421 or 554, not {reply.code}")
        self._enter(new_state)
        return reply.to_bytes(self.options.enhanced_status_codes)

    def send(self, reply: Reply) -> bytes:
        """The bytes to write for `reply` to the owed event; updates the state. A 421 may be sent at any time
        (timeout, shutdown) and closes the session."""
        if reply.code == 421:
            self._owed = None
            self._enter(S.CLOSED)
        else:
            if self._owed is None:
                raise LocalProtocolError(f"no event is waiting for a reply (state {self._state.value})")
            owed, self._owed = self._owed, None
            self._apply(owed, reply)
        return reply.to_bytes(self.options.enhanced_status_codes)

    # --- internals ---

    def _apply(self, event: Event, reply: Reply) -> None:
        # Speed: dispatch on `kind` with `is` (events are exact types, see events.py) rather than a chain of
        # isinstance() calls; `type(event) is X` where mypy must narrow `event`.
        kind = type(event)
        if type(event) is Rejected and event.close:
            self._enter(S.CLOSED)
            return
        code = reply.code
        # Effects that do not depend on a transition.
        if (kind is Auth or kind is AuthResponse) and code == 235:
            self._authenticated = True
        elif kind is BdatEnd and not 200 <= code < 300 and self._bdat_error is None:
            self._bdat_error = reply  # RFC 3030 §2: a refused chunk fails the message; drain the rest of it
        row = TRANSITIONS[self._state]
        new_state = None
        if type(event) is BdatEnd and event.last:  # a refined key first
            new_state = row.get(_BDAT_LAST)
        if new_state is None:
            new_state = row.get(kind)
        if new_state is None:
            return
        accepts = ACCEPTED_BY.get(kind)
        if not (200 <= code < 300 if accepts is None else accepts(reply)):  # default: Reply.is_positive
            return
        if kind is Ehlo:
            self._esmtp = True
        elif kind is Helo:
            self._esmtp = False
        elif type(event) is Mail:
            self._txn_smtputf8 = "SMTPUTF8" in event.params
            self._txn_binarymime = (event.params.get("BODY") or "").upper() == "BINARYMIME"
        elif kind is Rcpt:
            self._recipients += 1
        elif type(event) is Xexch50:
            self._blob_size = event.size
        self._enter(new_state)

    def _enter(self, state: ServerState) -> None:
        if state in _NO_TRANSACTION:
            self._recipients = 0
            self._txn_smtputf8 = False
            self._txn_binarymime = False
            self._bdat_octets = 0
            self._bdat_error = None
        if state is S.DATA:
            opts = self.options
            self._unstuffer = DotUnstuffer(opts.max_text_line, opts.max_message_size)
        else:
            self._unstuffer = None
        if state is not S.XEXCH50 and self._blob:  # an empty one stays (speed: no new object per state)
            self._blob = bytearray()
        if state is S.CLOSED or state is S.TLS:
            # TLS: what the client sent after STARTTLS, in plaintext, must never be taken as commands.
            self._buf = bytearray()
            self._pos = 0
            self._draining = None
            self._skip = 0
            self._skip_then = None
        self._state = state

    def _start_chunk(self, event: Bdat) -> None:
        """A BDAT in sequence: its transition fires now (no reply), and its octets are read next."""
        limit = self.options.max_message_size
        self._bdat_octets += event.size
        if self._bdat_error is None and limit and self._bdat_octets > limit:
            self._bdat_error = replies.TOO_BIG
        self._chunk_size = self._chunk_left = event.size
        self._chunk_last = event.last
        self._enter(TRANSITIONS[self._state][Bdat])

    def _read_event(self) -> Event | NeedData:
        state = self._state
        if state is S.DATA:
            return self._next_data_event()
        if state is S.BDAT:
            return self._next_chunk_event()
        if state is S.XEXCH50:
            return self._next_blob_event()
        if state is S.AUTH:
            return self._next_auth_event()
        if state is S.TLS:
            return ConnectionClosed() if self._eof else NEED_DATA
        return self._next_command_event()

    def _discard(self, limit: int) -> int:
        """Consume up to `limit` octets of the input without copying them; how many were consumed."""
        take = max(0, min(limit, len(self._buf) - self._pos))
        self._pos += take
        return take

    def _take_raw(self, limit: int) -> bytes:
        """Up to `limit` octets of the unconsumed input, consumed."""
        take = min(limit, len(self._buf) - self._pos)
        if take <= 0:
            return b""
        with memoryview(self._buf) as view:
            piece = bytes(view[self._pos : self._pos + take])
        self._pos += take
        return piece

    def _next_data_event(self) -> Event | NeedData:
        unstuffer = self._unstuffer
        assert unstuffer is not None  # set whenever the state is DATA
        if not unstuffer.done and self._pos < len(self._buf):
            content, used = unstuffer.feed(bytes(self._buf[self._pos :]))
            self._pos += used
            if content:
                return DataChunk(content)
        if unstuffer.done:
            return DataEnd(_DATA_ERRORS.get(unstuffer.error or ""))
        if self._eof:
            return ConnectionClosed()
        return NEED_DATA

    def _next_chunk_event(self) -> Event | NeedData:
        # BDAT content is binary: exactly the announced octets, no dot-unstuffing, no line-end policy.
        if self._bdat_error is not None:
            self._chunk_left -= self._discard(self._chunk_left)  # a refused message: drained, not delivered
        elif piece := self._take_raw(self._chunk_left):
            self._chunk_left -= len(piece)
            return DataChunk(piece)
        if self._chunk_left:
            return ConnectionClosed() if self._eof else NEED_DATA
        return BdatEnd(self._chunk_last, self._bdat_error)

    def _next_blob_event(self) -> Event | NeedData:
        self._blob += self._take_raw(self._blob_size - len(self._blob))
        if len(self._blob) == self._blob_size:
            blob, self._blob = bytes(self._blob), bytearray()
            return Xexch50Blob(blob)
        return ConnectionClosed() if self._eof else NEED_DATA

    def _next_auth_event(self) -> Event | NeedData:
        line = self._take_line()
        if line is None:
            return ConnectionClosed() if self._eof else NEED_DATA
        # The verb of a refusal here is "AUTH": never a word of the line, which carries credentials.
        if isinstance(line, _TooLong):
            return Rejected(replies.AUTH_LINE_TOO_LONG, "AUTH")
        if not _AUTH_LINE.fullmatch(line):
            return Rejected(replies.AUTH_BAD_RESPONSE, "AUTH")
        return AuthResponse(line.decode("ascii"))

    def _next_command_event(self) -> Event | NeedData:
        while True:
            if self._skip_then is not None:
                # A refused BDAT: its octets are discarded (never read as commands), then it is refused.
                self._skip -= self._discard(self._skip)
                if self._skip:
                    return ConnectionClosed() if self._eof else NEED_DATA
                refusal, self._skip_then = self._skip_then, None
                return refusal
            # Speed: with nothing buffered (after every command of a session without pipelining) _take_line()
            # would find no line and change nothing.
            line = self._take_line() if self._pos < len(self._buf) else None
            if line is None:
                return ConnectionClosed() if self._eof else NEED_DATA
            if isinstance(line, _TooLong):
                # An over-long BDAT line: its chunk size cannot be trusted, so its octets cannot be skipped.
                return Rejected(replies.LINE_TOO_LONG, line.verb, close=line.verb == "BDAT")
            event = self._parse_command(line)
            if event is not None:
                return event

    def _line_limit(self, start: bytes | bytearray) -> int:
        opts = self.options
        if self._state is S.AUTH:
            return opts.max_auth_line
        head = bytes(start[:4]).upper()
        if head in _LONG_VERBS:
            return opts.max_command_line + PARAMS_ALLOWANCE
        if head == b"AUTH" and opts.auth_mechanisms:
            # RFC 4954 §4: an initial response may make the AUTH command longer than 512 octets.
            return max(opts.max_command_line, opts.max_auth_line)
        return opts.max_command_line

    def _take_line(self) -> bytes | _TooLong | None:
        """The next complete command line without its line end, a _TooLong, or None if incomplete.

        Bounded memory: an unfinished line that is already over the limit is dropped as it arrives, and the
        rest of it is discarded up to its LF ("draining"), so no more than one limit's worth is ever held.
        """
        buf, pos = self._buf, self._pos
        lf = buf.find(b"\n", pos)
        if self._draining is not None:
            if lf < 0:
                self._pos = len(buf)
                return None
            self._pos = lf + 1
            verb, self._draining = self._draining, None
            return _TooLong(verb)
        if lf < 0:
            held = len(buf) - pos
            # Speed: nothing held (the usual case) is never over a limit; skip computing it.
            if held and held >= self._line_limit(buf[pos : pos + 4]):
                self._draining = "AUTH" if self._state is S.AUTH else _verb_of(buf[pos : pos + 17])
                self._pos = len(buf)
            return None
        # A bare LF ends a command too (lenient, like Postfix); only DATA needs the strict CRLF rule.
        end = lf - 1 if lf > pos and buf[lf - 1] == 0x0D else lf
        line = bytes(buf[pos:end])
        self._pos = lf + 1
        octets = end - pos + 2  # the line with its CRLF
        # Speed: outside AUTH no limit is below max_command_line, so a line within it needs no _line_limit().
        may_be_over = octets > self.options.max_command_line or self._state is S.AUTH
        if may_be_over and octets > self._line_limit(line):
            return _TooLong("AUTH" if self._state is S.AUTH else _verb_of(line))
        return line

    def _parse_command(self, line: bytes) -> Event | None:
        """The event for a command line; None when it is a refused BDAT whose octets must be drained first
        (then the refusal comes from _next_command_event once they are)."""
        verb = _verb_of(line)
        event = self._command_event(line, verb)
        if verb == "BDAT" and isinstance(event, Rejected) and not event.close:
            # RFC 3030 gives no way to refuse the octets that follow a BDAT: drain them when the chunk size is
            # known and chunking is on; otherwise the octets would be read as commands, so close instead.
            m = _BDAT_SIZE.match(line) if self.options.chunking else None
            if m is None:
                return dataclasses.replace(event, close=True)
            self._skip = int(m.group(1))
            self._skip_then = event
            return None
        return event

    def _command_event(self, line: bytes, verb: str) -> Event:
        if _CONTROL.search(line):
            return Rejected(replies.BAD_CHARS, verb)
        # `verb` is the line's first word: one of VERBS is no HTTP method, so the line cannot match _HTTP.
        if verb not in VERBS and _HTTP.match(line):
            return Rejected(replies.UNRECOGNIZED, verb, close=True)
        utf8 = not line.isascii()
        if utf8:
            # RFC 6531: UTF-8 only inside MAIL/RCPT addresses; the parsers check the SMTPUTF8 condition.
            if verb not in ("MAIL", "RCPT") or not self.options.smtputf8_in_force:
                return Rejected(replies.BAD_CHARS, verb)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                return Rejected(replies.BAD_CHARS, verb)
        else:
            text = line.decode("ascii")
        # `verb` (_verb_of) is the first word upper-cased when it can be a verb, so VERBS.get(verb) is the
        # lookup of the word before the first space, upper-cased (and None for a word that is not ASCII).
        _, _, arg = text.partition(" ")
        spec = VERBS.get(verb)
        if spec is None:
            return Rejected(replies.UNRECOGNIZED, verb)
        opts = self.options
        # After a 554 banner every command but QUIT gets NO_SERVICE (RFC 5321 §3.1), offered or not, TLS or
        # not.
        if spec.enabled is not None and not spec.enabled(opts) and self._state is not S.REFUSED:
            return Rejected(spec.disabled, verb)
        if spec.needs_tls and opts.require_tls and not self._tls and self._state is not S.REFUSED:
            return Rejected(replies.MUST_STARTTLS, verb)
        if spec.event not in TRANSITIONS[self._state]:
            return Rejected(SEQUENCE_ERRORS.get((self._state, spec.event), replies.BAD_SEQUENCE), verb)
        return spec.parse(self, verb, arg.strip(" "), utf8)
