"""Delivery that stays polite under outage and recovery, with the service's DEFAULT delivery settings
(retry 15 m, slow start from 2 connections, 20 messages per connection, RFC 5321 timeouts): a recovering
peer with a small listen backlog gets a trickle then more, never a flood; a backlog goes over few
connections; a host that never greets or refuses says so, and the next MX is tried."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtpsvc.app import Service
from smtpsvc.config import load_config
from tests.conftest import events_of, smtp_port, wait_until, write_config
from tests.dnsserver import DnsServer
from tests.peers import SmallBacklogPeer
from tests.process import ServiceProcess
from tests.sink import Sink
from tests.test_queue_cli import run
from tests.test_relay import MESSAGE

INITIAL = 2  # delivery.initial_connections_per_domain, the default


def config_file(tmp_path: Path, root: Path, **delivery: Any) -> Path:
    """The defaults, plus where mail goes (and the admin API on a free port for `queue retry`)."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": "relay.test", "root": str(root), "listen": ["127.0.0.1:0"]},
        "domains": {"local": ["local.test"]},
        "delivery": delivery,
        "admin": {"listen": "127.0.0.1:0"},
    }
    return write_config(tmp_path / "smtpsvc.toml", sections)


async def start_in_process(path: Path) -> Service:
    service = Service(load_config(str(path), env={}), str(path), log_stream=None, pickup_interval=0.05)
    await service.start()
    return service


async def submit(port: int, count: int, clients: int = 8) -> None:
    """`count` 1 KiB messages to x<n>@remote.test over `clients` concurrent SMTP sessions."""
    body = MESSAGE + (b"x" * 98 + b"\r\n") * 10

    async def client(numbers: range) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await smtp.connect()
        for n in numbers:
            await smtp.sendmail("alice@local.test", [f"x{n}@remote.test"], body)
        await smtp.quit()

    await asyncio.gather(*(client(range(c, count, clients)) for c in range(clients)))


def queued(root: Path) -> list[dict[str, Any]]:
    out = []
    for path in (root / "queue").glob("*.env"):
        try:
            out.append(json.loads(path.read_bytes()))
        except (OSError, ValueError):
            continue  # being replaced this very moment
    return out


def all_tried(root: Path, count: int) -> bool:
    envelopes = queued(root)
    return len(envelopes) == count and all(e["recipients"][0]["attempts"] >= 1 for e in envelopes)


@pytest.mark.parametrize("restart", ["none", "kill -9"])
async def test_300_deferred_messages_reach_a_recovering_peer_with_a_backlog_of_5_within_60s(
    tmp_path: Path, restart: str
) -> None:
    peer = SmallBacklogPeer(backlog=5).start()
    root = tmp_path / "mailroot"
    path = config_file(tmp_path, root, smart_host=f"[127.0.0.1]:{peer.port}")
    service = ServiceProcess(path, root).start()
    try:
        await submit(service.port, 300)
        # Every message tried once and deferred by the peer's 451 (the next retry is 15 minutes away).
        await wait_until(lambda: all_tried(root, 300), timeout=120, what="300 deferred messages")
        if restart == "kill -9":
            service.kill()
            service = ServiceProcess(path, root).start()
        await wait_until(lambda: peer.open == 0, timeout=60, what="cached connections to close")
        greeted_before = peer.greeted
        accepts_before = len(peer.accepts)
        peer.down = False
        started = time.monotonic()
        code, out, err = await run("queue", "retry", "-c", str(path), "--all")
        assert code == 0, out + err
        await wait_until(lambda: peer.messages >= 300, timeout=60, what="300 deliveries after the recovery")
        assert time.monotonic() - started < 60
        await wait_until(lambda: not queued(root), timeout=30, what="an empty queue")
    finally:
        service.kill()
        peer.stop()
    # Slow start, as the peer saw it: never more than INITIAL connections being opened at once (no burst
    # of connection attempts), and every connection beyond INITIAL earned by one that finished its EHLO
    # before it (a connection counts until it is closed).
    for open_now, greeted, opening in peer.accepts[accepts_before:]:
        assert opening <= INITIAL, peer.accepts[accepts_before:]
        assert open_now <= INITIAL + (greeted - greeted_before), peer.accepts[accepts_before:]
    assert peer.most_open <= 20  # 300 messages, 20 per connection: about 15, never a flood


async def test_25_messages_queued_while_the_smart_host_was_down_go_over_at_most_2_connections(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:  # a port where nothing listens yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "mailroot"
    service = await start_in_process(config_file(tmp_path, root, smart_host=f"[127.0.0.1]:{port}"))
    peer: SmallBacklogPeer | None = None
    try:
        await submit(smtp_port(service), 25, clients=1)
        # One attempt found the host down; the destination is dead for a retry interval and the others
        # wait with it (no attempt, no connection of their own).
        await wait_until(
            lambda: (
                len(service.queue.list()) == 25
                and all(e.recipients[0].next_attempt > time.time() + 600 for e in service.queue.list())
            ),
            timeout=60,
            what="25 messages waiting for the smart host",
        )
        assert len(events_of(service, 4006)) == 1
        peer = SmallBacklogPeer(port=port).start()
        peer.down = False
        code, out, err = await run("queue", "retry", "-c", str(service.config_path), "--all")
        assert code == 0, out + err
        await wait_until(lambda: peer is not None and peer.messages == 25, timeout=60, what="25 deliveries")
        assert peer.connections <= 2
    finally:
        await service.stop()
        if peer is not None:
            peer.stop()


class SilentPeer:
    """Accepts TCP connections and never says a word (a wedged MTA, or a firewall that answers the SYN)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> SilentPeer:
        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            await reader.read()  # until we are closed
            writer.close()

        self._server = await asyncio.start_server(session, self.host, self.port)
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()


def two_addresses_one_port() -> int:
    """A port free on both 127.0.0.1 and 127.0.0.2 (MX hosts share the route's port)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.2", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2")


async def test_a_peer_that_never_greets_costs_one_greeting_timeout_and_the_next_mx_is_tried(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    port = two_addresses_one_port()
    silent = await SilentPeer("127.0.0.2", port).start()
    sink = Sink().start(port=port)
    dns_server.add_mx("remote.test", 10, "wedged.remote.test")
    dns_server.add_mx("remote.test", 20, "good.remote.test")
    dns_server.add_a("wedged.remote.test", "127.0.0.2")
    dns_server.add_a("good.remote.test", "127.0.0.1")
    root = tmp_path / "mailroot"
    path = config_file(tmp_path, root, remote_port=port, greeting_timeout="2s")
    path.write_text(path.read_text() + f'\n[resolver]\nnameservers = ["{dns_server.nameserver}"]\n')
    service = await start_in_process(path)
    try:
        started = time.monotonic()
        await submit(smtp_port(service), 1, clients=1)
        await wait_until(lambda: sink.messages, timeout=60, what="delivery by the second MX")
        elapsed = time.monotonic() - started
        [skipped] = events_of(service, 4006)
    finally:
        await service.stop()
        await silent.stop()
        sink.stop()
    assert 2 <= elapsed < 30 and silent.connections == 1
    assert skipped["host"] == f"wedged.remote.test[127.0.0.2]:{port}"
    assert skipped["cause"] == "greeting-timeout"
    assert "sent no greeting within 2s" in skipped["text"] and "dropped" not in skipped["text"]


async def test_a_refused_connection_is_reported_as_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "mailroot"
    service = await start_in_process(config_file(tmp_path, root, smart_host=f"[127.0.0.1]:{port}"))
    try:
        await submit(smtp_port(service), 1, clients=1)
        [skipped] = await wait_until(lambda: events_of(service, 4006), timeout=30, what="event 4006")
        [deferred] = await wait_until(lambda: events_of(service, 4000), timeout=30, what="event 4000")
    finally:
        await service.stop()
    assert "refused the connection" in skipped["text"] and "did not respond" not in skipped["text"]
    assert skipped["cause"] == deferred["cause"] == "connection-failed"


class StallingPeer:
    """Greets and answers EHLO, then never answers MAIL (a peer stuck behind a slow content filter)."""

    def __init__(self) -> None:
        self.port = 0
        self.connected_at: list[float] = []  # when each connection was accepted (time.time())
        self._server: asyncio.Server | None = None

    async def start(self) -> StallingPeer:
        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connected_at.append(time.time())
            writer.write(b"220 stall.test ESMTP\r\n")
            while line := await reader.readline():
                if line.upper().startswith(b"EHLO"):
                    writer.write(b"250-stall.test\r\n250 PIPELINING\r\n")
                elif line.upper().startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
            writer.close()

        self._server = await asyncio.start_server(session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()


async def test_a_reply_that_never_comes_is_reported_as_a_timeout_of_that_command(tmp_path: Path) -> None:
    peer = await StallingPeer().start()
    root = tmp_path / "mailroot"
    path = config_file(tmp_path, root, smart_host=f"[127.0.0.1]:{peer.port}", mail_timeout="1s")
    service = await start_in_process(path)
    try:
        await submit(smtp_port(service), 1, clients=1)
        [skipped] = await wait_until(lambda: events_of(service, 4006), timeout=30, what="event 4006")
        [envelope] = service.queue.list()
    finally:
        await service.stop()
        await peer.stop()
    assert skipped["cause"] == "reply-timeout"
    assert "did not reply to MAIL within 1s" in skipped["text"] and "dropped" not in skipped["text"]
    assert any("no reply to MAIL within 1s" in line for line in envelope.transcripts[-1])


async def test_a_transcript_says_when_its_attempt_started_not_when_it_ended(tmp_path: Path) -> None:
    peer = await StallingPeer().start()
    root = tmp_path / "mailroot"
    path = config_file(tmp_path, root, smart_host=f"[127.0.0.1]:{peer.port}", mail_timeout="3s")
    service = await start_in_process(path)
    try:
        await submit(smtp_port(service), 1, clients=1)
        await wait_until(lambda: events_of(service, 4006), timeout=30, what="the attempt to end")
        [envelope] = service.queue.list()
    finally:
        await service.stop()
        await peer.stop()
    header = envelope.transcripts[-1][0]
    assert header.startswith("attempt at ")
    started = email.utils.parsedate_to_datetime(header.removeprefix("attempt at ")).timestamp()
    # Whole seconds: the attempt began before its connection was accepted and ended 3 s (MAIL's timeout)
    # after it; a header written at the end would be at least a second later.
    assert started <= peer.connected_at[0]
