"""Events of the protocol core: what the peer did, as small frozen dataclasses (h11 style).

Server side, `ServerConnection.next_event()` returns one of `Event` (or `NEED_DATA`); every event except
`DataChunk`, `Bdat` and `ConnectionClosed` is owed exactly one reply. Client side,
`ClientConnection.next_event()` returns `ServerReply` or `ConnectionClosed`. Don't subclass these: the core
dispatches on exact types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, Literal

from .replies import Reply


class Sentinel(enum.Enum):
    """An enum so that `event is NEED_DATA` narrows the type for mypy."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Sentinel.NEED_DATA
"""Returned by next_event() when more bytes must be received before the next event."""

NeedData = Literal[Sentinel.NEED_DATA]


@dataclass(frozen=True, slots=True)
class Helo:
    name: str


@dataclass(frozen=True, slots=True)
class Ehlo:
    name: str


@dataclass(frozen=True, slots=True)
class Mail:
    """MAIL FROM. `address` is "" for the null reverse-path `<>`; param keys are upper-case."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rcpt:
    """RCPT TO. `source_route` is the RFC 5321 `@a,@b:` prefix as the client wrote it, else ""."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    source_route: str = ""


@dataclass(frozen=True, slots=True)
class Data:
    """The DATA command; reply 354 to start receiving the message."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Part of the message content, dot-unstuffed and CRLF-normalised. Needs no reply."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """`<CRLF>.<CRLF>` was received. `error` is the reply to give when the core refused the content
    (line too long, message too big); then the chunks already delivered must be discarded."""

    error: Reply | None = None


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Noop:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    arg: str = ""


@dataclass(frozen=True, slots=True)
class Vrfy:
    arg: str


@dataclass(frozen=True, slots=True)
class Expn:
    arg: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS (RFC 3207). Reply 220 (`replies.READY_TLS`) to go ahead: the core then discards every byte
    received after the command until `ServerConnection.tls_established()` is called. 454 to decline."""


_REDACTED = "<redacted>"


@dataclass(frozen=True, slots=True, repr=False)
class Auth:
    """AUTH <mechanism> [initial-response] (RFC 4954). `mechanism` is upper-case and one of the configured
    ones; `initial` is None without an initial response, "" for "=" (an empty one), else the base64 text.
    Reply 334 (a challenge: the next client line becomes an `AuthResponse`), 235, or a refusal.

    The initial response carries credentials: repr() never shows it."""

    mechanism: str
    initial: str | None = None

    def __repr__(self) -> str:
        initial = "None" if self.initial is None else _REDACTED
        return f"Auth(mechanism={self.mechanism!r}, initial={initial})"


@dataclass(frozen=True, slots=True, repr=False)
class AuthResponse:
    """The client's line after a 334: base64 text as sent (CRLF stripped), or "*" to cancel (answer
    `replies.AUTH_CANCELLED`). Reply 334 again, 235, or a refusal. repr() never shows `data`."""

    data: str

    def __repr__(self) -> str:
        return f"AuthResponse(data={_REDACTED})"

    @property
    def cancelled(self) -> bool:
        return self.data == "*"


@dataclass(frozen=True, slots=True)
class Bdat:
    """BDAT <size> [LAST] (RFC 3030), in sequence: `size` octets follow as `DataChunk`s, then a `BdatEnd`.
    Needs NO reply (open the spool writer at the first one of a message)."""

    size: int
    last: bool = False


@dataclass(frozen=True, slots=True)
class BdatEnd:
    """All octets of a BDAT chunk were received. Reply `replies.BDAT_OK(n)` to a chunk that is not the last,
    the final verdict (e.g. `QUEUED`) to the LAST one. `error` is the reply to give when the core refused the
    message (over the size limit, or an earlier chunk of it was refused): then discard the message's chunks.
    A refusal (4xx/5xx) to a chunk that is not LAST refuses the whole message: later chunks of it are
    drained and come with that reply as `error`."""

    last: bool
    error: Reply | None = None


@dataclass(frozen=True, slots=True)
class Etrn:
    """ETRN <node> (RFC 1985): `arg` is "domain", "@domain" (the domain and its subdomains) or "#queue".
    Reply 250 (`ETRN_OK`), 251, 252, 253, 458 or 459."""

    arg: str


@dataclass(frozen=True, slots=True)
class Xexch50:
    """XEXCH50 <size> <version> (Exchange peers, SPEC 2.5). Reply `NEED_AUTH_XEXCH50` when not authenticated,
    else `XEXCH50_GO` (354): the core then reads exactly `size` octets and emits `Xexch50Blob`."""

    size: int
    version: int


@dataclass(frozen=True, slots=True, repr=False)
class Xexch50Blob:
    """The opaque XEXCH50 blob, exactly as received. Reply `OK` (250 2.0.0)."""

    data: bytes

    def __repr__(self) -> str:
        return f"Xexch50Blob(<{len(self.data)} octets>)"


@dataclass(frozen=True, slots=True)
class XLink2State:
    """X-LINK2STATE (Exchange link state; never part of our topology, SPEC 2.5): reply `NEED_AUTH_XEXCH50`
    (504 5.7.4) when not authenticated, as Exchange does to a peer outside its routing group, else
    `LINK2STATE_IGNORED` (250): the state is acknowledged and dropped."""

    arg: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """A command the core refused by itself (syntax, sequence, limits). Send `reply` (or a stricter one).

    `close` asks the application to close the connection after the reply (e.g. an HTTP request: a
    cross-protocol attack, not a confused mail client).
    """

    reply: Reply
    verb: str
    close: bool = False

    def __post_init__(self) -> None:
        if self.reply.is_positive or self.reply.is_intermediate:
            raise ValueError(f"Rejected needs a 4xx/5xx reply, got {self.reply.code}")


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side (EOF), or the session is over. Repeated on every later call."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    """Client side: one complete reply and the command it answers ("GREETING", "EHLO", "MAIL", "DOT", ...).

    `command` is "" for an unsolicited reply (a 421 sent while nothing was pending).
    """

    reply: Reply
    command: str


Event = (
    Helo
    | Ehlo
    | Mail
    | Rcpt
    | Data
    | DataChunk
    | DataEnd
    | Rset
    | Noop
    | Quit
    | Help
    | Vrfy
    | Expn
    | StartTls
    | Auth
    | AuthResponse
    | Bdat
    | BdatEnd
    | Etrn
    | Xexch50
    | Xexch50Blob
    | XLink2State
    | Rejected
    | ConnectionClosed
)
"""Everything ServerConnection.next_event() can return besides NEED_DATA."""

ClientEvent = ServerReply | ConnectionClosed
