"""Events of the protocol core: what the peer did, as small frozen dataclasses (h11 style).

Server side, `ServerConnection.next_event()` returns one of `Event` (or `NEED_DATA`); every event except
`DataChunk` and `ConnectionClosed` is owed exactly one reply. Client side, `ClientConnection.next_event()`
returns `ServerReply` or `ConnectionClosed`. Don't subclass these: the core dispatches on exact types.
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
    | Rejected
    | ConnectionClosed
)
"""Everything ServerConnection.next_event() can return besides NEED_DATA."""

ClientEvent = ServerReply | ConnectionClosed
