"""With SMTP worker processes (`server.workers` = 2 here, whatever the cores), the limits and counters are
the service's, not each process's: one AUTH failure limiter, one `server.max_connections`, one /metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpsvc import events, workers
from smtpsvc.app import Service
from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.metrics import Metrics, WorkerSamples
from smtpsvc.workers import MasterChannel
from tests.conftest import StartService, smtp_port, wait_events, wait_until
from tests.rawclient import RawClient
from tests.security.helpers import b64, greeted, plain

TWO = {"workers": 2}
WRONG = "Tr0ub4dor&3-wrong"


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_auth_failures_on_every_worker_count_once_for_the_service(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(server=TWO, auth={"users_file": str(users_file), "require_tls": False})
    assert service.workers is not None and service.workers.count == 2
    # The main process's limiter is the service's (read at each question): short pauses, same policy.
    service.smtp.context.limiter = AuthLimiter(base_delay=0.05, max_delay=0.2)
    for guess in range(5):  # one guess per connection: the kernel spreads them over both workers
        client = await greeted(service)
        assert await client.command(f"AUTH LOGIN {b64('someone')}") == "334 UGFzc3dvcmQ6"
        assert (await client.command(b64(WRONG))).startswith("421 4.7.0" if guess == 4 else "535 5.7.8")
        await client.close()
    for _ in range(3):  # whichever worker takes the next connection, the address is cut off
        client = await greeted(service)
        assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("421 4.7.0")
        assert await client.closed()
    assert len(await wait_events(service, 7010, 8)) == 8


async def test_max_connections_is_the_services_limit_not_each_workers(start_service: StartService) -> None:
    service = await start_service(server={**TWO, "max_connections": 4})
    port = smtp_port(service)
    clients = [await greeted(service) for _ in range(4)]
    await wait_until(lambda: service.smtp.active_sessions == 4, what="four sessions counted")
    for _ in range(3):  # on either worker: the service has its 4
        extra = await RawClient.connect(port)
        assert (await extra.reply(timeout=30)).startswith("421 4.7.0")
        assert await extra.closed()
    [event] = (await wait_events(service, 402))[:1]
    assert event["text"] == events.connection_limit_text(4)  # the service's limit, not a share
    await clients.pop().close()
    await wait_until(lambda: service.smtp.active_sessions == 3, what="the session to end")
    again = await greeted(service)
    assert (await again.command("NOOP")) == "250 2.0.0 OK"
    for client in [*clients, again]:
        await client.close()


async def test_metrics_add_up_the_sessions_of_every_worker(start_service: StartService) -> None:
    service: Service = await start_service(server=TWO)
    open_client = await greeted(service)
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250")
    body, _ = await service._render_metrics()  # what GET /metrics serves
    s = samples(body)
    assert s[("smtpsvc_smtp_connections_total", ())] == 2
    assert s[("smtpsvc_smtp_sessions", ())] == 2
    assert s[("smtpsvc_smtp_commands_total", (("verb", "DATA"),))] == 1
    assert s[("smtpsvc_messages_received_total", (("source", "smtp"),))] == 1
    assert s[("smtpsvc_smtp_accept_duration_seconds_count", ())] == 1
    assert s[("smtpsvc_events_total", (("id", "3001"),))] == 1  # a worker's event
    await client.close()
    await open_client.close()
    await wait_until(lambda: service.smtp.active_sessions == 0, what="the sessions to end")
    s = samples((await service._render_metrics())[0])
    assert s[("smtpsvc_smtp_sessions", ())] == 0 and s[("smtpsvc_smtp_connections_total", ())] == 2


def test_merged_series_add_up_and_a_gone_worker_keeps_its_counts_but_not_its_sessions() -> None:
    main, worker = Metrics(), Metrics()
    worker.session_opened()
    worker.session_opened()
    worker.session_closed()
    worker.on_event(events.Event(events.CLIENT_COMMAND_REJECTED, "x"))
    main.on_event(events.Event(events.MESSAGE_DELIVERED, "y"))
    live = WorkerSamples()
    live.add(worker.samples())
    s = samples(main.render(live)[0])
    assert s[("smtpsvc_smtp_connections_total", ())] == 2 and s[("smtpsvc_smtp_sessions", ())] == 1
    assert s[("smtpsvc_events_total", (("id", "7010"),))] == 1  # only the worker logged one
    assert s[("smtpsvc_events_total", (("id", "3002"),))] == 1
    gone = WorkerSamples()
    gone.add(worker.samples(), counters_only=True)
    gone.add([["counter", "x", "not labels", "nan?"], ["broken"]])  # a bad item is left out
    s = samples(main.render(gone)[0])
    assert s[("smtpsvc_smtp_connections_total", ())] == 2 and s[("smtpsvc_smtp_sessions", ())] == 0


async def test_a_worker_whose_main_process_does_not_answer_counts_auth_failures_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "AUTH_TIMEOUT", 0.2)
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    channel = MasterChannel(reader, writer)
    try:
        assert await channel.check("192.0.2.1") == (False, 0.0)
        answers = [await channel.failed("192.0.2.1") for _ in range(5)]
        assert answers == [False, False, False, False, True]  # the worker's own count: the same policy
        assert (await channel.check("192.0.2.1"))[0] is True
        theirs.setblocking(False)
        asked = theirs.recv(65536).decode()
        assert asked.startswith("A 1 c 192.0.2.1\n") and "A 2 f 192.0.2.1\n" in asked
    finally:
        writer.close()
        theirs.close()


async def test_what_a_worker_counted_stays_counted_after_it_stopped(start_service: StartService) -> None:
    service = await start_service(server=TWO)
    assert service.workers is not None
    for _ in range(3):
        client = await greeted(service)
        await client.command("QUIT")
        await client.close()
    await wait_until(lambda: service.smtp.active_sessions == 0, what="the sessions to end")
    before = {w["pid"] for w in service.workers.status()}
    for pid in before:  # as a stop: each sends its last counters before it exits; the pool restarts it
        os.kill(pid, signal.SIGTERM)
    await wait_until(
        lambda: (
            len(now := service.workers.status() if service.workers else []) == 2
            and all(w["ready"] for w in now)
            and not before & {w["pid"] for w in now}
        ),
        what="both workers restarted",
    )
    s = samples((await service._render_metrics())[0])
    assert s[("smtpsvc_smtp_connections_total", ())] == 3
    assert s[("smtpsvc_smtp_commands_total", (("verb", "QUIT"),))] == 3
