"""Outbound SMTP: one delivery attempt of one message to one next hop (smart host or MX list).

Drives the sans-I/O `ClientConnection` over asyncio streams: greeting, EHLO (HELO when EHLO is refused),
MAIL and RCPT pipelined when the peer offers PIPELINING, one reply per RCPT tracked, DATA streamed from the
queued message (an open, seekable handle from the queue: the spool file, or PostgreSQL's bytes) with
dot-stuffing, QUIT. Hosts are tried in order; a host that cannot be reached, or greets with
an error, passes the attempt to the next one. Every recipient ends with a DeliveryResult whose `permanent`
bit is what the scheduler acts on. The conversation is kept as a transcript for diagnosis.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from smtpsvc.delivery.downgrade import DowngradeError, downgrade_to_7bit, needs_downgrade
from smtpsvc.delivery.healing import PEER_LACKS_8BITMIME, PEER_REJECTS_EHLO, XEXCH50_BLOCKED, PeerMemory
from smtpsvc.model import DeliveryResult, Envelope, Recipient
from smtpsvc.protocol import (
    NEED_DATA,
    Capabilities,
    ClientConnection,
    ConnectionClosed,
    RemoteProtocolError,
    Reply,
    ServerReply,
    mail_arg,
    rcpt_arg,
    xtext_encode,
)
from smtpsvc.protocol.sasl import encode_login, encode_plain
from smtpsvc.routing.mx import NextHop

READ_SIZE = 64 * 1024
BODY_CHUNK = 256 * 1024
SMALL_TAIL = 16 * 1024  # a last body piece up to this size is sent in one write with the final "."
XEXCH50_REPLY_TIMEOUT = 60.0  # the blob's 250 comes at once from a real peer (KB818222)

DROPPED = "The connection was dropped by the remote host."
CANNOT_CONNECT = "The remote server did not respond to a connection attempt."


@dataclass(frozen=True, slots=True)
class HopPolicy:
    """How to talk to the next hop: TLS policy, credentials (smart host AUTH), HELO instead of EHLO."""

    tls: str = "opportunistic"  # "none" | "opportunistic" | "required"
    auth_user: str = ""
    auth_password: str = field(default="", repr=False)
    use_helo: bool = False
    xexch50: bool = False  # send the XEXCH50 blob when the peer offers it (internal routes only)


@dataclass(slots=True)
class HopFailure:
    """This host could not take the message at all; the next host may."""

    host: str  # "name[ip]:port"
    reason: str  # IIS-worded reason for events 4006/4000
    reply: str = ""  # the reply that caused it, if any
    permanent: bool = False  # a 5xx greeting/EHLO/MAIL for the whole transaction


@dataclass(slots=True)
class SmtpOutcome:
    results: list[DeliveryResult] = field(default_factory=list)
    host_failures: list[HopFailure] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)  # for event 7004
    learned: list[tuple[str, str]] = field(default_factory=list)  # (host, healing cause) for event 3010


@dataclass(frozen=True, slots=True)
class Rejection:
    """The remote host refused a command we sent (IIS event 7004)."""

    host: str
    verb: str
    reply: str
    command: str


_NO_KEYWORDS: dict[str, tuple[str, ...]] = {}  # the EHLO keywords after HELO: none (never changed)


def _reply_text(reply: Reply) -> str:
    """`str(reply)`; for the usual one-line reply built directly (speed: Reply.__str__ renders through a list
    of lines, and this runs several times per message)."""
    if reply.more:
        return str(reply)
    if reply.enhanced:
        return f"{reply.code} {reply.enhanced} {reply.text}"
    return f"{reply.code} {reply.text}"


class _Dropped(Exception):
    pass


class _TlsFailed(Exception):
    pass


def client_tls_context(policy: str) -> ssl.SSLContext:
    """`required`: the peer's certificate must verify against the system's CAs and name the host.
    `opportunistic`: encrypt whatever the certificate (RFC 7435): better than plaintext, no false failure."""
    context = ssl.create_default_context()
    if policy != "required":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Peer:
    """A connected next hop: reads replies with a deadline, records the conversation."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeout: float,
        transcript: list[str],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.conn = ClientConnection()
        self.rejections: list[Rejection] = []
        self.learned: list[tuple[str, str]] = []
        self.memory_key = ""
        self.phase = "greeting"  # what we were doing, to name the cause when the peer drops us
        self.sent_8bit = False
        self.tls = False
        self.caps: Capabilities | None = None
        self.messages = 0  # messages sent on this connection
        self.reusable = False
        self.transcript = transcript
        self._t0 = time.monotonic()
        self._timed_out = False  # the read deadline passed: the reader is failed, the connection is done

    def log(self, direction: str, text: str) -> None:
        self.transcript.append(f"{time.monotonic() - self._t0:8.3f} {direction} {text}")

    def command(self, verb: str, arg: str = "", *, secret: bool = False) -> None:
        self.phase = verb.upper()
        self.writer.write(self.conn.send_command(verb, arg))
        self.log(">", f"{verb} <redacted>" if secret else f"{verb} {arg}".rstrip())

    def pipeline(self, commands: Sequence[tuple[str, str]]) -> None:
        """Several commands sent together (RFC 2920): what command() does for each, in one write (speed:
        one call down to the transport instead of one per command; the same bytes go out)."""
        out: list[bytes] = []
        try:
            for verb, arg in commands:
                self.phase = verb.upper()
                out.append(self.conn.send_command(verb, arg))
                self.log(">", f"{verb} {arg}".rstrip())
        finally:  # a refused argument raises after the commands before it were sent, as with command()
            if out:
                self.writer.write(b"".join(out))

    def auth_response(self, response: str) -> None:
        """A line of an AUTH exchange: never logged (it carries the credentials)."""
        self.writer.write(self.conn.send_auth_response(response))
        self.log(">", "<AUTH response redacted>")

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.writer.drain()
        buffered = getattr(self.reader, "_buffer", None)  # plaintext before the handshake is void
        if isinstance(buffered, bytearray):
            buffered.clear()
        try:
            await self.writer.start_tls(
                context, server_hostname=server_hostname, ssl_handshake_timeout=self.timeout
            )
        except (ssl.SSLError, ssl.CertificateError, ConnectionError, OSError, TimeoutError) as exc:
            self.log("!", f"TLS handshake failed: {exc}")
            raise _TlsFailed(str(exc)) from exc
        self.conn.tls_established()
        self.tls = True
        cipher = self.writer.get_extra_info("cipher")
        self.log(
            "=", f"TLS established: {cipher[1] if cipher else ''} {cipher[0] if cipher else ''}".rstrip()
        )

    async def reply(self) -> Reply:
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self.log("!", f"protocol error: {exc}")
                raise _Dropped from exc
            if isinstance(event, ServerReply):
                reply = event.reply
                if reply.more:
                    for line in str(reply).split("\n"):
                        self.log("<", line)
                else:
                    self.log("<", _reply_text(reply))
                return reply
            if isinstance(event, ConnectionClosed):
                self.log("!", "connection closed by peer")
                raise _Dropped
            assert event is NEED_DATA
            try:
                await self.writer.drain()
                data = await self._read()
            except TimeoutError:
                self.log("!", f"no reply within {self.timeout:g}s")
                raise _Dropped from None
            except (ConnectionError, OSError) as exc:
                self.log("!", f"connection error: {exc}")
                raise _Dropped from exc
            self.conn.receive_data(data)

    async def _read(self) -> bytes:
        """One read, which fails with TimeoutError when nothing comes within `timeout` seconds.

        Speed: not `asyncio.timeout()`, whose Timeout object, task lookup and cancel/uncancel protocol cost
        about 3.5 µs per read (two reads per message): a plain timer fails the reader instead, which wakes the
        read with the error. That leaves the reader failed for good, which is fine: a read that timed out
        drops the connection. No task is cancelled, so a cancellation from outside is never mistaken for the
        deadline, nor the other way round."""
        if self._timed_out:
            raise TimeoutError
        timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)
        try:
            data = await self.reader.read(READ_SIZE)
        finally:
            timer.cancel()
        if self._timed_out:  # the deadline passed just as the data came: a timeout, as asyncio.timeout says
            raise TimeoutError
        return data

    def _expire(self) -> None:
        self._timed_out = True
        self.reader.set_exception(TimeoutError())

    async def quit(self) -> None:
        """Polite end: QUIT, a short wait for its reply, close."""
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.command("QUIT")
                await asyncio.wait_for(self.reply(), 5)
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2)


class ConnectionPool:
    """Idle, ready connections kept briefly per next hop, so the next message to the same host reuses the
    session (up to `max_messages` per connection, MaxBatchedMessages) instead of a new TCP+TLS+AUTH setup.
    An idle connection is closed (QUIT) after `idle` seconds."""

    def __init__(self, max_messages: int, idle: float = 5.0) -> None:
        self.max_messages = max(1, max_messages)
        self.idle = idle
        self._idle: dict[PoolKey, list[tuple[_Peer, asyncio.TimerHandle]]] = {}
        self.opened = 0  # connections made (statistics, tests)

    def take(self, key: PoolKey) -> _Peer | None:
        entries = self._idle.get(key)
        while entries:
            peer, timer = entries.pop()
            timer.cancel()
            if not peer.writer.is_closing():
                return peer
        return None

    def give(self, key: PoolKey, peer: _Peer) -> None:
        if peer.messages >= self.max_messages or peer.writer.is_closing():
            asyncio.get_running_loop().create_task(peer.quit())
            return
        timer = asyncio.get_running_loop().call_later(self.idle, self._expire, key, peer)
        self._idle.setdefault(key, []).append((peer, timer))

    def _expire(self, key: PoolKey, peer: _Peer) -> None:
        entries = self._idle.get(key, [])
        self._idle[key] = [(p, t) for p, t in entries if p is not peer]
        asyncio.get_running_loop().create_task(peer.quit())

    async def close(self) -> None:
        peers = [peer for entries in self._idle.values() for peer, _ in entries]
        for entries in self._idle.values():
            for _, timer in entries:
                timer.cancel()
        self._idle.clear()
        await asyncio.gather(*(peer.quit() for peer in peers), return_exceptions=True)


PoolKey = tuple[str, int, HopPolicy]


async def deliver(
    hops: Sequence[NextHop],
    envelope: Envelope,
    recipients: Sequence[Recipient],
    message: BinaryIO,
    *,
    hostname: str,
    timeout: float,
    connect_timeout: float = 30.0,
    policy: HopPolicy = HopPolicy(),
    pool: ConnectionPool | None = None,
    memory: PeerMemory | None = None,
    xexch50: bytes | None = None,
) -> SmtpOutcome:
    """Try each next hop in turn until one gives per-recipient answers; else every recipient is transient.
    `message` is read from its start at each try; it must not be shared with another delivery meanwhile."""
    outcome = SmtpOutcome()
    for hop in hops:
        result = await _attempt(
            hop,
            envelope,
            recipients,
            message,
            hostname,
            timeout,
            connect_timeout,
            outcome,
            policy,
            pool,
            memory,
            xexch50,
        )
        if isinstance(result, HopFailure):
            outcome.host_failures.append(result)
            if result.permanent:
                outcome.results = [
                    _result(r.address, result.reply, result.host, permanent=True) for r in recipients
                ]
                return outcome
            continue
        outcome.results = result
        return outcome
    reason = outcome.host_failures[-1].reason if outcome.host_failures else "no next hop"
    last = outcome.host_failures[-1] if outcome.host_failures else None
    outcome.results = [
        DeliveryResult(
            r.address,
            ok=False,
            permanent=False,
            reply=(last.reply if last and last.reply else reason),
            status="4.4.1" if not (last and last.reply) else _status(last.reply, "4.4.1"),
            remote_mta=last.host if last else "",
        )
        for r in recipients
    ]
    return outcome


async def _attempt(
    hop: NextHop,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    message: BinaryIO,
    hostname: str,
    timeout: float,
    connect_timeout: float,
    outcome: SmtpOutcome,
    policy: HopPolicy,
    pool: ConnectionPool | None,
    memory: PeerMemory | None,
    xexch50: bytes | None,
) -> list[DeliveryResult] | HopFailure:
    transcript = outcome.transcript
    label = (
        f"{hop.host}[{hop.address}]:{hop.port}" if hop.host != hop.address else f"[{hop.address}]:{hop.port}"
    )
    key: PoolKey = (hop.address, hop.port, policy)
    reused = pool.take(key) if pool is not None else None
    if reused is not None:
        transcript.append(f"--- {label} (connection reused, message {reused.messages + 1})")
        reused.transcript = transcript
        reused.rejections, reused.learned = outcome.rejections, outcome.learned
        try:
            blob = _blob_for(reused, policy, memory, xexch50)
            results = await _send_message(reused, label, envelope, recipients, message, memory, blob)
        except _Dropped:
            await reused.close()  # the idle connection went stale, or the peer choked: start afresh below
            _diagnose_drop(reused)
        else:
            await _finish(reused, pool, key)
            return results
    transcript.append(f"--- {label}")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(hop.address, hop.port, limit=READ_SIZE), connect_timeout
        )
    except (TimeoutError, OSError) as exc:
        transcript.append(f"   ! connect failed: {exc or type(exc).__name__}")
        return HopFailure(label, CANNOT_CONNECT)
    if pool is not None:
        pool.opened += 1
    peer = _Peer(reader, writer, timeout, transcript)
    peer.rejections, peer.learned = outcome.rejections, outcome.learned
    peer.memory_key = f"{hop.address}:{hop.port}"
    use_helo = policy.use_helo or (
        memory is not None and memory.knows(peer.memory_key, PEER_REJECTS_EHLO, now())
    )
    try:
        failure = await _setup(peer, hop, label, hostname, policy, use_helo)
        if failure is not None:
            await peer.quit()
            return failure
        results = await _send_message(
            peer, label, envelope, recipients, message, memory, _blob_for(peer, policy, memory, xexch50)
        )
    except _Dropped:
        await peer.close()
        _diagnose_drop(peer)
        return HopFailure(label, DROPPED)
    except _TlsFailed as exc:
        await peer.close()
        return HopFailure(label, f"The TLS handshake with the remote server failed: {exc}")
    except BaseException:
        await peer.close()
        raise
    await _finish(peer, pool, key)
    return results


async def _finish(peer: _Peer, pool: ConnectionPool | None, key: PoolKey) -> None:
    """After a message: back to the pool when the session is clean, else QUIT."""
    peer.messages += 1
    if pool is not None and peer.reusable:
        pool.give(key, peer)
    else:
        await peer.quit()


async def _setup(
    peer: _Peer, hop: NextHop, label: str, hostname: str, policy: HopPolicy, use_helo: bool
) -> HopFailure | None:
    """Greeting, EHLO/HELO, STARTTLS per policy, AUTH when configured; leaves peer.caps set."""
    greeting = await peer.reply()
    if not greeting.is_positive:
        return HopFailure(label, f"The remote server refused the connection: {greeting}", str(greeting))
    caps = await _hello(peer, label, hostname, use_helo)
    if isinstance(caps, HopFailure):
        return caps
    if policy.tls != "none" and caps is not None and caps.has("STARTTLS"):
        peer.command("STARTTLS")
        answer = await peer.reply()
        if answer.code == 220:
            await peer.start_tls(client_tls_context(policy.tls), hop.host)
            caps = await _hello(peer, label, hostname, use_helo=False)
            if isinstance(caps, HopFailure):
                return caps
        elif policy.tls == "required":
            return HopFailure(label, f"TLS is required but the remote server refused STARTTLS: {answer}")
    elif policy.tls == "required":
        return HopFailure(
            label, 'TLS is required (tls = "required") but the remote server does not offer STARTTLS'
        )
    peer.caps = caps
    if policy.auth_user:
        failure = await _authenticate(peer, hop, label, caps, policy)
        if failure is not None:
            return failure
        if caps is not None:
            # Exchange-style peers offer some verbs (XEXCH50) only to authenticated clients: ask again.
            again = await _hello(peer, label, hostname, use_helo=False)
            if isinstance(again, HopFailure):
                return again
            peer.caps = again
    return None


async def _send_message(
    peer: _Peer,
    label: str,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    message: BinaryIO,
    memory: PeerMemory | None = None,
    xexch50: bytes | None = None,
) -> list[DeliveryResult]:
    """One mail transaction on a ready session; per-recipient results. Marks the session reusable when it
    ends cleanly (a final reply to the data, or a successful RSET)."""
    caps = peer.caps
    peer.reusable = False
    content = _content_for(peer, envelope, message, memory)
    if isinstance(content, str):  # the peer cannot take this message in any form
        peer.reusable = True
        return [_result(r.address, content, label, permanent=True) for r in recipients]
    size = len(content) if isinstance(content, bytes) else _size_of(content)
    params: dict[str, str | None] = {}
    # The EHLO keywords (upper case), read directly rather than through caps.has() (speed: several per
    # message); none after HELO.
    offered = caps.keywords if caps is not None else _NO_KEYWORDS
    dsn = "DSN" in offered
    if envelope.smtputf8 and "SMTPUTF8" in offered:
        params["SMTPUTF8"] = None
    if caps is not None:
        if caps.size_limit is not None and size > caps.size_limit:
            text = f"552 5.3.4 Message size {size} exceeds the remote server's limit of {caps.size_limit}"
            peer.reusable = True
            return [_result(r.address, text, label, permanent=True) for r in recipients]
        if "SIZE" in offered:
            params["SIZE"] = str(size)
        if (
            envelope.body == "8BITMIME"
            and "8BITMIME" in offered
            and not isinstance(content, bytes)
            and not (memory is not None and memory.knows(peer.memory_key, PEER_LACKS_8BITMIME, now()))
        ):
            params["BODY"] = "8BITMIME"
            peer.sent_8bit = True  # a drop from here on is the KB286673 failure
        if envelope.body == "BINARYMIME":
            params["BODY"] = "BINARYMIME"
        if dsn:  # pass the DSN request on: the peer takes over responsibility for it (RFC 3461 §4)
            if envelope.ret:
                params["RET"] = envelope.ret
            if envelope.envid:
                params["ENVID"] = xtext_encode(envelope.envid)

    def rcpt_params(rcpt: Recipient) -> dict[str, str | None]:
        if not dsn:
            return {}
        out: dict[str, str | None] = {}
        if rcpt.notify:
            out["NOTIFY"] = ",".join(rcpt.notify)
        if rcpt.orcpt:
            out["ORCPT"] = xtext_encode(rcpt.orcpt)
        return out

    pipelining = "PIPELINING" in offered
    send_blob = bool(xexch50) and "XEXCH50" in offered
    use_bdat = envelope.body == "BINARYMIME" and not isinstance(content, bytes)
    # RFC 2920: DATA may close the pipelined group (as Postfix's client does): one round trip less per
    # message. Not when an XEXCH50 blob must go between RCPT and the data, nor for BDAT.
    pipeline_data = pipelining and not send_blob and not use_bdat
    mail_command = mail_arg(envelope.sender, params)
    if pipelining:
        commands = [("MAIL", mail_command)]
        commands += [("RCPT", rcpt_arg(rcpt.address, rcpt_params(rcpt))) for rcpt in recipients]
        if pipeline_data:
            commands.append(("DATA", ""))
        peer.pipeline(commands)
    else:
        peer.command("MAIL", mail_command)
    mail = await peer.reply()
    rcpt_replies: list[Reply] = []
    go_ahead: Reply | None = None
    if pipelining:
        rcpt_replies = [await peer.reply() for _ in recipients]
        if pipeline_data:
            go_ahead = await peer.reply()
    if not mail.is_positive:
        text = _reply_text(mail)
        peer.rejections.append(Rejection(label, "MAIL", text, f"MAIL {mail_command}"))
        await _void_data(peer, go_ahead)
        await _reset(peer)
        return [_result(r.address, text, label, permanent=mail.is_permanent) for r in recipients]
    if not pipelining:
        for rcpt in recipients:
            peer.command("RCPT", rcpt_arg(rcpt.address, rcpt_params(rcpt)))
            rcpt_replies.append(await peer.reply())

    results: dict[str, DeliveryResult] = {}
    accepted: list[Recipient] = []
    for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
        if reply.is_positive:
            accepted.append(rcpt)
        else:
            command = f"RCPT {rcpt_arg(rcpt.address, rcpt_params(rcpt))}"
            text = _reply_text(reply)
            peer.rejections.append(Rejection(label, "RCPT", text, command))
            results[rcpt.address] = _result(rcpt.address, text, label, permanent=reply.is_permanent)
    if accepted and send_blob:
        assert xexch50 is not None
        await _send_xexch50(peer, xexch50)
    if accepted:
        if use_bdat:
            assert not isinstance(content, bytes)
            final = await _send_bdat(peer, content)
        else:
            if go_ahead is None:
                peer.command("DATA")
                go_ahead = await peer.reply()
            final = await _send_data(peer, content, go_ahead)
        peer.reusable = final.code != 354 and final.code != 421
        text = _reply_text(final)
        if not final.is_positive:
            peer.rejections.append(Rejection(label, "DATA", text, "DATA"))
        for rcpt in accepted:
            results[rcpt.address] = _result(
                rcpt.address,
                text,
                label,
                ok=final.is_positive,
                permanent=final.is_permanent,
                dsn_passed_on=dsn,
            )
    else:
        await _void_data(peer, go_ahead)
        await _reset(peer)
    return [results[r.address] for r in recipients]


async def _void_data(peer: _Peer, go_ahead: Reply | None) -> None:
    """A pipelined DATA that a server answered 354 although it took no recipient (RFC 2920 §3.1 lets it):
    the data phase has begun, so it is closed at once with an empty message, whose reply is read and
    ignored (with no recipient there is nothing to deliver)."""
    if go_ahead is not None and go_ahead.code == 354:
        peer.writer.write(peer.conn.end_data(peer.conn.start_data()))
        peer.log(">", "<empty data: no recipient was accepted> .")
        await peer.reply()


async def _reset(peer: _Peer) -> None:
    """End an unfinished transaction so the session can carry the next message."""
    peer.command("RSET")
    answer = await peer.reply()
    peer.reusable = answer.is_positive


async def _send_data(peer: _Peer, content: BinaryIO | bytes, go_ahead: Reply) -> Reply:
    """The message after DATA's reply `go_ahead`: the final reply (or `go_ahead` when it is not 354)."""
    if go_ahead.code != 354:
        return go_ahead
    stuffer = peer.conn.start_data()
    writer = peer.writer
    if isinstance(content, bytes):
        for start in range(0, len(content), BODY_CHUNK):
            writer.write(stuffer.feed(content[start : start + BODY_CHUNK]))
            await writer.drain()
    else:
        content.seek(0)
        chunk = content.read(BODY_CHUNK)
        while chunk:
            data = stuffer.feed(chunk)
            chunk = content.read(BODY_CHUNK)
            if not chunk and len(data) <= SMALL_TAIL:
                # Speed: the last, small piece of the body goes out in one write with the final "." (most
                # messages are one such piece); a large one is not copied for it.
                writer.write(data + peer.conn.end_data(stuffer))
                peer.log(">", "<message body> .")
                return await peer.reply()
            writer.write(data)
            await writer.drain()
    writer.write(peer.conn.end_data(stuffer))
    peer.log(">", "<message body> .")
    return await peer.reply()


async def _send_xexch50(peer: _Peer, blob: bytes) -> None:
    """`XEXCH50 <n> 2`, the blob, and its 250 (SPEC 2.5). A refusal (504 before AUTH, 500) only means the
    blob is not carried; a peer that goes silent or drops us after the blob is the KB818222 firewall."""
    peer.command("XEXCH50", f"{len(blob)} 2")
    answer = await peer.reply()
    if answer.code != 354:
        return
    peer.phase = "XEXCH50-BLOB"
    peer.writer.write(peer.conn.send_xexch50_blob(blob))
    peer.log(">", f"<XEXCH50 blob, {len(blob)} octets>")
    saved, peer.timeout = peer.timeout, min(peer.timeout, XEXCH50_REPLY_TIMEOUT)
    try:
        await peer.reply()
    finally:
        peer.timeout = saved


def _blob_for(peer: _Peer, policy: HopPolicy, memory: PeerMemory | None, blob: bytes | None) -> bytes | None:
    if not blob or not policy.xexch50:
        return None
    if memory is not None and memory.knows(peer.memory_key, XEXCH50_BLOCKED, now()):
        return None
    return blob


async def _send_bdat(peer: _Peer, content: BinaryIO) -> Reply:
    """RFC 3030: the message in BDAT chunks, unmodified (binary-safe); the LAST chunk's reply is final."""
    size = _size_of(content)
    sent = 0
    content.seek(0)
    while True:
        chunk = content.read(BODY_CHUNK)
        sent += len(chunk)
        last = sent >= size or not chunk
        peer.writer.write(peer.conn.send_bdat(chunk, last=last))
        await peer.writer.drain()
        reply = await peer.reply()
        if last or not reply.is_positive:
            peer.log(">", f"<message body in BDAT chunks, {sent} octets>")
            return reply


def _size_of(message: BinaryIO) -> int:
    """Octets in a seekable message handle (a file or BytesIO)."""
    return message.seek(0, io.SEEK_END)


def _content_for(
    peer: _Peer, envelope: Envelope, message: BinaryIO, memory: PeerMemory | None = None
) -> BinaryIO | bytes | str:
    """What to send: the queued message as it is (the handle); a 7-bit conversion (bytes) for a peer
    without 8BITMIME (RFC 6152, KB286673: sending 8-bit data anyway is what made Exchange 5.5 drop the
    connection); or, as a str, the permanent failure when the peer cannot take the message at all."""
    caps = peer.caps
    if envelope.smtputf8 and (caps is None or not caps.has("SMTPUTF8")):
        return "553 5.6.7 The message needs SMTPUTF8 and the remote server does not support it"
    if envelope.body == "BINARYMIME":
        if caps is not None and caps.has("BINARYMIME") and caps.has("CHUNKING"):
            return message  # sent with BDAT, byte for byte
        return "554 5.6.3 The message is binary (BINARYMIME) and the remote server does not accept it"
    message.seek(0)
    if not needs_downgrade(message):
        return message
    distrusted = memory is not None and memory.knows(peer.memory_key, PEER_LACKS_8BITMIME, now())
    if caps is not None and caps.has("8BITMIME") and not distrusted:
        peer.sent_8bit = True
        return message
    try:
        message.seek(0)
        converted = downgrade_to_7bit(message.read())
    except DowngradeError as exc:
        return f"554 {exc.status} The message cannot be converted to 7-bit for this server: {exc}"
    peer.log("=", "message converted to 7-bit MIME (the peer does not offer 8BITMIME)")
    return converted


async def _hello(peer: _Peer, label: str, hostname: str, use_helo: bool) -> Capabilities | HopFailure | None:
    """EHLO (or HELO when configured or when EHLO is refused); the capabilities, None after HELO."""
    if not use_helo:
        peer.command("EHLO", hostname)
        hello = await peer.reply()
        if hello.is_positive:
            return Capabilities.from_ehlo(hello)
        if hello.is_transient:
            return HopFailure(label, f"The remote server answered EHLO with {hello}", str(hello))
        peer.learned.append((peer.memory_key, PEER_REJECTS_EHLO))
    peer.command("HELO", hostname)  # an old or minimal server (KB818222 method 2), or use_helo
    hello = await peer.reply()
    if not hello.is_positive:
        return HopFailure(label, f"The remote server refused HELO: {hello}", str(hello))
    return None


async def _authenticate(
    peer: _Peer, hop: NextHop, label: str, caps: Capabilities | None, policy: HopPolicy
) -> HopFailure | None:
    """AUTH to a smart host: PLAIN, else LOGIN; never a password in plaintext except to loopback."""
    if not peer.tls and not _is_loopback(hop.address):
        return HopFailure(
            label, "Credentials are configured but the connection is not encrypted; not sending them"
        )
    mechanisms = caps.auth_mechanisms if caps is not None else ()
    if "PLAIN" in mechanisms:
        peer.command("AUTH", "PLAIN " + encode_plain(policy.auth_user, policy.auth_password), secret=True)
        answer = await peer.reply()
    elif "LOGIN" in mechanisms:
        peer.command("AUTH", "LOGIN")
        answer = await peer.reply()
        if answer.code == 334:
            peer.auth_response(encode_login(policy.auth_user))
            answer = await peer.reply()
        if answer.code == 334:
            peer.auth_response(encode_login(policy.auth_password))
            answer = await peer.reply()
    else:
        return HopFailure(
            label, "Credentials are configured but the remote server offers no AUTH PLAIN or LOGIN"
        )
    if answer.code != 235:
        # Our credentials are wrong or refused: transient, so the operator can fix them before mail expires.
        return HopFailure(label, f"The remote server refused our credentials: {answer}", str(answer))
    return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _diagnose_drop(peer: _Peer) -> None:
    """The peer closed or stalled: name what it choked on, so the next attempt avoids it (SPEC 2.9)."""
    if peer.phase == "EHLO" and not peer.tls:
        peer.learned.append((peer.memory_key, PEER_REJECTS_EHLO))
    elif peer.phase in ("MAIL", "RCPT", "DATA") and peer.sent_8bit:
        peer.learned.append((peer.memory_key, PEER_LACKS_8BITMIME))
    elif peer.phase == "XEXCH50-BLOB":
        peer.learned.append((peer.memory_key, XEXCH50_BLOCKED))


def now() -> float:
    return time.time()


def _status(reply: str, default: str) -> str:
    parts = reply.split(" ", 2)
    if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2:
        return parts[1]
    return default


def _result(
    address: str,
    reply: str,
    host: str,
    *,
    ok: bool = False,
    permanent: bool = False,
    dsn_passed_on: bool = False,
) -> DeliveryResult:
    default = "2.0.0" if ok else ("5.0.0" if permanent else "4.0.0")
    return DeliveryResult(
        address,
        ok=ok,
        permanent=permanent and not ok,
        reply=reply,
        status=_status(reply, default),
        remote_mta=host,
        dsn_passed_on=dsn_passed_on,
    )
