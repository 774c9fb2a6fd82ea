"""One outbound SMTP connection and the conversation on it: connect and greeting, EHLO (HELO when EHLO is
refused), STARTTLS per policy, AUTH, then mail transactions (MAIL and RCPT pipelined when offered, DATA or
BDAT, the XEXCH50 blob), each reply read against its own deadline (RFC 5321 §4.5.3.2: `Timeouts`).

Drives the sans-I/O `ClientConnection` over asyncio streams. Every step is recorded in a transcript (no
message bodies, no blobs, no credentials). What happens between connections (which host, which session,
which events) is `delivery/smtp.py`'s business.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from smtpsvc import protolog
from smtpsvc.delivery.authcauses import (
    OAUTH_TOKEN_FAILED,
    OAUTH_TOKEN_REFUSED,
    TOKEN_REFUSED_ADVICE,
    diagnose,
)
from smtpsvc.delivery.dane import DANE_MISMATCH, DANE_TLS_REQUIRED
from smtpsvc.delivery.dane import check as dane_check
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
from smtpsvc.protocol.sasl import (
    OAUTHBEARER_ERROR_ANSWER,
    XOAUTH2_ERROR_ANSWER,
    SaslError,
    decode_bearer_error,
    encode_login,
    encode_oauthbearer,
    encode_plain,
    encode_xoauth2,
)
from smtpsvc.protolog import ProtocolLog
from smtpsvc.routing.mx import NextHop, TlsaAnswer
from smtpsvc.tokens import AccessToken, TokenError, TokenSource
from smtpsvc.units import format_duration

READ_SIZE = 64 * 1024
BODY_CHUNK = 256 * 1024
SMALL_TAIL = 16 * 1024  # a last body piece up to this size is sent in one write with the final "."
XEXCH50_REPLY_TIMEOUT = 60.0  # the blob's 250 comes at once from a real peer (KB818222)
QUIT_TIMEOUT = 5.0  # a polite end is not worth waiting long for
CLOSE_TIMEOUT = 2.0
KEEPALIVE = (60, 15, 4)  # idle seconds before the first probe, seconds between probes, probes


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Deadlines of an outbound session (RFC 5321 §4.5.3.2; config keys `delivery.*_timeout`). `command`
    (RemoteTimeout, `delivery.timeout`) is for the replies without a deadline of their own: EHLO, HELO,
    STARTTLS, AUTH, RSET, XEXCH50, and the TLS handshake."""

    connect: float = 30.0
    greeting: float = 300.0
    command: float = 600.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    final: float = 600.0


class TokenLogin:
    """The OAuth 2.0 token of one delivery attempt's XOAUTH2/OAUTHBEARER login: had from the TokenSource
    before the first connection, and refreshed at most once, when a server refuses it (one refresh, one
    retry)."""

    def __init__(self, source: TokenSource, profile: str) -> None:
        self.source = source
        self.profile = profile
        self.token: AccessToken | None = None
        self.refreshed = False  # the one refresh of this attempt is used
        self.untried = False  # a refreshed token no server has judged yet (the connection broke first)

    async def current(self) -> AccessToken:
        """The token to log in with. Raises TokenError."""
        if self.token is None:
            self.token = await self.source.token(self.profile)
        return self.token

    async def refresh(self) -> AccessToken | None:
        """A new token in place of the refused one; None when this attempt had its refresh. Raises
        TokenError."""
        if self.refreshed:
            return None
        self.refreshed = True
        self.token = await self.source.token(self.profile, refused=self.token)
        self.untried = True
        return self.token


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How to talk to the next hop: TLS policy, credentials (AUTH to a smart host or a connector's hosts),
    HELO instead of EHLO. `auth_mechanism`: "auto" (PLAIN, else LOGIN), "plain", "login", or "xoauth2" /
    "oauthbearer" with the token of `oauth`."""

    # "none" | "opportunistic" | "required" | "dane-or-mta-sts": DANE where the hop has usable TLSA records
    # (delivery/smtp.py); where the domain's MTA-STS policy applies instead, smtp.py asks for "required".
    tls: str = "opportunistic"
    auth_user: str = ""
    auth_password: str = field(default="", repr=False)
    use_helo: bool = False
    auth_mechanism: str = "auto"
    oauth: TokenLogin | None = field(default=None, repr=False, compare=False)


@dataclass(slots=True)
class HopFailure:
    """This host could not take the message at all; the next host may."""

    host: str  # "name[ip]:port"
    reason: str  # IIS-worded reason for events 4006/4000
    cause: str  # the event `cause`
    reply: str = ""  # the reply that caused it, if any


@dataclass(frozen=True, slots=True)
class Rejection:
    """The remote host refused a command we sent (IIS event 7004)."""

    host: str
    verb: str
    reply: str
    command: str


# Causes of a host failure (SPEC 2.9; docs/delivery.md §6).
CONNECTION_FAILED = "connection-failed"
GREETING_TIMEOUT = "greeting-timeout"
CONNECTION_DROPPED = "connection-dropped"
REPLY_TIMEOUT = "reply-timeout"
TRANSIENT_REPLY = "transient-reply"

DROPPED = "The connection was dropped by the remote host."

_NO_KEYWORDS: dict[str, tuple[str, ...]] = {}  # the EHLO keywords after HELO: none (never changed)


class Dropped(Exception):
    """The peer closed the connection, or sent what cannot be parsed."""


class Stalled(Dropped):
    """No reply (or no progress reading our data) within the stage's deadline."""

    def __init__(self, stage: str, seconds: float) -> None:
        super().__init__(f"no reply to {stage} within {format_duration(seconds)}")
        self.stage = stage
        self.seconds = seconds


_ENCODING_DER = 2  # _ssl.ENCODING_DER: the form `Certificate.public_bytes` gives for DER


class TlsFailed(Exception):
    pass


def peer_chain(ssl_object: ssl.SSLObject | None) -> list[bytes]:
    """The certificates a TLS peer presented (DER, leaf first), unverified: what DANE matches.

    ssl gives the unverified chain publicly from Python 3.13 (`SSLObject.get_unverified_chain`); 3.10 to 3.12
    have the same method on the private `_sslobj`. Without either, only the leaf (enough for DANE-EE;
    DANE-TA then matches only a leaf that is itself the trust anchor)."""
    if ssl_object is None:
        return []
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is not None:
        chain = getter() or []
        return [c if isinstance(c, bytes) else c.public_bytes(_ENCODING_DER) for c in chain]
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def reply_text(reply: Reply) -> str:
    """`str(reply)`; for the usual one-line reply built directly (speed: Reply.__str__ renders through a list
    of lines, and this runs several times per message)."""
    if reply.more:
        return str(reply)
    if reply.enhanced:
        return f"{reply.code} {reply.enhanced} {reply.text}"
    return f"{reply.code} {reply.text}"


def client_tls_context(policy: str) -> ssl.SSLContext:
    """`required`: the peer's certificate must verify against the system's CAs and name the host.
    `opportunistic`: encrypt whatever the certificate (RFC 7435): better than plaintext, no false failure."""
    context = ssl.create_default_context()
    if policy != "required":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def hop_label(hop: NextHop) -> str:
    """How a host appears in events and transcripts: ``mx.example.test[192.0.2.1]:25``."""
    if hop.host != hop.address:
        return f"{hop.host}[{hop.address}]:{hop.port}"
    return f"[{hop.address}]:{hop.port}"


class SmtpSession:
    """A connected next hop: reads replies against deadlines, records the conversation. Cached between
    messages by its destination (`delivery/destination.py`): `messages`, `usable`, `close_soon`."""

    def __init__(
        self,
        hop: NextHop,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        timeouts: Timeouts,
        transcript: list[str],
        protocol_log: ProtocolLog | None = None,
        queue_id: str = "",
    ) -> None:
        self.hop = hop
        self.label = hop_label(hop)
        self.memory_key = f"{hop.address}:{hop.port}"  # what self-healing facts are kept by
        self.reader = reader
        self.writer = writer
        self.timeouts = timeouts
        self.conn = ClientConnection()
        self.transcript = transcript
        self.rejections: list[Rejection] = []
        self.learned: list[tuple[str, str]] = []
        self.phase = "greeting"  # what we were doing, to name the cause when the peer drops us
        self.sent_8bit = False
        self.tls = False
        self.caps: Capabilities | None = None
        self.messages = 0  # messages started on this connection
        self.reusable = False  # the last transaction ended cleanly
        self.on_close: Callable[[], object] | None = None  # e.g. give back a cluster-wide connection slot
        self._t0 = time.monotonic()
        self._timed_out = False  # a read deadline passed: the reader is failed, the connection is done
        self._closing = False
        self._ending: asyncio.Task[None] | None = None  # close_soon's QUIT under way
        self._then: list[Callable[[], None]] = []
        # Protocol log hook ([protocol_log]): each command and reply as IIS logs an outbound conversation
        self.protocol_log = protocol_log
        self.queue_id = queue_id  # the message being sent (attach), for `smtpsvc track`
        self._sent_at = self._t0  # when the last command went out (time-taken of the reply)

    # -- the cache's view ----------------------------------------------------------------------------
    def usable(self) -> bool:
        return self.reusable and not self._closing and not self.writer.is_closing()

    def close_soon(self, then: Callable[[], None] | None = None) -> None:
        """QUIT and close in the background; `then` once closed (the destination frees the slot)."""
        if then is not None:
            self._then.append(then)
        if self._ending is None:
            self._closing = True
            self._ending = asyncio.get_running_loop().create_task(self._end())

    async def _end(self) -> None:
        try:
            await self.quit()
        finally:
            then, self._then = self._then, []
            for callback in then:
                callback()

    def attach(self, transcript: list[str], queue_id: str = "") -> None:
        """A new message on this session: its own transcript and findings from here on."""
        self.transcript = transcript
        if queue_id:
            self.queue_id = queue_id
        self.rejections = []
        self.learned = []

    # -- the conversation ----------------------------------------------------------------------------
    def log(self, direction: str, text: str) -> None:
        self.transcript.append(f"{time.monotonic() - self._t0:8.3f} {direction} {text}")
        if direction == ">" and self.protocol_log is not None:
            self._log_command(text)

    def _log_command(self, text: str) -> None:
        """A command as the protocol log shows it (the transcript's text: secrets already redacted)."""
        if text.startswith("<"):  # the message body, an XEXCH50 blob, a redacted AUTH response
            # the body's line is "." (what ends it on the wire), with what it stood for
            verb = next((v for v in ("AUTH", "XEXCH50", "BDAT") if v in text), ".")
            arg = protolog.SECRET if verb == "AUTH" else text.strip("<> .")
        else:
            verb, _, arg = text.partition(" ")
            if "<redacted>" in arg:  # AUTH with an initial response: its mechanism, then ***
                arg = f"{arg.split(' ', 1)[0]} {protolog.SECRET}"
            arg = protolog.redact(verb, arg)
        self._sent_at = time.monotonic()
        self._log_line(protolog.OUTBOUND_COMMAND, verb, arg, 0, 0, len(text) + 2, 0)

    def _log_reply(self, reply: Reply) -> None:
        text = " | ".join(str(reply).split("\n")) if reply.more else reply_text(reply)
        taken = int((time.monotonic() - self._sent_at) * 1000)
        self._log_line(protolog.OUTBOUND_RESPONSE, "", text, reply.code, len(text) + 2, 0, taken)

    def _log_line(
        self, kind: str, verb: str, query: str, status: int, sc_bytes: int, cs_bytes: int, taken: int
    ) -> None:
        plog = self.protocol_log
        assert plog is not None
        plog.write(
            protolog.line(
                time.time(),
                client_ip=self.hop.address,
                username=kind,
                computer=plog.computer,
                server_ip="",  # as IIS logs a connection out: the remote host in c-ip, its port in s-port
                server_port=self.hop.port,
                method=verb,
                query=query,
                status=status,
                sc_bytes=sc_bytes,
                cs_bytes=cs_bytes,
                taken_ms=taken,
                queue_id=self.queue_id,
            )
        )

    def command(self, verb: str, arg: str = "", *, secret: bool = False) -> None:
        self.phase = verb.upper()
        self.writer.write(self.conn.send_command(verb, arg))
        if secret:  # the first word (AUTH's mechanism) is no secret, and says what was tried
            self.log(">", f"{verb} {arg.split(' ', 1)[0]} <redacted>")
        else:
            self.log(">", f"{verb} {arg}".rstrip())

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

    def peer_chain(self) -> list[bytes]:
        """The certificates the server presented (DER, leaf first), for DANE (`peer_chain`)."""
        return peer_chain(self.writer.get_extra_info("ssl_object"))

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.drain(self.timeouts.command, "STARTTLS")
        buffered = getattr(self.reader, "_buffer", None)  # plaintext before the handshake is void
        if isinstance(buffered, bytearray):
            buffered.clear()
        try:
            await self.writer.start_tls(
                context, server_hostname=server_hostname, ssl_handshake_timeout=self.timeouts.command
            )
        except (ssl.SSLError, ssl.CertificateError, ConnectionError, OSError, TimeoutError) as exc:
            self.log("!", f"TLS handshake failed: {exc}")
            raise TlsFailed(str(exc)) from exc
        self.conn.tls_established()
        self.tls = True
        cipher = self.writer.get_extra_info("cipher")
        self.log(
            "=", f"TLS established: {cipher[1] if cipher else ''} {cipher[0] if cipher else ''}".rstrip()
        )

    async def reply(self, timeout: float, stage: str = "") -> Reply:
        """The next reply; Stalled when none comes within `timeout` seconds (`stage` names what it answers,
        default the last command), Dropped when the peer closes or talks nonsense."""
        while True:
            try:
                event = self.conn.next_event()
            except RemoteProtocolError as exc:
                self.log("!", f"protocol error: {exc}")
                raise Dropped from exc
            if isinstance(event, ServerReply):
                reply = event.reply
                if reply.more:
                    for line in str(reply).split("\n"):
                        self.log("<", line)
                else:
                    self.log("<", reply_text(reply))
                if self.protocol_log is not None:
                    self._log_reply(reply)
                return reply
            if isinstance(event, ConnectionClosed):
                self.log("!", "connection closed by peer")
                raise Dropped
            assert event is NEED_DATA
            try:
                await self.drain(timeout, stage or self.phase)
                data = await self._read(timeout)
            except TimeoutError:
                stalled = Stalled(stage or self.phase, timeout)
                self.log("!", str(stalled))
                raise stalled from None
            except (ConnectionError, OSError) as exc:
                self.log("!", f"connection error: {exc}")
                raise Dropped from exc
            self.conn.receive_data(data)

    async def drain(self, timeout: float, stage: str) -> None:
        """Wait until the peer has taken what we wrote, at most `timeout` seconds (Stalled otherwise). Free
        when nothing is buffered, the usual case."""
        transport = self.writer.transport
        if transport is None or not transport.get_write_buffer_size():
            return
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except TimeoutError:
            stalled = Stalled(stage, timeout)
            self.log("!", f"{stalled} (the remote server stopped reading)")
            raise stalled from None
        except (ConnectionError, OSError) as exc:
            self.log("!", f"connection error: {exc}")
            raise Dropped from exc

    async def _read(self, timeout: float) -> bytes:
        """One read, which fails with TimeoutError when nothing comes within `timeout` seconds.

        Speed: not `asyncio.timeout()`, whose Timeout object, task lookup and cancel/uncancel protocol cost
        about 3.5 µs per read (two reads per message): a plain timer fails the reader instead, which wakes the
        read with the error. That leaves the reader failed for good, which is fine: a read that timed out
        ends the connection. No task is cancelled, so a cancellation from outside is never mistaken for the
        deadline, nor the other way round."""
        if self._timed_out:
            raise TimeoutError
        timer = asyncio.get_running_loop().call_later(timeout, self._expire)
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
        self._closing = True
        with contextlib.suppress(Exception):
            if not self.writer.is_closing() and not self._timed_out:
                self.command("QUIT")
                await asyncio.wait_for(self.reply(QUIT_TIMEOUT), QUIT_TIMEOUT)
        await self.close()

    async def close(self) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            with contextlib.suppress(Exception):
                done = on_close()
                if asyncio.iscoroutine(done):
                    await done


async def connect(
    hop: NextHop,
    timeouts: Timeouts,
    transcript: list[str],
    protocol_log: ProtocolLog | None = None,
    queue_id: str = "",
) -> SmtpSession | HopFailure:
    """TCP connection and the 220 greeting: the connect stage. A host that refuses, does not answer, or
    accepts but never greets is a failure of this stage: the caller moves on to the next host."""
    label = hop_label(hop)
    transcript.append(f"--- {label}")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(hop.address, hop.port, limit=READ_SIZE), timeouts.connect
        )
    except ConnectionRefusedError as exc:
        transcript.append(f"   ! connect failed: {exc}")
        return HopFailure(label, "The remote server refused the connection.", CONNECTION_FAILED)
    except TimeoutError:
        transcript.append(f"   ! connect failed: no answer within {format_duration(timeouts.connect)}")
        return HopFailure(
            label,
            "The remote server did not respond to a connection attempt "
            f"within {format_duration(timeouts.connect)}.",
            CONNECTION_FAILED,
        )
    except OSError as exc:
        transcript.append(f"   ! connect failed: {exc}")
        return HopFailure(
            label, f"The remote server could not be reached: {exc.strerror or exc}.", CONNECTION_FAILED
        )
    _keepalive(writer)
    session = SmtpSession(hop, reader, writer, timeouts, transcript, protocol_log, queue_id)
    try:
        greeting = await session.reply(timeouts.greeting, "the connection (no greeting)")
    except Stalled:
        await session.close()
        return HopFailure(
            label,
            "The remote server accepted the connection but sent no greeting within "
            f"{format_duration(timeouts.greeting)}.",
            GREETING_TIMEOUT,
        )
    except Dropped:
        await session.close()
        return HopFailure(label, DROPPED, CONNECTION_DROPPED)
    if not greeting.is_positive:
        await session.quit()
        return HopFailure(
            label, f"The remote server refused the connection: {greeting}", TRANSIENT_REPLY, str(greeting)
        )
    return session


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """TCP keepalive, so a peer that vanished (a dead NAT entry, a powered-off host) is noticed while we
    wait for a long reply (the final dot may take 10 minutes)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


async def prepare(
    session: SmtpSession,
    hostname: str,
    policy: SessionPolicy,
    memory: PeerMemory | None,
    dane: TlsaAnswer | None = None,
) -> HopFailure | None:
    """EHLO/HELO, STARTTLS per policy, AUTH when configured (then EHLO again); leaves session.caps set.

    `dane`: the host's authenticated TLSA records (RFC 7672): STARTTLS is then mandatory and the certificate
    is checked against them instead of the CAs (`_dane_starttls`)."""
    use_helo = policy.use_helo or (
        memory is not None and memory.knows(session.memory_key, PEER_REJECTS_EHLO, time.time())
    )
    caps = await _hello(session, hostname, use_helo)
    if isinstance(caps, HopFailure):
        return caps
    label = session.label
    if dane is not None:
        failure = await _dane_starttls(session, caps, dane)
        if failure is not None:
            return failure
        caps = await _hello(session, hostname, use_helo=False)
        if isinstance(caps, HopFailure):
            return caps
    elif policy.tls != "none" and caps is not None and caps.has("STARTTLS"):
        session.command("STARTTLS")
        answer = await session.reply(session.timeouts.command)
        if answer.code == 220:
            await session.start_tls(client_tls_context(policy.tls), session.hop.host)
            caps = await _hello(session, hostname, use_helo=False)
            if isinstance(caps, HopFailure):
                return caps
        elif policy.tls == "required":
            return HopFailure(
                label, f"TLS is required but the remote server refused STARTTLS: {answer}", TRANSIENT_REPLY
            )
    elif policy.tls == "required":
        return HopFailure(
            label,
            'TLS is required (tls = "required") but the remote server does not offer STARTTLS',
            TRANSIENT_REPLY,
        )
    session.caps = caps
    if policy.auth_user:  # a route's auth table with a user (config: a password_file or an oauth profile)
        failure = await _authenticate(session, caps, policy)
        if failure is not None:
            return failure
        if caps is not None:
            # Exchange-style peers offer some verbs (XEXCH50) only to authenticated clients: ask again.
            again = await _hello(session, hostname, use_helo=False)
            if isinstance(again, HopFailure):
                return again
            session.caps = again
    return None


async def _dane_starttls(
    session: SmtpSession, caps: Capabilities | None, dane: TlsaAnswer
) -> HopFailure | None:
    """STARTTLS that must happen, then the presented chain matched against the TLSA records (RFC 7672 §3).

    The handshake itself verifies nothing (the CAs do not count under DANE); the match decides. On a
    mismatch nothing more is sent but QUIT: the message never goes to a server DANE does not authenticate."""
    label = session.label
    if caps is None or not caps.has("STARTTLS"):
        return HopFailure(
            label,
            f"The domain publishes DANE TLSA records for this host ({dane.name}), so TLS is required, "
            "but the remote server does not offer STARTTLS",
            DANE_TLS_REQUIRED,
        )
    session.command("STARTTLS")
    answer = await session.reply(session.timeouts.command)
    if answer.code != 220:
        return HopFailure(
            label,
            f"The domain publishes DANE TLSA records for this host ({dane.name}), so TLS is required, "
            f"but the remote server refused STARTTLS: {answer}",
            DANE_TLS_REQUIRED,
            str(answer),
        )
    await session.start_tls(client_tls_context("opportunistic"), session.hop.host)
    result = dane_check(dane.records, session.peer_chain(), [session.hop.host])
    if not result.ok:
        session.log("!", f"DANE: {result.detail}")
        return HopFailure(
            label,
            f"The remote server's certificate does not match the DANE TLSA records of {dane.name}: "
            f"{result.detail}",
            DANE_MISMATCH,
        )
    session.log("=", f"DANE: {result.detail}")
    return None


async def _hello(session: SmtpSession, hostname: str, use_helo: bool) -> Capabilities | HopFailure | None:
    """EHLO (or HELO when configured or when EHLO is refused); the capabilities, None after HELO."""
    timeout = session.timeouts.command
    if not use_helo:
        session.command("EHLO", hostname)
        hello = await session.reply(timeout)
        if hello.is_positive:
            return Capabilities.from_ehlo(hello)
        if hello.is_transient:
            return HopFailure(
                session.label, f"The remote server answered EHLO with {hello}", TRANSIENT_REPLY, str(hello)
            )
        session.learned.append((session.memory_key, PEER_REJECTS_EHLO))
    session.command("HELO", hostname)  # an old or minimal server (KB818222 method 2), or use_helo
    hello = await session.reply(timeout)
    if not hello.is_positive:
        return HopFailure(
            session.label, f"The remote server refused HELO: {hello}", TRANSIENT_REPLY, str(hello)
        )
    return None


_PASSWORD_MECHANISMS = {"plain": ("PLAIN",), "login": ("LOGIN",), "auto": ("PLAIN", "LOGIN")}


async def _authenticate(
    session: SmtpSession, caps: Capabilities | None, policy: SessionPolicy
) -> HopFailure | None:
    """AUTH to a smart host or a connector's host: PLAIN or LOGIN with the password, XOAUTH2 or OAUTHBEARER
    with a token; never a credential in plaintext except to loopback."""
    label = session.label
    if not session.tls and not _is_loopback(session.hop.address):
        return HopFailure(
            label,
            "Credentials are configured but the connection is not encrypted; not sending them",
            TRANSIENT_REPLY,
        )
    offered = caps.auth_mechanisms if caps is not None else ()
    wanted = _PASSWORD_MECHANISMS.get(policy.auth_mechanism, (policy.auth_mechanism.upper(),))
    mechanism = next((m for m in wanted if m in offered), None)
    if mechanism is None:
        names = " or ".join(wanted)
        offers = f"it offers AUTH {' '.join(offered)}" if offered else "it offers no AUTH"
        return HopFailure(
            label,
            f"Credentials are configured but the remote server does not offer AUTH {names} ({offers})",
            TRANSIENT_REPLY,
        )
    if mechanism in ("XOAUTH2", "OAUTHBEARER"):
        return await _bearer_login(session, mechanism, policy)
    answer = await _password_login(session, mechanism, policy)
    if answer.code == 235:
        return None
    # Refused credentials: transient, so the operator can fix them before the mail expires.
    return _refused(label, "The remote server refused our credentials", answer, TRANSIENT_REPLY)


async def _password_login(session: SmtpSession, mechanism: str, policy: SessionPolicy) -> Reply:
    timeout = session.timeouts.command
    if mechanism == "PLAIN":
        session.command("AUTH", "PLAIN " + encode_plain(policy.auth_user, policy.auth_password), secret=True)
        return await session.reply(timeout)
    session.command("AUTH", "LOGIN")
    answer = await session.reply(timeout)
    if answer.code == 334:
        session.auth_response(encode_login(policy.auth_user))
        answer = await session.reply(timeout)
    if answer.code == 334:
        session.auth_response(encode_login(policy.auth_password))
        answer = await session.reply(timeout)
    return answer


def _refused(label: str, what: str, answer: Reply, cause: str, advice: str = "") -> HopFailure:
    """A refused login, named after the provider's reason when there is one (`authcauses`)."""
    reply = str(answer)
    diagnosis = diagnose(reply)
    if diagnosis is not None:
        return HopFailure(
            label, f"{what}: {reply}. {diagnosis.advice}", diagnosis.cause, diagnosis.explain(reply)
        )
    if advice:
        return HopFailure(label, f"{what}: {reply}. {advice}", cause, f"{reply} [{cause}: {advice}]")
    return HopFailure(label, f"{what}: {reply}", cause, reply)


async def _bearer_login(session: SmtpSession, mechanism: str, policy: SessionPolicy) -> HopFailure | None:
    """XOAUTH2 or OAUTHBEARER with the attempt's token. A refusal of the token itself (an error challenge,
    or a 535 that names no other reason) gets one fresh token and one more AUTH on this connection (RFC 4954
    lets a client try again); a connection that breaks first gets it on a new one (`TokenLogin.untried`)."""
    login = policy.oauth
    if login is None:  # the transport makes one for every bearer route; a bug otherwise
        return HopFailure(session.label, "No OAuth token source for this route", OAUTH_TOKEN_FAILED)
    label = session.label
    try:
        token = await login.current()
    except TokenError as exc:
        return HopFailure(label, str(exc), OAUTH_TOKEN_FAILED, f"451 4.7.0 {exc}")
    while True:
        try:
            answer, error = await _bearer_exchange(session, mechanism, policy.auth_user, token.value)
        except ValueError:  # refused by the encoder before anything was sent: never echo the token
            text = f"The token of [oauth.{login.profile}] is not an RFC 6750 bearer token"
            return HopFailure(label, text, OAUTH_TOKEN_FAILED, f"451 4.7.0 {text}")
        if answer.code == 235:
            login.untried = False
            return None
        if answer.code == 535 or error:
            login.untried = False  # the server judged this token
        what = f"The remote server refused the OAuth token for {policy.auth_user} (AUTH {mechanism})"
        if error:
            what += f": {error}"
        if diagnose(str(answer)) is not None or not (answer.code == 535 or error):
            return _refused(label, what, answer, TRANSIENT_REPLY)
        try:
            fresh = await login.refresh()
        except TokenError as exc:
            return HopFailure(label, str(exc), OAUTH_TOKEN_FAILED, f"451 4.7.0 {exc}")
        if fresh is None:  # this attempt had its one refresh: the fresh token was refused too
            return _refused(label, what, answer, OAUTH_TOKEN_REFUSED, TOKEN_REFUSED_ADVICE)
        session.log("=", "token refused: AUTH again with a freshly issued one")
        token = fresh


async def _bearer_exchange(session: SmtpSession, mechanism: str, user: str, token: str) -> tuple[Reply, str]:
    """One bearer AUTH: the initial response, and the server's error challenge answered as the mechanism
    says (XOAUTH2: an empty line; OAUTHBEARER: ^A, RFC 7628 §3.2.3) so that its final reply comes. Returns
    that reply and the challenge's error, described ("" when none came)."""
    timeout = session.timeouts.command
    if mechanism == "XOAUTH2":
        initial, error_answer = encode_xoauth2(user, token), XOAUTH2_ERROR_ANSWER
    else:
        initial = encode_oauthbearer(user, token, session.hop.host, session.hop.port)
        error_answer = OAUTHBEARER_ERROR_ANSWER
    session.command("AUTH", f"{mechanism} {initial}", secret=True)
    answer = await session.reply(timeout)
    error = ""
    if answer.code == 334:
        try:
            error = decode_bearer_error(answer.text).describe()
        except SaslError:
            error = "the server refused the token"
        session.auth_response(error_answer)
        answer = await session.reply(timeout)
    return answer, error


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def send_message(
    session: SmtpSession,
    envelope: Envelope,
    recipients: Sequence[Recipient],
    message: BinaryIO,
    memory: PeerMemory | None = None,
    xexch50: bytes | None = None,
    signer: Callable[[bytes], bytes] | None = None,
) -> list[DeliveryResult]:
    """One mail transaction on a ready session; per-recipient results. Marks the session reusable when it
    ends cleanly (a final reply to the data, or a successful RSET). `signer` (DKIM) gets the bytes that go
    on the wire, after any 7-bit conversion, and returns the header fields to put on top."""
    caps = session.caps
    label = session.label
    timeouts = session.timeouts
    session.reusable = False
    content = _content_for(session, envelope, message, memory)
    if isinstance(content, str):  # the peer cannot take this message in any form
        session.reusable = True
        return [_result(r.address, content, label, permanent=True) for r in recipients]
    if signer is not None:
        content = await _signed(session, content, signer)
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
            session.reusable = True
            return [_result(r.address, text, label, permanent=True) for r in recipients]
        if "SIZE" in offered:
            params["SIZE"] = str(size)
        if (
            envelope.body == "8BITMIME"
            and "8BITMIME" in offered
            and not isinstance(content, bytes)
            and not (
                memory is not None and memory.knows(session.memory_key, PEER_LACKS_8BITMIME, time.time())
            )
        ):
            params["BODY"] = "8BITMIME"
            session.sent_8bit = True  # a drop from here on is the KB286673 failure
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
    blob = _blob_for(session, memory, xexch50)
    send_blob = bool(blob) and "XEXCH50" in offered
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
        session.pipeline(commands)
    else:
        session.command("MAIL", mail_command)
    mail = await session.reply(timeouts.mail, "MAIL")
    rcpt_replies: list[Reply] = []
    go_ahead: Reply | None = None
    if pipelining:
        rcpt_replies = [await session.reply(timeouts.rcpt, "RCPT") for _ in recipients]
        if pipeline_data:
            go_ahead = await session.reply(timeouts.data, "DATA")
    if not mail.is_positive:
        text = reply_text(mail)
        session.rejections.append(Rejection(label, "MAIL", text, f"MAIL {mail_command}"))
        await _void_data(session, go_ahead)
        await _reset(session)
        return [_result(r.address, text, label, permanent=mail.is_permanent) for r in recipients]
    if not pipelining:
        for rcpt in recipients:
            session.command("RCPT", rcpt_arg(rcpt.address, rcpt_params(rcpt)))
            rcpt_replies.append(await session.reply(timeouts.rcpt, "RCPT"))

    results: dict[str, DeliveryResult] = {}
    accepted: list[Recipient] = []
    for rcpt, reply in zip(recipients, rcpt_replies, strict=True):
        if reply.is_positive:
            accepted.append(rcpt)
        else:
            command = f"RCPT {rcpt_arg(rcpt.address, rcpt_params(rcpt))}"
            text = reply_text(reply)
            session.rejections.append(Rejection(label, "RCPT", text, command))
            results[rcpt.address] = _result(rcpt.address, text, label, permanent=reply.is_permanent)
    if accepted and send_blob:
        assert blob is not None
        await _send_xexch50(session, blob)
    if accepted:
        if use_bdat:
            assert not isinstance(content, bytes)
            final = await _send_bdat(session, content)
        else:
            if go_ahead is None:
                session.command("DATA")
                go_ahead = await session.reply(timeouts.data, "DATA")
            final = await _send_data(session, content, go_ahead)
        session.reusable = final.code != 354 and final.code != 421
        text = reply_text(final)
        if not final.is_positive:
            session.rejections.append(Rejection(label, "DATA", text, "DATA"))
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
        await _void_data(session, go_ahead)
        await _reset(session)
    return [results[r.address] for r in recipients]


async def _void_data(session: SmtpSession, go_ahead: Reply | None) -> None:
    """A pipelined DATA that a server answered 354 although it took no recipient (RFC 2920 §3.1 lets it):
    the data phase has begun, so it is closed at once with an empty message, whose reply is read and
    ignored (with no recipient there is nothing to deliver)."""
    if go_ahead is not None and go_ahead.code == 354:
        session.writer.write(session.conn.end_data(session.conn.start_data()))
        session.log(">", "<empty data: no recipient was accepted> .")
        await session.reply(session.timeouts.final, "the end of the data")


async def _reset(session: SmtpSession) -> None:
    """End an unfinished transaction so the session can carry the next message."""
    session.command("RSET")
    answer = await session.reply(session.timeouts.command)
    session.reusable = answer.is_positive


async def _send_data(session: SmtpSession, content: BinaryIO | bytes, go_ahead: Reply) -> Reply:
    """The message after DATA's reply `go_ahead`: the final reply (or `go_ahead` when it is not 354). Each
    block must be taken by the peer within `data_block`; its reply to the final dot within `final`."""
    if go_ahead.code != 354:
        return go_ahead
    timeouts = session.timeouts
    stuffer = session.conn.start_data()
    session.phase = "DATA"
    writer = session.writer
    if isinstance(content, bytes):
        for start in range(0, len(content), BODY_CHUNK):
            writer.write(stuffer.feed(content[start : start + BODY_CHUNK]))
            await session.drain(timeouts.data_block, "the message data")
    else:
        content.seek(0)
        chunk = content.read(BODY_CHUNK)
        while chunk:
            data = stuffer.feed(chunk)
            chunk = content.read(BODY_CHUNK)
            if not chunk and len(data) <= SMALL_TAIL:
                # Speed: the last, small piece of the body goes out in one write with the final "." (most
                # messages are one such piece); a large one is not copied for it.
                writer.write(data + session.conn.end_data(stuffer))
                session.log(">", "<message body> .")
                return await session.reply(timeouts.final, "the end of the data")
            writer.write(data)
            await session.drain(timeouts.data_block, "the message data")
    writer.write(session.conn.end_data(stuffer))
    session.log(">", "<message body> .")
    return await session.reply(timeouts.final, "the end of the data")


async def _send_xexch50(session: SmtpSession, blob: bytes) -> None:
    """`XEXCH50 <n> 2`, the blob, and its 250 (SPEC 2.5). A refusal (504 before AUTH, 500) only means the
    blob is not carried; a peer that goes silent or drops us after the blob is the KB818222 firewall."""
    session.command("XEXCH50", f"{len(blob)} 2")
    answer = await session.reply(session.timeouts.command)
    if answer.code != 354:
        return
    session.phase = "XEXCH50-BLOB"
    session.writer.write(session.conn.send_xexch50_blob(blob))
    session.log(">", f"<XEXCH50 blob, {len(blob)} octets>")
    await session.reply(min(session.timeouts.command, XEXCH50_REPLY_TIMEOUT), "the XEXCH50 blob")


def _blob_for(session: SmtpSession, memory: PeerMemory | None, blob: bytes | None) -> bytes | None:
    if not blob:
        return None
    if memory is not None and memory.knows(session.memory_key, XEXCH50_BLOCKED, time.time()):
        return None
    return blob


async def _send_bdat(session: SmtpSession, content: BinaryIO) -> Reply:
    """RFC 3030: the message in BDAT chunks, unmodified (binary-safe); the LAST chunk's reply is final."""
    timeouts = session.timeouts
    size = _size_of(content)
    sent = 0
    content.seek(0)
    session.phase = "BDAT"
    while True:
        chunk = content.read(BODY_CHUNK)
        sent += len(chunk)
        last = sent >= size or not chunk
        session.writer.write(session.conn.send_bdat(chunk, last=last))
        await session.drain(timeouts.data_block, "the message data")
        reply = await session.reply(timeouts.final if last else timeouts.data_block, "BDAT")
        if last or not reply.is_positive:
            session.log(">", f"<message body in BDAT chunks, {sent} octets>")
            return reply


def _size_of(message: BinaryIO) -> int:
    """Octets in a seekable message handle (a file or BytesIO)."""
    return message.seek(0, io.SEEK_END)


def _content_for(
    session: SmtpSession, envelope: Envelope, message: BinaryIO, memory: PeerMemory | None = None
) -> BinaryIO | bytes | str:
    """What to send: the queued message as it is (the handle); a 7-bit conversion (bytes) for a peer
    without 8BITMIME (RFC 6152, KB286673: sending 8-bit data anyway is what made Exchange 5.5 drop the
    connection); or, as a str, the permanent failure when the peer cannot take the message at all."""
    caps = session.caps
    if envelope.smtputf8 and (caps is None or not caps.has("SMTPUTF8")):
        return "553 5.6.7 The message needs SMTPUTF8 and the remote server does not support it"
    if envelope.body == "BINARYMIME":
        if caps is not None and caps.has("BINARYMIME") and caps.has("CHUNKING"):
            return message  # sent with BDAT, byte for byte
        return "554 5.6.3 The message is binary (BINARYMIME) and the remote server does not accept it"
    message.seek(0)
    if not needs_downgrade(message):
        return message
    distrusted = memory is not None and memory.knows(session.memory_key, PEER_LACKS_8BITMIME, time.time())
    if caps is not None and caps.has("8BITMIME") and not distrusted:
        session.sent_8bit = True
        return message
    try:
        message.seek(0)
        converted = downgrade_to_7bit(message.read())
    except DowngradeError as exc:
        return f"554 {exc.status} The message cannot be converted to 7-bit for this server: {exc}"
    session.log("=", "message converted to 7-bit MIME (the peer does not offer 8BITMIME)")
    return converted


async def _signed(
    session: SmtpSession, content: BinaryIO | bytes, signer: Callable[[bytes], bytes]
) -> BinaryIO | bytes:
    """`content` with the DKIM-Signature fields on top, in the same form (bytes: a 7-bit conversion; a
    handle: as queued). The whole message is read into memory for it (dkimpy signs bytes); signing runs in
    a thread so a large body does not hold up the other sessions. A message the signer cannot parse goes
    unsigned (said in the transcript): refusing it would not make it better."""
    data = content if isinstance(content, bytes) else _read_all(content)
    try:
        header = await asyncio.to_thread(signer, data)
    except ValueError as exc:
        session.log("=", f"message not DKIM-signed: {exc}")
        return content
    session.log("=", f"DKIM-signed ({header.count(b'DKIM-Signature:')} signature(s))")
    return header + data if isinstance(content, bytes) else io.BytesIO(header + data)


def _read_all(message: BinaryIO) -> bytes:
    message.seek(0)
    return message.read()


def diagnose_drop(session: SmtpSession) -> None:
    """The peer closed or stalled: name what it choked on, so the next attempt avoids it (SPEC 2.9)."""
    if session.phase == "EHLO" and not session.tls:
        session.learned.append((session.memory_key, PEER_REJECTS_EHLO))
    elif session.phase in ("MAIL", "RCPT", "DATA") and session.sent_8bit:
        session.learned.append((session.memory_key, PEER_LACKS_8BITMIME))
    elif session.phase == "XEXCH50-BLOB":
        session.learned.append((session.memory_key, XEXCH50_BLOCKED))


def status_of(reply: str, default: str) -> str:
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
        status=status_of(reply, default),
        remote_mta=host,
        dsn_passed_on=dsn_passed_on,
    )
