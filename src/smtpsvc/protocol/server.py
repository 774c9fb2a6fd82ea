"""ServerConnection: the receiving side of SMTP as a sans-I/O state machine (h11 style).

The application feeds bytes in (`receive_data`), takes events out (`next_event`) and answers each event that
needs a reply with `send(reply)`, which returns the bytes to write. The core owns the protocol rules: command
syntax, sequencing (503s from the TRANSITIONS table below), ESMTP parameters, line and size limits, PIPELINING
buffering and DATA dot-unstuffing. The application owns policy (relay, quotas, spooling, timeouts).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from . import replies
from .address import AddressError, parse_path, path_end
from .dotstuff import DotUnstuffer
from .errors import LocalProtocolError
from .events import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
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
    Vrfy,
)
from .params import ParamError, check_mail_params, check_rcpt_params, parse_params
from .replies import Reply

# RFC 5321 §4.5.3.1.4 caps a command line at 512 octets but lets extensions raise it, and RFC 1869 §4.1.2 (its
# successor RFC 5321 §4.1.2 esmtp-param) lets each MAIL/RCPT parameter extension lengthen those two commands:
# SIZE, BODY, RET, ENVID (100 octets of xtext), NOTIFY and ORCPT (up to 500) together. 500 extra octets cover
# them, as Postfix and Exim allow.
PARAMS_ALLOWANCE: Final = 500


@dataclass(frozen=True, slots=True)
class ServerOptions:
    max_command_line: int = 512  # octets incl. CRLF; MAIL and RCPT get PARAMS_ALLOWANCE more
    max_text_line: int = 1000  # DATA line limit incl. CRLF (RFC 5321 §4.5.3.1.6); 0 = unlimited
    max_message_size: int = 0  # 0 = unlimited; counted on the unstuffed message octets
    max_recipients: int = 100  # 0 = unlimited
    pipelining: bool = True  # only advertised: pipelined input is always buffered and handled in order
    eightbitmime: bool = True
    smtputf8: bool = True  # in force only together with eightbitmime (RFC 6531 §3.1 requires 8BITMIME)
    dsn: bool = True
    enhanced_status_codes: bool = True

    def __post_init__(self) -> None:
        if self.max_command_line < 16:
            raise ValueError("max_command_line must be at least 16 octets")
        for name in ("max_text_line", "max_message_size", "max_recipients"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def smtputf8_in_force(self) -> bool:
        return self.smtputf8 and self.eightbitmime


class ServerState(enum.Enum):
    GREETING = "GREETING"  # connected; greeting() not called yet
    READY = "READY"  # banner sent, no HELO/EHLO accepted yet
    GREETED = "GREETED"  # HELO/EHLO accepted, no mail transaction
    MAIL = "MAIL"  # MAIL accepted, no RCPT accepted yet
    RCPT = "RCPT"  # at least one RCPT accepted
    DATA = "DATA"  # 354 sent: receiving message content
    REFUSED = "REFUSED"  # banner was 554: only QUIT is allowed (RFC 5321 §3.1)
    CLOSED = "CLOSED"  # QUIT answered, 421 sent, or EOF: input is ignored


S = ServerState

# The whole command sequencing of SMTP, as data (h11's EVENT_TRIGGERED_TRANSITIONS): in each state, the
# events that are in sequence and the state an *accepting* reply moves to (see ACCEPTED_BY). An event missing
# from a state's row is out of sequence: the core rejects it with SEQUENCE_ERRORS. Other replies leave the
# state as it is, except that any 421 closes. To add a verb: a row entry here, a parser in VERBS.
_ANYTIME: Final = (Rset, Noop, Help, Vrfy, Expn)
TRANSITIONS: Final[Mapping[ServerState, Mapping[type[Event], ServerState]]] = {
    S.GREETING: {},
    S.READY: {Helo: S.GREETED, Ehlo: S.GREETED, Quit: S.CLOSED, **{e: S.READY for e in _ANYTIME}},
    S.GREETED: {
        Helo: S.GREETED,
        Ehlo: S.GREETED,
        Mail: S.MAIL,
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
        Quit: S.CLOSED,
        **{e: S.RCPT for e in _ANYTIME},
        Rset: S.GREETED,
    },
    S.DATA: {DataEnd: S.GREETED},
    S.REFUSED: {Quit: S.CLOSED},
    S.CLOSED: {},
}

# Which replies accept an event (and so fire its transition). Anything not listed: a 2xx.
ACCEPTED_BY: Final[Mapping[type[Event], Callable[[Reply], bool]]] = {
    Data: lambda reply: reply.code == 354,
    Quit: lambda reply: reply.code == 221,
    DataEnd: lambda reply: True,  # the transaction is over whatever the verdict
}

# The reply for an out-of-sequence command; BAD_SEQUENCE when not listed.
SEQUENCE_ERRORS: Final[Mapping[tuple[ServerState, type[Event]], Reply]] = {
    (S.READY, Mail): replies.NEED_HELO,
    (S.READY, Rcpt): replies.NEED_MAIL,
    (S.GREETED, Rcpt): replies.NEED_MAIL,
    (S.READY, Data): replies.NEED_RCPT,
    (S.GREETED, Data): replies.NEED_RCPT,
    (S.MAIL, Data): replies.NO_VALID_RCPT,  # MAIL accepted, every RCPT refused
    (S.MAIL, Mail): replies.NESTED_MAIL,
    (S.RCPT, Mail): replies.NESTED_MAIL,
    **{(S.REFUSED, e): replies.NO_SERVICE for e in (Helo, Ehlo, Mail, Rcpt, Data, *_ANYTIME)},
}

# States without a mail transaction: entering one forgets the recipients and the SMTPUTF8 flag.
_NO_TRANSACTION: Final = frozenset({S.READY, S.GREETED})


def render_transitions() -> str:
    """The TRANSITIONS table as text, one `STATE --Event--> STATE` per line (docs and tests)."""
    lines = []
    for state, row in TRANSITIONS.items():
        for event_type, new_state in row.items():
            lines.append(f"{state.value} --{event_type.__name__}--> {new_state.value}")
    return "\n".join(lines)


# --- Command parsing ---------------------------------------------------------------------------------------

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")  # NUL, bare CR, TAB and friends never belong in a command
# A browser or proxy client talking HTTP to us (cross-protocol attack): METHOD SP ("/"path | target SP HTTP/).
_HTTP = re.compile(rb"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|TRACE|PATCH) (?:/|\S+ HTTP/)")


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
    try:
        params = parse_params(tail)
    except ParamError as exc:
        return Rejected(exc.reply, verb)
    # UTF-8 is allowed in the address only, and only with the SMTPUTF8 parameter (RFC 6531 §3.4).
    if utf8 and "SMTPUTF8" not in params:
        return Rejected(replies.BAD_CHARS, verb)
    opts = conn.options
    refusal = check_mail_params(
        params,
        esmtp=conn.esmtp,
        max_message_size=opts.max_message_size,
        eightbitmime=opts.eightbitmime,
        smtputf8=opts.smtputf8_in_force,
        dsn=opts.dsn,
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
    try:
        params = parse_params(tail)
    except ParamError as exc:
        return Rejected(exc.reply, verb)
    refusal = check_rcpt_params(params, esmtp=conn.esmtp, dsn=conn.options.dsn)
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


def _parse_noop(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Noop()  # RFC 5321 §4.1.1.9: the argument, if any, is ignored


def _parse_help(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Help(arg)


def _parse_vrfy(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Vrfy(arg) if arg else Rejected(replies.SYNTAX, verb)


def _parse_expn(conn: ServerConnection, verb: str, arg: str, utf8: bool) -> Event:
    return Expn(arg) if arg else Rejected(replies.SYNTAX, verb)


@dataclass(frozen=True, slots=True)
class _Verb:
    event: type[Event]  # what the command becomes; its TRANSITIONS row entry decides if it is in sequence
    parse: _Parser  # argument syntax → the event, or a Rejected


VERBS: Final[Mapping[str, _Verb]] = {
    "HELO": _Verb(Helo, _parse_hello),
    "EHLO": _Verb(Ehlo, _parse_hello),
    "MAIL": _Verb(Mail, _parse_mail),
    "RCPT": _Verb(Rcpt, _parse_rcpt),
    "DATA": _Verb(Data, _no_arg(Data())),
    "RSET": _Verb(Rset, _no_arg(Rset())),
    "QUIT": _Verb(Quit, _no_arg(Quit())),
    "NOOP": _Verb(Noop, _parse_noop),
    "HELP": _Verb(Help, _parse_help),
    "VRFY": _Verb(Vrfy, _parse_vrfy),
    "EXPN": _Verb(Expn, _parse_expn),
}
_LONG_VERBS: Final = frozenset({b"MAIL", b"RCPT"})


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
        self._recipients = 0
        self._txn_smtputf8 = False

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
    def transaction_smtputf8(self) -> bool:
        """The accepted MAIL of the current transaction carried SMTPUTF8."""
        return self._txn_smtputf8

    @property
    def awaiting_reply(self) -> Event | None:
        """The event whose reply is still owed, if any."""
        return self._owed

    @property
    def buffered(self) -> int:
        """Octets received but not yet turned into events (for tests and memory accounting)."""
        return len(self._buf) - self._pos

    def ehlo_keywords(self) -> list[str]:
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
        keywords.append("HELP")
        return keywords

    # --- input ---

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("receive_data() after EOF")
            return
        if not data:
            self._eof = True
            return
        if self._state is S.CLOSED:
            return
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    def next_event(self) -> Event | NeedData:
        if self._state is S.GREETING:
            raise LocalProtocolError("call greeting() before next_event()")
        if self._owed is not None:
            raise LocalProtocolError(f"a reply is still owed for {self._owed!r}")
        if self._state is S.CLOSED:
            return ConnectionClosed()
        event = self._next_data_event() if self._state is S.DATA else self._next_command_event()
        if event is NEED_DATA:
            return event
        if isinstance(event, ConnectionClosed):
            self._enter(S.CLOSED)
        elif not isinstance(event, DataChunk):
            self._owed = event
        return event

    # --- output ---

    def greeting(self, reply: Reply) -> bytes:
        """The banner: 220 to serve, 421 to turn the client away (closes), 554 to refuse service but wait for
        QUIT (RFC 5321 §3.1)."""
        if self._state is not S.GREETING:
            raise LocalProtocolError("greeting() sent twice")
        new_state = {220: S.READY, 421: S.CLOSED, 554: S.REFUSED}.get(reply.code)
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
        if isinstance(event, Rejected):
            if event.close:
                self._enter(S.CLOSED)
            return
        accepts = ACCEPTED_BY.get(type(event), _is_positive)
        new_state = TRANSITIONS[self._state].get(type(event))
        if new_state is None or not accepts(reply):
            return
        if isinstance(event, Helo | Ehlo):
            self._esmtp = isinstance(event, Ehlo)
        elif isinstance(event, Mail):
            self._txn_smtputf8 = "SMTPUTF8" in event.params
        elif isinstance(event, Rcpt):
            self._recipients += 1
        self._enter(new_state)

    def _enter(self, state: ServerState) -> None:
        if state in _NO_TRANSACTION:
            self._recipients = 0
            self._txn_smtputf8 = False
        if state is S.DATA:
            opts = self.options
            self._unstuffer = DotUnstuffer(opts.max_text_line, opts.max_message_size)
        else:
            self._unstuffer = None
        if state is S.CLOSED:
            self._buf = bytearray()
            self._pos = 0
        self._state = state

    def _next_data_event(self) -> Event | NeedData:
        unstuffer = self._unstuffer
        assert unstuffer is not None  # set whenever the state is DATA
        if not unstuffer.done and self._pos < len(self._buf):
            content, used = unstuffer.feed(bytes(self._buf[self._pos :]))
            self._pos += used
            if content:
                return DataChunk(content)
        if unstuffer.done:
            error = {"line": replies.LINE_TOO_LONG, "size": replies.TOO_BIG}.get(unstuffer.error or "")
            return DataEnd(error)
        if self._eof:
            return ConnectionClosed()
        return NEED_DATA

    def _next_command_event(self) -> Event | NeedData:
        line = self._take_line()
        if line is None:
            return ConnectionClosed() if self._eof else NEED_DATA
        if isinstance(line, _TooLong):
            return Rejected(replies.LINE_TOO_LONG, line.verb)
        return self._parse_command(line)

    def _line_limit(self, start: bytes | bytearray) -> int:
        limit = self.options.max_command_line
        return limit + PARAMS_ALLOWANCE if bytes(start[:4]).upper() in _LONG_VERBS else limit

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
            if len(buf) - pos >= self._line_limit(buf[pos : pos + 4]):
                self._draining = _verb_of(buf[pos : pos + 17])
                self._pos = len(buf)
            return None
        # A bare LF ends a command too (lenient, like Postfix); only DATA needs the strict CRLF rule.
        end = lf - 1 if lf > pos and buf[lf - 1] == 0x0D else lf
        line = bytes(buf[pos:end])
        self._pos = lf + 1
        if len(line) + 2 > self._line_limit(line):
            return _TooLong(_verb_of(line))
        return line

    def _parse_command(self, line: bytes) -> Event:
        verb = _verb_of(line)
        if _CONTROL.search(line):
            return Rejected(replies.BAD_CHARS, verb)
        if _HTTP.match(line):
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
        word, _, arg = text.partition(" ")
        spec = VERBS.get(word.upper()) if word.isascii() else None
        if spec is None:
            return Rejected(replies.UNRECOGNIZED, verb)
        if spec.event not in TRANSITIONS[self._state]:
            return Rejected(SEQUENCE_ERRORS.get((self._state, spec.event), replies.BAD_SEQUENCE), verb)
        return spec.parse(self, verb, arg.strip(" "), utf8)


def _is_positive(reply: Reply) -> bool:
    return reply.is_positive
