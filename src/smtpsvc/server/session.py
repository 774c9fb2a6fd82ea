"""One inbound SMTP session: drives the sans-I/O `ServerConnection` over an asyncio stream.

The protocol core decides syntax, sequencing and limits; this adapter supplies the policy answers (relay,
queueing) and the I/O: reads with timeouts, streams DATA chunks into the spool, and sends `250 2.6.0`
only after the queue has made the message durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from smtpsvc import events
from smtpsvc.config import Config
from smtpsvc.events import EventLog
from smtpsvc.headers import HopCounter
from smtpsvc.ingest import EnvelopeFields, Ingest, received_header
from smtpsvc.model import Recipient, Source
from smtpsvc.protocol import (
    NEED_DATA,
    ConnectionClosed,
    Data,
    DataChunk,
    DataEnd,
    Ehlo,
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
    Vrfy,
    replies,
    split_address,
    xtext_decode,
)
from smtpsvc.queue.base import MessageWriter, QueueError
from smtpsvc.routing.categorizer import check_recipient

READ_SIZE = 64 * 1024
SESSION_TOO_BIG = Reply(552, "5.3.4", "Session size limit exceeded (max_session_size); send the rest anew")
LINGER_SECONDS = 1.0


def server_options(config: Config) -> ServerOptions:
    ext = config.extensions
    return ServerOptions(
        max_message_size=config.server.max_message_size,
        max_recipients=config.server.max_recipients,
        pipelining=ext.enabled("pipelining"),
        eightbitmime=ext.enabled("8bitmime"),
        smtputf8=ext.enabled("smtputf8"),
        dsn=ext.enabled("dsn"),
        enhanced_status_codes=ext.enabled("enhancedstatuscodes"),
    )


@dataclass(slots=True)
class Transaction:
    sender: str = ""
    params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    writer: MessageWriter | None = None
    write_failed: bool = False
    hops: HopCounter = field(default_factory=HopCounter)
    over_session_size: bool = False

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


class SessionClosed(Exception):
    """The session is over (QUIT, 421, EOF, timeout); the connection is closed by the caller."""


class Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        config: Config,
        ingest: Ingest,
        event_log: EventLog,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.config = config
        self.ingest = ingest
        self.events = event_log
        peer = writer.get_extra_info("peername")
        self.client_ip: str = peer[0] if isinstance(peer, tuple) else ""
        self.conn = ServerConnection(server_options(config))
        self.helo = ""
        self.esmtp = False
        self.errors = 0
        self.session_bytes = 0  # accepted message bytes so far (max_session_size)
        self.txn = Transaction()
        self.idle = False  # waiting for the client's next command (safe to interrupt)
        self._deadline = 0.0

    @property
    def hostname(self) -> str:
        return self.config.server.hostname

    async def run(self) -> None:
        try:
            self.writer.write(self.conn.greeting(replies.GREETING(self.hostname)))
            await self._loop()
        except SessionClosed:
            pass
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        except asyncio.CancelledError:
            # Service stop (the server cancels only idle sessions, or busy ones after a grace period). The
            # session task ends here, so the cancellation has done its job and is not propagated further.
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                self._send_unsolicited(replies.SHUTTING_DOWN)
        finally:
            self.txn.abort()
            await self._close()

    async def _close(self) -> None:
        """Flush our last reply, then a short lingering close: half-close and discard what the client still
        sends for a moment, so that a client that pipelined ahead reads our 421 instead of a TCP reset."""
        with contextlib.suppress(ConnectionError, OSError, RuntimeError, TimeoutError):
            if not self.writer.is_closing():
                await asyncio.wait_for(self.writer.drain(), 5)
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                    deadline = time.monotonic() + LINGER_SECONDS
                    while (remaining := deadline - time.monotonic()) > 0:
                        if not await asyncio.wait_for(self.reader.read(READ_SIZE), remaining):
                            break
        self.writer.close()

    def _reset_deadline(self, seconds: float) -> None:
        self._deadline = time.monotonic() + seconds

    async def _read(self) -> bytes:
        await self.writer.drain()
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        return await asyncio.wait_for(self.reader.read(READ_SIZE), remaining)

    async def _loop(self) -> None:
        self._reset_deadline(self.config.server.connection_timeout)
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                self.idle = self.txn.writer is None
                try:
                    data = await self._read()
                except TimeoutError:
                    self._send_unsolicited(replies.SERVICE_CLOSING_TIMEOUT)
                    raise SessionClosed from None
                finally:
                    self.idle = False
                self.conn.receive_data(data)
                continue
            if isinstance(event, DataChunk):
                self._store(event.data)
                continue
            if isinstance(event, ConnectionClosed):
                raise SessionClosed
            if not isinstance(event, Data):
                # a complete command arrived: the next one gets a fresh idle allowance
                self._reset_deadline(self.config.server.connection_timeout)
            reply = await self._answer(event)
            self._send(reply)
            if reply.code == 221 or reply.code == 421:
                raise SessionClosed

    def _send(self, reply: Reply) -> None:
        self.writer.write(self.conn.send(reply))

    def _send_unsolicited(self, reply: Reply) -> None:
        """A 421 the server may send at any time (RFC 5321 §3.8): timeout, shutdown."""
        self.writer.write(reply.to_bytes(self.config.extensions.enabled("enhancedstatuscodes")))

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
        except QueueError:
            self.txn.write_failed = True  # keep draining; the end of DATA gets a 451

    async def _answer(self, event: object) -> Reply:
        match event:
            case Ehlo(name=name) | Helo(name=name):
                self.txn.abort()
                self.txn = Transaction()
                self.helo = name
                self.esmtp = isinstance(event, Ehlo)
                if self.esmtp:
                    return replies.EHLO_REPLY(self.hostname, self.client_ip, self.conn.ehlo_keywords())
                return replies.HELO_REPLY(self.hostname, self.client_ip)
            case Mail():
                self.txn = Transaction(sender=event.address, params=event.params)
                return replies.SENDER_OK(event.address)
            case Rcpt():
                return self._rcpt(event)
            case Data():
                return self._start_data()
            case DataEnd(error=error):
                return await self._end_data(error)
            case Rset():
                self.txn.abort()
                self.txn = Transaction()
                return replies.RESET
            case Noop():
                return replies.OK
            case Quit():
                return replies.QUIT_REPLY(self.hostname)
            case Help():
                return replies.HELP_REPLY
            case Vrfy():
                return (
                    replies.VRFY_CANNOT if self.config.extensions.enabled("vrfy") else replies.NOT_IMPLEMENTED
                )
            case Expn():
                return replies.NOT_IMPLEMENTED
            case Rejected(reply=reply, close=close):
                self.errors += 1
                if close:
                    return Reply(421, "4.7.0", f"{self.hostname} {reply.text}; closing connection")
                if self.errors >= self.config.server.max_errors:
                    return replies.TOO_MANY_ERRORS
                return reply
        raise AssertionError(f"unhandled protocol event {event!r}")

    def _rcpt(self, event: Rcpt) -> Reply:
        address = event.address
        local, domain = split_address(address)
        if not domain:
            # RFC 5321 §4.1.1.3: <postmaster> without a domain is this server's postmaster (the core lets
            # no other domainless address through).
            address = f"{local}@{self.config.local_domains[0]}"
        decision = check_recipient(self.client_ip, address, self.config, source_route=event.source_route)
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
        reply = replies.RELAY_DENIED(address)
        self.events.emit(
            events.Event(
                events.CLIENT_COMMAND_REJECTED,
                f'The client at "{self.client_ip}" sent a "RCPT" command, and the SMTP server responded with '
                f'"{reply}".',
                host=self.client_ip,
                status=reply.enhanced,
                cause=f"relay-denied:{rule}",
            )
        )
        return reply

    def _start_data(self) -> Reply:
        try:
            writer = self.ingest.begin()
        except QueueError:
            return replies.TEMP_FAILURE
        self.txn.writer = writer
        self.txn.write_failed = False
        self._reset_deadline(self.config.server.data_timeout)
        self._write(
            received_header(
                hostname=self.hostname,
                queue_id=writer.id,
                helo=self.helo,
                client_ip=self.client_ip,
                protocol="ESMTP" if self.esmtp else "SMTP",
            )
        )
        return replies.START_DATA

    async def _end_data(self, error: Reply | None) -> Reply:
        txn, self.txn = self.txn, Transaction()
        self._reset_deadline(self.config.server.connection_timeout)
        writer = txn.writer
        if writer is None:
            return error or replies.TEMP_FAILURE
        if error is not None or txn.write_failed or txn.over_session_size:
            writer.abort()
            if txn.over_session_size and error is None:
                return SESSION_TOO_BIG
            return error or replies.TEMP_FAILURE
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
            body=body.upper(),
            ret=(txn.params.get("RET") or "").upper(),
            envid=_xtext(txn.params.get("ENVID")),
            smtputf8="SMTPUTF8" in txn.params,
        )
        try:
            envelope = await self.ingest.commit(writer, fields)
        except QueueError:
            writer.abort()
            return replies.TEMP_FAILURE
        self.session_bytes += envelope.size
        return replies.QUEUED(envelope.id)

    def _masquerade(self, sender: str) -> str:
        """MasqueradeDomain: a local domain in MAIL FROM is replaced, on this first hop only."""
        masquerade = self.config.server.masquerade_domain
        local, domain = split_address(sender) if sender else ("", "")
        if masquerade and domain and domain.rstrip(".").lower() in self.config.local_domains:
            return f"{local}@{masquerade}"
        return sender


def _xtext(value: str | None) -> str:
    """DSN parameters arrive xtext-encoded (RFC 3461 §4); we store them decoded, as reports echo them."""
    if not value:
        return ""
    try:
        return xtext_decode(value)
    except ValueError:
        return value
