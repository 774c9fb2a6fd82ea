"""One inbound SMTP session: drives the sans-I/O `ServerConnection` over an asyncio connection.

The protocol core decides syntax, sequencing and limits; this adapter supplies the policy answers (relay,
queueing) and the I/O: reads with timeouts, streams DATA chunks into the spool, and sends `250 2.6.0`
only after the queue has made the message durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from smtpsvc import events, protolog
from smtpsvc.auth.limiter import AuthGate, AuthLimiter, LocalAuthGate
from smtpsvc.auth.users import UserStore
from smtpsvc.config import Config, LiveConfig
from smtpsvc.events import EventLog
from smtpsvc.headers import HopCounter
from smtpsvc.ingest import EnvelopeFields, Ingest, received_header
from smtpsvc.model import Recipient, Source
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
    Expn,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rejected,
    Reply,
    Rset,
    ServerConnection,
    ServerOptions,
    StartTls,
    Vrfy,
    Xexch50,
    Xexch50Blob,
    XLink2State,
    replies,
    split_address,
    xtext_decode,
)
from smtpsvc.protolog import ProtocolLog, logged_command
from smtpsvc.queue.base import MessageWriter, QueueError
from smtpsvc.routing.categorizer import check_recipient, connection_allowed, postmaster_address
from smtpsvc.server.sasl_exchange import Credentials, SaslExchange
from smtpsvc.tls import ServerCertificate

READ_SIZE = 64 * 1024
BUFFER_LIMIT = 64 * 1024  # reading pauses above twice this much unread input, resumes at or below it
SESSION_TOO_BIG = Reply(552, "5.3.4", "Session size limit exceeded (max_session_size); send the rest anew")
# The queue's disk is full: RFC 5321's 452 "insufficient system storage" with RFC 3463's X.3.1 "mail system
# full" (Postfix answers the same). The client keeps the message and tries again later.
MAIL_SYSTEM_FULL = Reply(452, "4.3.1", "Insufficient system storage, please try again later")
LINGER_SECONDS = 1.0
TLS_HANDSHAKE_TIMEOUT = 30.0
# A client refused by connection control gets the 554 banner and, as RFC 5321 §3.1 asks, the chance to QUIT.
# It is not owed more: the session ends after this long in all (not per command, so a slow trickle of
# commands cannot hold the connection open) or at this many commands, each answered 503, the last 421.
REFUSED_SECONDS = 10.0
REFUSED_COMMANDS = 5


class ConnectionRefusals:
    """Which refused addresses were logged lately: event 7010 (cause connection-denied) at most once per
    address per `interval` in this process, so a client that reconnects in a loop cannot flood the event
    log. Bounded: past `limit` addresses the expired ones are dropped, and if all are fresh, all are."""

    def __init__(
        self, interval: float = 60.0, limit: int = 4096, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.limit = limit
        self.clock = clock
        self._logged: dict[str, float] = {}

    def should_log(self, address: str) -> bool:
        now = self.clock()
        last = self._logged.get(address)
        if last is not None and now - last < self.interval:
            return False
        if len(self._logged) >= self.limit:
            self._logged = {a: t for a, t in self._logged.items() if now - t < self.interval}
            if len(self._logged) >= self.limit:
                self._logged.clear()
        self._logged[address] = now
        return True


class SessionObserver(Protocol):
    """Metrics hook (`smtpsvc.metrics.Metrics` implements it): told what the session does; every call is
    quick and never raises. A Protocol, so the session does not depend on the metrics library."""

    def session_opened(self) -> None: ...
    def session_closed(self) -> None: ...
    def protocol_event(self, event: object) -> None: ...  # every core event but DataChunk
    def reply(self, code: int) -> None: ...
    def message_accepted(self, seconds: float) -> None: ...  # end of DATA / BDAT LAST → 250, in seconds


class ReverseLookup(Protocol):
    """The PTR names of a client's address, for `server.reverse_dns` (`routing.mx.MxResolver` implements
    it). A Protocol, so an SMTP worker need not load the DNS library until a session asks (`receiving`)."""

    async def reverse_names(self, ip: str) -> list[str]: ...


@dataclass(slots=True)
class SessionContext:
    """What every session shares with the service. A reload swaps the configuration in `live` (shared with
    every other part), and the certificate and the accounts here; a session takes `config` once, at its
    start."""

    live: LiveConfig
    ingest: Ingest
    events: EventLog
    certificate: ServerCertificate
    users: UserStore
    limiter: AuthLimiter
    etrn: Callable[[str, bool], Awaitable[int]]  # (domain, subdomains) -> messages made due now
    resolver: ReverseLookup | None = None  # for server.reverse_dns
    metrics: SessionObserver | None = None  # metrics hook; None: no metrics
    auth_gate: AuthGate | None = None  # an SMTP worker: the main process's limiter; None: `limiter`
    # A local submission (`sendmail -bs`): no relay rules, as for Pickup, whose folder its user can write
    trusted: bool = False
    protocol_log: ProtocolLog | None = None  # [protocol_log] enabled: every command and reply, W3C
    refusals: ConnectionRefusals = field(default_factory=ConnectionRefusals)  # connection control's log

    @property
    def config(self) -> Config:
        return self.live.current


def server_options(context: SessionContext, client_ip: str) -> ServerOptions:
    """The protocol core's options for a session: computed once per configuration (and for the few facts
    that vary per client), as every session of a busy server would otherwise build the same object."""
    key = (
        id(context.config),
        context.users.has_users,
        context.certificate.context is not None,
        _is_loopback(client_ip),
    )
    cached = _OPTIONS.get(key)
    if cached is not None and cached[0] is context.config:
        return cached[1]
    options = _server_options(context, client_ip)
    if len(_OPTIONS) >= 64:  # reloads: old configurations' entries go
        _OPTIONS.clear()
    _OPTIONS[key] = (context.config, options)
    return options


_OPTIONS: dict[tuple[int, bool, bool, bool], tuple[Config, ServerOptions]] = {}


def _server_options(context: SessionContext, client_ip: str) -> ServerOptions:
    config = context.config
    ext = config.extensions
    return ServerOptions(
        max_message_size=config.server.max_message_size,
        max_recipients=config.server.max_recipients,
        pipelining=ext.enabled("pipelining"),
        eightbitmime=ext.enabled("8bitmime"),
        smtputf8=ext.enabled("smtputf8"),
        dsn=ext.enabled("dsn"),
        enhanced_status_codes=ext.enabled("enhancedstatuscodes"),
        starttls=context.certificate.context is not None,
        require_tls=config.tls.require,
        # AUTH is offered only when accounts exist (SPEC 2.1) and, by default, only inside TLS; with
        # auth.require_tls = false a loopback client may also authenticate in plaintext (never a remote one).
        auth_mechanisms=tuple(config.auth.mechanisms) if context.users.has_users else (),
        auth_requires_tls=True,
        auth_plaintext_allowed=not config.auth.require_tls and _is_loopback(client_ip),
        chunking=ext.enabled("chunking"),
        binarymime=ext.enabled("binarymime"),
        etrn=ext.enabled("etrn"),
        vrfy=ext.enabled("vrfy"),
        xexch50=ext.enabled("xexch50"),
        x_link2state=ext.enabled("x_link2state"),
    )


@functools.lru_cache(maxsize=4096)
def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class SmtpStream(asyncio.Protocol):
    """The connection under one session: an `asyncio.Protocol` with the reading, flow-control and STARTTLS
    semantics of asyncio's StreamReader/StreamWriter pair that `asyncio.start_server` would give the session,
    at a fraction of the calls per read (no StreamReader, StreamWriter, weak references or bytearray copies).

    Input is buffered as received (reading pauses above 2 x BUFFER_LIMIT unread bytes and resumes at or below
    BUFFER_LIMIT, as StreamReader does with `limit=64 KiB`); the session waits on a future only when nothing
    is buffered. `drain()` waits while the transport has paused writing, as StreamWriter.drain does.
    """

    def __init__(self, on_connect: Callable[[SmtpStream], None]) -> None:
        self._on_connect = on_connect  # told in connection_made; starts the session's task
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self._chunks: list[bytes] = []  # received, not read yet
        self._buffered = 0
        self._eof = False
        self.readable = False  # take() has something to return: data, or b"" at EOF
        self.exception: BaseException | None = None  # the connection was lost with this error
        self._waiter: asyncio.Future[None] | None = None  # the session waits for data
        self._read_paused = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.lost = False
        self._over_ssl = False

    # -- asyncio.Protocol --------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (create_server)
        self._over_ssl = transport.get_extra_info("sslcontext") is not None
        self._on_connect(self)

    def data_received(self, data: bytes) -> None:
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)
        self._chunks.append(data)
        self._buffered += len(data)
        self.readable = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        if not self._read_paused and self._buffered > 2 * BUFFER_LIMIT:
            try:
                self.transport.pause_reading()
            except NotImplementedError:
                pass  # the transport cannot pause: everything is buffered
            else:
                self._read_paused = True

    def eof_received(self) -> bool:
        self._eof = self.readable = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        # True keeps a plain TCP connection open for our replies (half-close); with TLS it has no effect
        return not self._over_ssl

    def connection_lost(self, exc: Exception | None) -> None:
        waiter = self._waiter
        self._waiter = None
        if exc is None:
            self._eof = self.readable = True
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        else:
            self.exception = exc
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        self.lost = True
        if self.write_paused:
            for drain in self._drain_waiters:
                if not drain.done():
                    if exc is None:
                        drain.set_result(None)
                    else:
                        drain.set_exception(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for drain in self._drain_waiters:
            if not drain.done():
                drain.set_result(None)

    # -- reading -----------------------------------------------------------------------------------------
    def wait_data(self) -> asyncio.Future[None]:
        """A future done when data, EOF or an error arrives (then call `take`); one waiter at a time."""
        if self._waiter is not None and not self._waiter.done():
            raise RuntimeError("read() called while another coroutine is already waiting for incoming data")
        if self._read_paused:  # waiting while paused would never end
            self._read_paused = False
            self.transport.resume_reading()
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def take(self, limit: int) -> bytes:
        """Up to `limit` buffered bytes (b"" when none: EOF)."""
        chunks = self._chunks
        if not chunks:
            return b""
        if self._buffered <= limit:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._buffered = 0
            self.readable = self._eof
        else:
            joined = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            data, rest = joined[:limit], joined[limit:]
            chunks[:] = [rest]
            self._buffered = len(rest)
        if self._read_paused and self._buffered <= BUFFER_LIMIT:
            self._read_paused = False
            self.transport.resume_reading()
        return data

    async def read(self, limit: int) -> bytes:
        """StreamReader.read(limit): raise the connection's error, else wait for data or EOF, then take."""
        if self.exception is not None:
            raise self.exception
        if not self.readable:
            await self.wait_data()
        return self.take(limit)

    def discard_buffered(self) -> None:
        """Forget every byte received and not read yet (plaintext before a TLS switch)."""
        self._chunks.clear()
        self._buffered = 0
        self.readable = self._eof
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    # -- writing -----------------------------------------------------------------------------------------
    def drain_needed(self) -> bool:
        """False when `drain()` would return at once without yielding."""
        return self.exception is not None or self.lost or self.write_paused or self.transport.is_closing()

    async def drain(self) -> None:
        """StreamWriter.drain: raise the connection's error, else wait while writing is paused."""
        if self.exception is not None:
            raise self.exception
        if self.transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost() run, so that the loss is seen below
        if self.lost:
            raise ConnectionResetError("Connection lost")
        if not self.write_paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)

    async def start_tls(self, context: ssl.SSLContext, handshake_timeout: float) -> None:
        """Switch to TLS (server side). Plaintext the client sent after STARTTLS may already be buffered; it
        must never be read as if it had come through TLS (CVE-2011-0411 class): it is discarded right before
        the switch, with no yield in between (loop.start_tls pauses the socket before it first yields)."""
        if self.drain_needed():
            await self.drain()
        self.discard_buffered()
        transport = await self._loop.start_tls(
            self.transport, self, context, server_side=True, ssl_handshake_timeout=handshake_timeout
        )
        if transport is None:  # typeshed: None when the transport was closed meanwhile
            raise ConnectionResetError("Connection lost")
        self.transport = transport
        self._over_ssl = transport.get_extra_info("sslcontext") is not None


@dataclass(slots=True)
class Transaction:
    sender: str = ""
    params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    writer: MessageWriter | None = None
    write_failed: bool = False
    write_failure: Reply = replies.TEMP_FAILURE  # a failed write answers 451 4.3.0, or 452 4.3.1 (disk full)
    hops: HopCounter = field(default_factory=HopCounter)
    over_session_size: bool = False
    xexch50: bytes = b""

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class SessionClosed(Exception):
    """The session is over (QUIT, 421, EOF, timeout); the connection is closed by the caller."""


class Session:
    def __init__(self, stream: SmtpStream, context: SessionContext) -> None:
        self.stream = stream
        self.context = context
        self.config = context.config  # one config for the whole session, even across a reload
        self.hostname = self.config.server.hostname
        self.ingest = context.ingest
        self.events = context.events
        peer = stream.transport.get_extra_info("peername")
        self.client_ip: str = peer[0] if isinstance(peer, tuple) else ""
        self.conn = ServerConnection(server_options(context, self.client_ip))
        self.helo = ""
        self.helo_unverified = False  # server.reverse_dns: the client's PTR does not name its HELO
        self.esmtp = False
        self.auth_user = ""
        self.sasl = SaslExchange()
        self.errors = 0
        self.session_bytes = 0  # accepted message bytes so far (max_session_size)
        self.txn = Transaction()
        self.idle = False  # waiting for the client's next command (safe to interrupt)
        # Read deadline (loop clock). One lazy timer per session instead of a timeout per read: it is armed
        # by a read and, when it fires early (the deadline moved on), re-armed for the new deadline.
        self._event_loop = asyncio.get_running_loop()
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False  # waiting for the client's data: the timer may interrupt it
        self._timed_out = False  # the timer cancelled the read
        self._task: asyncio.Task[None] | None = None
        self._out: list[bytes] = []  # replies not written yet: pipelined replies leave in one send()
        self.metrics = context.metrics  # metrics hook: the same observer sees this session open and close
        # Protocol log hook: MAIL and RCPT lines wait here until DATA gives the message its queue id, so that
        # `smtpsvc track` finds them by it (the lines keep their order and their own time).
        self.plog = context.protocol_log
        self._plog_pending: list[str] | None = None  # lines without their queue id; None: not holding
        self._plog_qid = ""  # the queue id of the message being received
        self._plog_bdat = 0  # octets of the BDAT chunks so far (cs-bytes of the BDAT LAST line)
        self._plog_last_size = 0  # octets of the message that DATA carried (cs-bytes of its line)
        if self.plog is not None:
            local = stream.transport.get_extra_info("sockname")
            self._plog_server = (local[0], local[1]) if isinstance(local, tuple) else ("", 0)
        self.refused = False  # connection control refused the client: 554 banner, then only QUIT
        self.refused_commands = 0

    async def run(self) -> None:
        if self.metrics is not None:  # metrics hook
            self.metrics.session_opened()
        self._task = asyncio.current_task()
        try:
            self.stream.transport.write(self.conn.greeting(self._greeting()))
            await self._loop()
        except SessionClosed:
            pass
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Service stop (the server cancels only idle sessions, or busy ones after a grace period). The
            # session task ends here, so the cancellation has done its job and is not propagated further.
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                self._send_unsolicited(replies.SHUTTING_DOWN)
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self.txn.abort()
            if self._plog_pending is not None:
                self._plog_release()
            if self.metrics is not None:  # metrics hook; before the close, which a stop may cancel
                self.metrics.session_closed()
            await self._close()

    def _greeting(self) -> Reply:
        """220, or 554 for a client that connection control (`[connection]`) refuses: before the banner, so
        a refused client never reaches AUTH or MAIL. A local submission (`sendmail -bs`) has no address."""
        rules = self.config.connection
        if not (rules.allow or rules.deny) or self.context.trusted:
            return replies.GREETING(self.hostname)
        if connection_allowed(self.client_ip, rules.allow, rules.deny):
            return replies.GREETING(self.hostname)
        self.refused = True
        text = f"{self.hostname} Access denied: {self.client_ip} may not connect (connection control)"
        reply = Reply(554, "5.7.1", text)
        if self.context.refusals.should_log(self.client_ip):
            self.events.emit(
                events.Event(
                    events.CLIENT_COMMAND_REJECTED,
                    f'The client at "{self.client_ip}" was refused at connect by connection control '
                    f'(connection.allow / connection.deny) with "{reply}"; further connections from this '
                    "address are refused without an event for a minute.",
                    host=self.client_ip,
                    status=reply.enhanced,
                    cause="connection-denied",
                )
            )
        return reply

    async def _close(self) -> None:
        """Flush our last reply, then a short lingering close: half-close and discard what the client still
        sends for a moment, so that a client that pipelined ahead reads our 421 instead of a TCP reset."""
        stream = self.stream
        try:
            transport = stream.transport
            if not transport.is_closing():
                self._flush_out()
                if transport.get_write_buffer_size():
                    async with asyncio.timeout(5):
                        await stream.drain()
                if transport.can_write_eof():
                    transport.write_eof()
                    async with asyncio.timeout(LINGER_SECONDS):
                        while await stream.read(READ_SIZE):
                            pass
        except (ConnectionError, OSError, RuntimeError, TimeoutError):
            pass
        finally:
            stream.transport.close()

    def _reset_deadline(self, seconds: float) -> None:
        self._deadline = self._event_loop.time() + seconds
        if self._timer is not None and self._timer.when() > self._deadline:
            self._timer.cancel()  # the new deadline is sooner (data_timeout < connection_timeout)
            self._timer = None

    def _on_deadline(self) -> None:
        self._timer = None
        if not self._reading:
            return  # the next read re-arms it (a commit or an AUTH check is not cut by the read deadline)
        if self._event_loop.time() < self._deadline:
            self._timer = self._event_loop.call_at(self._deadline, self._on_deadline)
            return
        self._timed_out = True
        assert self._task is not None
        self._task.cancel()

    async def _loop(self) -> None:
        conn = self.conn
        metrics = self.metrics
        out = self._out
        stream = self.stream
        loop = self._event_loop
        connection_timeout = self.config.server.connection_timeout  # one config for the whole session
        refused = self.refused  # a refused client's deadline is never extended (REFUSED_SECONDS in all)
        self._reset_deadline(REFUSED_SECONDS if refused else connection_timeout)
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                # Read (inline: this runs for every command): reply, wait for the client, with a deadline.
                self.idle = self.txn.writer is None
                try:
                    self._flush_out()  # RFC 2920 §3.1: every pending reply goes out before we wait
                    if loop.time() >= self._deadline:
                        raise TimeoutError
                    if self._timer is None:
                        self._timer = loop.call_at(self._deadline, self._on_deadline)
                    if stream.drain_needed() or not stream.readable:
                        # The timer may interrupt both waits: a client that stops reading our replies
                        # (writing paused) is cut at the deadline like one that stops sending.
                        self._reading = True
                        try:
                            if stream.drain_needed():
                                await stream.drain()
                            if stream.exception is None and not stream.readable:
                                await stream.wait_data()
                        except asyncio.CancelledError:
                            if not self._timed_out:
                                raise  # the service is stopping
                            self._timed_out = False
                            assert self._task is not None
                            self._task.uncancel()
                            raise TimeoutError from None
                        finally:
                            self._reading = False
                    if stream.exception is not None:
                        raise stream.exception  # the connection was lost with an error
                    data = stream.take(READ_SIZE)
                except TimeoutError:
                    self._send_unsolicited(replies.SERVICE_CLOSING_TIMEOUT)
                    raise SessionClosed from None
                finally:
                    self.idle = False
                conn.receive_data(data)
                continue
            kind = type(event)  # the core's events are final classes: dispatch on the exact type
            if kind is DataChunk:
                self._store(event.data)  # type: ignore[union-attr, arg-type]
                continue
            if metrics is not None:  # metrics hook: commands by verb
                metrics.protocol_event(event)
            if kind is Bdat:
                if self.plog is not None:
                    self._plog_bdat += event.size  # type: ignore[union-attr]
                self._bdat_chunk_starts()
                continue
            if kind is ConnectionClosed:
                raise SessionClosed
            if kind is not Data and kind is not BdatEnd and not refused:
                # a complete command arrived: the next one gets a fresh idle allowance
                self._reset_deadline(connection_timeout)
            started = time.monotonic() if self.plog is not None else 0.0
            answer = _ANSWER_NOW.get(kind)
            reply = answer(self, event) if answer is not None else None
            if reply is None:  # an answer that waits (commit, AUTH check, reverse DNS, ETRN)
                reply = await self._answer(event)
            sent = conn.send(reply)
            out.append(sent)
            if self.plog is not None:  # protocol log hook
                self._plog_line(event, reply, len(sent), started)
            if metrics is not None:  # metrics hook: replies by class
                metrics.reply(reply.code)
            if reply.code == 221 or reply.code == 421:
                raise SessionClosed
            if kind is StartTls and reply.code == 220:
                self._flush_out()
                await self._start_tls()

    def _plog_line(self, event: object, reply: Reply, sc_bytes: int, started: float) -> None:
        """One protocol log line for a command and our reply (IIS logs DATA once, at its end)."""
        kind = type(event)
        if kind is Data and reply.code == 354:
            return
        method, query, cs_bytes = logged_command(event)
        if kind is DataEnd or kind is BdatEnd:
            cs_bytes = self._plog_size
            self._plog_bdat = 0
        elif kind is Mail and reply.code == 250:
            if self._plog_pending is not None:
                self._plog_release()
            self._plog_pending = []
        server_ip, server_port = self._plog_server
        text = protolog.line(
            time.time(),
            client_ip=self.client_ip,
            username=self.helo,
            computer=self.hostname,
            server_ip=server_ip,
            server_port=server_port,
            method=method,
            query=query,
            status=reply.code,
            sc_bytes=sc_bytes,
            cs_bytes=cs_bytes,
            taken_ms=int((time.monotonic() - started) * 1000),
            queue_id="",
        )
        if self._plog_pending is not None:
            self._plog_pending.append(text[: -len(" -\n")])
        else:
            assert self.plog is not None
            self.plog.write(text)
        ends = kind is DataEnd or (kind is BdatEnd and event.last) or kind is Rset  # type: ignore[attr-defined]
        if self._plog_pending is not None and (ends or kind in (Ehlo, Helo, Quit)):
            self._plog_release()

    @property
    def _plog_size(self) -> int:
        return self._plog_bdat or self._plog_last_size

    def _plog_release(self) -> None:
        """Write the held lines, now with the queue id of the message they made (none when it was not)."""
        pending, self._plog_pending = self._plog_pending or [], None
        qid, self._plog_qid = protolog.field(self._plog_qid), ""
        assert self.plog is not None
        for text in pending:
            self.plog.write(f"{text} {qid}\n")

    def _flush_out(self) -> None:
        if self._out:
            self.stream.transport.write(self._out[0] if len(self._out) == 1 else b"".join(self._out))
            self._out.clear()

    def _send_unsolicited(self, reply: Reply) -> None:
        """A 421 the server may send at any time (RFC 5321 §3.8): timeout, shutdown."""
        self._flush_out()
        self.stream.transport.write(reply.to_bytes(self.config.extensions.enabled("enhancedstatuscodes")))

    def _store(self, data: bytes) -> None:
        """Client message data: counted for hops and session size, streamed to the spool."""
        txn = self.txn
        writer = txn.writer
        if writer is None or txn.write_failed or txn.over_session_size:
            return
        txn.hops.feed(data)
        limit = self.config.server.max_session_size
        if limit and self.session_bytes + writer.size + len(data) > limit:
            txn.over_session_size = True  # keep draining; the end of DATA gets a 552
            writer.abort()
            return
        self._write(data)

    def _write(self, data: bytes) -> None:
        writer = self.txn.writer
        if writer is None or self.txn.write_failed:
            return
        try:
            writer.write(data)
        except QueueError as exc:
            self.txn.write_failed = True  # keep draining; the end of DATA gets a 451 (452 when full)
            self.txn.write_failure = _queue_failure(exc)

    # -- answers -----------------------------------------------------------------------------------------
    # The answers that never wait are plain methods, found by the event's type in _ANSWER_NOW (below the
    # class); they return None when this case needs to wait after all. `_answer` handles every event.
    def _hello_now(self, event: Ehlo | Helo) -> Reply | None:
        if self._ptr_check_needed():
            return None
        self.txn.abort()
        self.txn = Transaction()
        return self._hello(event, True)

    def _hello(self, event: Ehlo | Helo, matches_ptr: bool) -> Reply:
        self.helo = event.name
        self.esmtp = type(event) is Ehlo
        self.helo_unverified = not matches_ptr
        if self.esmtp:
            return replies.EHLO_REPLY(self.hostname, self.client_ip, self.conn.ehlo_keywords())
        return replies.HELO_REPLY(self.hostname, self.client_ip)

    def _mail(self, event: Mail) -> Reply:
        self.txn = Transaction(sender=event.address, params=event.params)
        return replies.SENDER_OK(event.address)

    def _data(self, event: Data) -> Reply:
        return self._start_data()

    def _rset(self, event: Rset) -> Reply:
        self.txn.abort()
        self.txn = Transaction()
        return replies.RESET

    def _noop(self, event: Noop) -> Reply:
        return replies.OK

    def _quit(self, event: Quit) -> Reply:
        return replies.QUIT_REPLY(self.hostname)

    async def _answer(self, event: object) -> Reply:
        """The answer to every event `_ANSWER_NOW` has no method for, and to EHLO/HELO when the reverse DNS
        check must wait for a lookup."""
        match event:
            case Ehlo() | Helo():
                self.txn.abort()
                self.txn = Transaction()
                return self._hello(event, await self._helo_matches_ptr(event.name))
            case DataEnd(error=error):
                return await self._end_data(error)
            case Help():
                return replies.HELP_REPLY
            case Vrfy():
                return (
                    replies.VRFY_CANNOT if self.config.extensions.enabled("vrfy") else replies.NOT_IMPLEMENTED
                )
            case Expn():
                return replies.NOT_IMPLEMENTED
            case BdatEnd():
                return await self._bdat_end(event)
            case StartTls():
                return replies.READY_TLS if self.context.certificate.context else replies.TLS_NOT_AVAILABLE
            case Auth(mechanism=mechanism, initial=initial):
                return await self._auth(self.sasl.start(mechanism, initial))
            case AuthResponse(data=data):
                return await self._auth(self.sasl.respond(data))
            case Etrn(arg=arg):
                return await self._etrn(arg)
            case Xexch50():
                if not self.conn.authenticated:
                    return self._refuse_logged(
                        "XEXCH50", replies.NEED_AUTH_XEXCH50, "xexch50-unauthenticated"
                    )
                return replies.XEXCH50_GO
            case Xexch50Blob(data=data):
                self.txn.xexch50 = data  # opaque; stored with the message, never interpreted
                return replies.OK
            case XLink2State():
                # Exchange answers a peer outside its routing group 504 before AUTH; after it we acknowledge
                # and drop the state (never part of our routing) so the peer goes on to send mail, not a 500.
                if not self.conn.authenticated:
                    return self._refuse_logged(
                        "X-LINK2STATE", replies.NEED_AUTH_XEXCH50, "x-link2state-unauthenticated"
                    )
                return replies.LINK2STATE_IGNORED
            case Rejected(reply=reply, close=close):
                if self.refused:  # after the 554 banner: 503 (the core's answer) until the bound, then 421
                    self.refused_commands += 1
                    if self.refused_commands >= REFUSED_COMMANDS:
                        return Reply(421, "4.7.1", f"{self.hostname} Access denied; closing connection")
                    return reply
                self.errors += 1
                if close:
                    return Reply(421, "4.7.0", f"{self.hostname} {reply.text}; closing connection")
                if self.errors >= self.config.server.max_errors:
                    return replies.TOO_MANY_ERRORS
                return reply
        raise AssertionError(f"unhandled protocol event {event!r}")

    def _rcpt(self, event: Rcpt) -> Reply:
        address = postmaster_address(event.address, self.config)  # the core lets no other bare name through
        decision = check_recipient(
            self.client_ip,
            address,
            self.config,
            authenticated=bool(self.auth_user) or self.context.trusted,
            source_route=event.source_route,
        )
        if not decision.allowed:
            return self._deny_relay(address, decision.rule)
        notify = event.params.get("NOTIFY")
        self.txn.recipients.append(
            Recipient(
                address=address,
                notify=tuple(n.strip().upper() for n in notify.split(",")) if notify else (),
                orcpt=_xtext(event.params.get("ORCPT")),
            )
        )
        return replies.RCPT_OK(address)

    def _deny_relay(self, address: str, rule: str) -> Reply:
        return self._refuse_logged("RCPT", replies.RELAY_DENIED(address), f"relay-denied:{rule}")

    def _refuse_logged(self, verb: str, reply: Reply, cause: str) -> Reply:
        """A refusal an operator should see: event 7010 in the IIS wording. It counts towards max_errors, so
        a client probing for a relay (or guessing) is cut off and cannot flood the event log."""
        self.errors += 1
        if self.errors >= self.config.server.max_errors and reply.code != 421:
            reply = replies.TOO_MANY_ERRORS
        self.events.emit(
            events.Event(
                events.CLIENT_COMMAND_REJECTED,
                f'The client at "{self.client_ip}" sent a "{verb}" command, and the SMTP server responded '
                f'with "{reply}".',
                host=self.client_ip,
                status=reply.enhanced,
                cause=cause,
            )
        )
        return reply

    # -- STARTTLS, AUTH, ETRN ------------------------------------------------------------------------
    async def _start_tls(self) -> None:
        context = self.context.certificate.context
        assert context is not None
        await self.stream.drain()
        # Plaintext the client sent after STARTTLS may already sit in the stream's buffer; it must never be
        # read as if it had come through TLS (CVE-2011-0411 class). SmtpStream.start_tls discards it right
        # before the switch (nothing can arrive in between: start_tls pauses the socket before it next
        # yields); whatever the client sends after the handshake is TLS. The protocol core drops what it
        # had buffered.
        try:
            await self.stream.start_tls(
                context, min(TLS_HANDSHAKE_TIMEOUT, self.config.server.connection_timeout)
            )
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as exc:
            raise SessionClosed from exc
        self.conn.tls_established()
        self.helo, self.esmtp, self.auth_user = "", False, ""
        self.txn.abort()
        self.txn = Transaction()

    async def _auth(self, step: Reply | Credentials) -> Reply:
        if isinstance(step, Reply):
            return step
        gate = self.context.auth_gate or LocalAuthGate(lambda: self.context.limiter)
        blocked, delay = await gate.check(self.client_ip)
        if blocked:
            return self._refuse_logged("AUTH", replies.AUTH_TOO_MANY_FAILURES, "auth-rate-limited")
        if delay:
            await asyncio.sleep(delay)  # a growing pause slows password guessing from one client
        try:
            ok = await asyncio.to_thread(self.context.users.verify, step.username, step.password)
        except Exception as exc:  # an unreadable store must not look like a wrong password
            self.events.emit(
                events.Event(
                    events.CLIENT_COMMAND_REJECTED,
                    f'The client at "{self.client_ip}" sent an "AUTH" command, and the SMTP server responded '
                    f'with "{replies.AUTH_TEMP_FAILURE}": the accounts cannot be checked ({exc})',
                    host=self.client_ip,
                    status=replies.AUTH_TEMP_FAILURE.enhanced,
                    cause="auth-unavailable",
                )
            )
            return replies.AUTH_TEMP_FAILURE
        if ok:
            gate.succeeded(self.client_ip)
            self.auth_user = step.username
            return replies.AUTH_OK
        if await gate.failed(self.client_ip):
            return self._refuse_logged("AUTH", replies.AUTH_TOO_MANY_FAILURES, "auth-rate-limited")
        return self._refuse_logged("AUTH", replies.AUTH_FAILED, "auth-failed")

    async def _etrn(self, arg: str) -> Reply:
        node = arg.lstrip("@#")
        if arg.startswith("#"):
            return replies.ETRN_UNKNOWN(arg)  # named queues are not offered
        if not check_recipient(
            self.client_ip, f"postmaster@{node}", self.config, authenticated=bool(self.auth_user)
        ).allowed:
            return self._refuse_logged("ETRN", replies.ETRN_NOT_ALLOWED(arg), "etrn-not-allowed")
        try:
            count = await self.context.etrn(node, arg.startswith("@"))
        except QueueError:
            return replies.ETRN_UNKNOWN(arg)  # the shared queue is unreachable: 458, the client may retry
        return replies.ETRN_OK(arg) if count else replies.ETRN_NOTHING(arg)

    def _ptr_check_needed(self) -> bool:
        return bool(self.config.server.reverse_dns and self.context.resolver is not None and self.client_ip)

    async def _helo_matches_ptr(self, name: str) -> bool:
        """KB303734 reverse lookup: does a PTR name of the client's address equal its HELO/EHLO name?
        Only annotates the Received header ("unverified"); never refuses."""
        resolver = self.context.resolver
        if not self.config.server.reverse_dns or resolver is None or not self.client_ip:
            return True
        names = await resolver.reverse_names(self.client_ip)
        return name.rstrip(".").lower() in names

    def _protocol_name(self) -> str:
        """RFC 3848 "with" keyword for the Received header."""
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.conn.tls else "") + ("A" if self.auth_user else "")

    def _start_data(self) -> Reply:
        return replies.START_DATA if self._open_message() else self.txn.write_failure

    def _open_message(self) -> bool:
        """A spool writer for the message now arriving (DATA, or the first BDAT chunk), with our Received."""
        try:
            writer = self.ingest.begin()
        except QueueError as exc:
            self.txn.write_failure = _queue_failure(exc)
            return False
        self.txn.writer = writer
        self.txn.write_failed = False
        self._plog_qid = writer.id  # protocol log hook: the id the held MAIL and RCPT lines get
        self._reset_deadline(self.config.server.data_timeout)
        self._write(
            received_header(
                hostname=self.hostname,
                queue_id=writer.id,
                helo=self.helo,
                client_ip=self.client_ip,
                protocol=self._protocol_name(),
                unverified=self.helo_unverified,
                auth_user=self.auth_user,
            )
        )
        return True

    def _bdat_chunk_starts(self) -> None:
        if self.txn.writer is None and not self.txn.write_failed:
            if not self._open_message():
                self.txn.write_failed = True  # consume the chunks; the reply to this BDAT is a 451
        else:
            self._reset_deadline(self.config.server.data_timeout)

    async def _bdat_end(self, event: BdatEnd) -> Reply:
        if event.error is not None or not event.last:
            if event.error is None and not self.txn.write_failed and not self.txn.over_session_size:
                return replies.BDAT_OK(self.conn.chunk_size)
            if not event.last:
                # this chunk failed: the core repeats our reply for the message's remaining chunks
                reply = event.error or (
                    SESSION_TOO_BIG if self.txn.over_session_size else self.txn.write_failure
                )
                self.txn.abort()
                return reply
        return await self._end_data(event.error)

    async def _end_data(self, error: Reply | None) -> Reply:
        ended = time.monotonic()  # metrics hook: the end of the data, for the accept duration
        txn, self.txn = self.txn, Transaction()
        self._reset_deadline(self.config.server.connection_timeout)
        writer = txn.writer
        if writer is None:
            return error or txn.write_failure
        self._plog_last_size = writer.size  # protocol log hook
        if error is not None or txn.write_failed or txn.over_session_size:
            writer.abort()
            if txn.over_session_size and error is None:
                return SESSION_TOO_BIG
            return error or txn.write_failure
        if txn.hops.received > self.config.server.max_hop_count:
            # A loop: refused in session, never bounced (SPEC 2.1).
            writer.abort()
            return replies.TOO_MANY_HOPS
        body = txn.params.get("BODY") or ""
        fields = EnvelopeFields(
            sender=self._masquerade(txn.sender),
            recipients=txn.recipients,
            source=Source.SMTP,
            client_ip=self.client_ip,
            helo=self.helo,
            auth_user=self.auth_user,
            body=body.upper(),
            ret=(txn.params.get("RET") or "").upper(),
            envid=_xtext(txn.params.get("ENVID")),
            smtputf8="SMTPUTF8" in txn.params,
            xexch50=txn.xexch50,
        )
        try:
            envelope = await self.ingest.commit(writer, fields)
        except QueueError as exc:
            writer.abort()
            return _queue_failure(exc)
        self.session_bytes += envelope.size
        if self.metrics is not None:  # metrics hook: end of data → 250, the fsync included
            self.metrics.message_accepted(time.monotonic() - ended)
        return replies.QUEUED(envelope.id)

    def _masquerade(self, sender: str) -> str:
        """MasqueradeDomain: a local domain in MAIL FROM is replaced, on this first hop only."""
        masquerade = self.config.server.masquerade_domain
        if not masquerade:
            return sender
        local, domain = split_address(sender) if sender else ("", "")
        if masquerade and domain and domain.rstrip(".").lower() in self.config.local_domains:
            return f"{local}@{masquerade}"
        return sender


def _queue_failure(exc: QueueError) -> Reply:
    """The answer when the queue cannot take the message: 452 4.3.1 for a full disk, else 451 4.3.0."""
    return MAIL_SYSTEM_FULL if exc.full else replies.TEMP_FAILURE


def _xtext(value: str | None) -> str:
    """DSN parameters arrive xtext-encoded (RFC 3461 §4); we store them decoded, as reports echo them."""
    if not value:
        return ""
    try:
        return xtext_decode(value)
    except ValueError:
        return value


# The answers that never wait, by event type (see Session._answer for every event).
_ANSWER_NOW: dict[type, Callable[[Session, Any], Reply | None]] = {
    Ehlo: Session._hello_now,
    Helo: Session._hello_now,
    Mail: Session._mail,
    Rcpt: Session._rcpt,
    Data: Session._data,
    Rset: Session._rset,
    Noop: Session._noop,
    Quit: Session._quit,
}
