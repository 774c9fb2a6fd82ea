"""Test driver: a plausible application around ServerConnection, answering every event that needs a reply."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from smtpsvc.protocol import (
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
    Helo,
    Mail,
    Quit,
    Rcpt,
    Rejected,
    Reply,
    ServerConnection,
    ServerOptions,
    ServerState,
    StartTls,
    Xexch50,
    Xexch50Blob,
    XLink2State,
)
from smtpsvc.protocol import replies as R
from smtpsvc.protocol.sasl import SaslError, decode_login, decode_plain

HOST = "mx.test"
USER, PASSWORD = "alice", "secret"


def plausible_reply(conn: ServerConnection, event: Event) -> Reply:
    """What a permissive application answers: accept everything the core did not reject."""
    if isinstance(event, Rejected):
        return event.reply
    if isinstance(event, Ehlo):
        return R.EHLO_REPLY(HOST, "192.0.2.1", conn.ehlo_keywords())
    if isinstance(event, Helo):
        return R.HELO_REPLY(HOST, "192.0.2.1")
    if isinstance(event, Mail):
        return R.SENDER_OK(event.address)
    if isinstance(event, Rcpt):
        return R.RCPT_OK(event.address)
    if isinstance(event, Data):
        return R.START_DATA
    if isinstance(event, DataEnd):
        return event.error or R.QUEUED("0123456789AB")
    if isinstance(event, Quit):
        return R.QUIT_REPLY(HOST)
    if isinstance(event, StartTls):
        return R.READY_TLS
    if isinstance(event, BdatEnd):
        return event.error or (R.QUEUED("0123456789AB") if event.last else R.BDAT_OK(conn.chunk_size))
    if isinstance(event, Etrn):
        return R.ETRN_OK(event.arg)
    if isinstance(event, Xexch50):
        return R.XEXCH50_GO if conn.authenticated else R.NEED_AUTH_XEXCH50
    if isinstance(event, Xexch50Blob):
        return R.OK
    if isinstance(event, XLink2State):
        return R.LINK2STATE_IGNORED if conn.authenticated else R.NEED_AUTH_XEXCH50
    return R.OK


@dataclass
class Authenticator:
    """The application's side of AUTH PLAIN and LOGIN, accepting USER/PASSWORD."""

    mechanism: str = ""
    user: str | None = None

    def start(self, event: Auth) -> Reply:
        self.mechanism, self.user = event.mechanism, None
        if event.initial is None:
            return R.LOGIN_USERNAME if event.mechanism == "LOGIN" else R.AUTH_CHALLENGE("")
        return self.step(event.initial)

    def step(self, data: str) -> Reply:
        if data == "*":
            return R.AUTH_CANCELLED
        try:
            if self.mechanism == "PLAIN":
                _, user, password = decode_plain(data)
            elif self.user is None:
                self.user = decode_login(data)
                return R.LOGIN_PASSWORD
            else:
                user, password = self.user, decode_login(data)
        except SaslError:
            return R.AUTH_BAD_RESPONSE
        return R.AUTH_OK if (user, password) == (USER, PASSWORD) else R.AUTH_FAILED


@dataclass
class Session:
    """A greeted ServerConnection plus everything that happened: events (chunks merged) and bytes written."""

    conn: ServerConnection
    events: list[Event] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    max_buffered: int = 0
    handshake: bool = True  # after a 220 to STARTTLS, call tls_established() at once (a TLS layer would)
    auth: Authenticator = field(default_factory=Authenticator)

    @classmethod
    def start(cls, options: ServerOptions | None = None) -> Session:
        conn = ServerConnection(options or ServerOptions())
        session = cls(conn)
        session.output += conn.greeting(R.GREETING(HOST))
        return session

    def feed(self, data: bytes, answer: bool = True) -> list[Event]:
        """Feed `data` (b"" = EOF), then process events until NEED_DATA or ConnectionClosed."""
        self.conn.receive_data(data)
        self.max_buffered = max(self.max_buffered, self.conn.buffered)
        return self.pump(answer)

    def pump(self, answer: bool = True) -> list[Event]:
        new: list[Event] = []
        while self.conn.awaiting_reply is None:
            event = self.conn.next_event()
            if event is NEED_DATA:
                break
            new.append(event)
            if isinstance(event, ConnectionClosed):
                break
            if isinstance(event, DataChunk | Bdat):
                continue
            if not answer:
                break
            self.output += self.conn.send(self.reply_for(event))
            if isinstance(event, StartTls) and self.handshake and self.conn.state is ServerState.TLS:
                self.conn.tls_established()
        self.events.extend(new)
        return new

    def reply_for(self, event: Event) -> Reply:
        if isinstance(event, Auth):
            return self.auth.start(event)
        if isinstance(event, AuthResponse):
            return self.auth.step(event.data)
        return plausible_reply(self.conn, event)

    def merged_events(self) -> list[Event]:
        """Events with consecutive DataChunks joined, so that different chunkings compare equal."""
        out: list[Event] = []
        for event in self.events:
            if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
                out[-1] = DataChunk(out[-1].data + event.data)
            else:
                out.append(event)
        return out

    def replies(self) -> list[str]:
        """The reply lines written after the banner, decoded."""
        return self.output.decode().split("\r\n")[1:-1]

    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))


def one(events: list[Event]) -> Event:
    assert len(events) == 1, events
    return events[0]


def greeted(options: ServerOptions | None = None, hello: bytes = b"EHLO client.test\r\n") -> Session:
    session = Session.start(options)
    session.feed(hello)
    return session


def in_transaction(
    options: ServerOptions | None = None, mail: bytes = b"MAIL FROM:<a@example.org>\r\n"
) -> Session:
    session = greeted(options)
    session.feed(mail + b"RCPT TO:<b@example.com>\r\n")
    return session


def in_data(options: ServerOptions | None = None) -> Session:
    session = in_transaction(options)
    session.feed(b"DATA\r\n")
    return session


def rejected(events: Sequence[object]) -> Rejected:
    """The one event in `events`, which must be a Rejected."""
    assert len(events) == 1, events
    event = events[0]
    assert isinstance(event, Rejected), event
    return event
