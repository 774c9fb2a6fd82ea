"""Supervised tasks: a part of the running service that dies with an error (the scheduler, the queue's
recovery) is logged as event 9007 in one line, /healthz answers 503 naming it until it runs again, and it is
restarted after a backoff; mail flows again. The service runs in this event loop, with its admin API and a
real sink as smart host; the failures are injected into the running parts."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from smtpsvc import events
from smtpsvc.app import Service
from smtpsvc.config import load_config
from smtpsvc.model import Envelope, Recipient
from smtpsvc.queue.local import LocalSpool
from smtpsvc.supervise import backoff, describe
from tests.conftest import base_sections, eventually, wait_until, write_config
from tests.sink import Sink
from tests.test_relay import send

Started = Callable[[Path], Awaitable[tuple[Service, io.StringIO]]]


@pytest.fixture
async def started(tmp_path: Path, sink: Sink) -> AsyncIterator[Started]:
    """Start a service on `root` (admin API on, the sink as smart host); its log stream is kept, to show
    what an administrator would read."""
    services: list[Service] = []

    async def start(root: Path) -> tuple[Service, io.StringIO]:
        sections = base_sections(
            root, admin={"listen": "127.0.0.1:0"}, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"}
        )
        config_file = write_config(tmp_path / f"smtpsvc{len(services)}.toml", sections)
        stream = io.StringIO()
        service = Service(load_config(str(config_file), env={}), str(config_file), log_stream=stream)
        await service.start()
        services.append(service)
        return service, stream

    yield start
    for service in services:
        await service.stop()


async def health(service: Service) -> tuple[int, dict[str, Any]]:
    assert service.admin is not None
    host, port = service.admin.address
    async with httpx.AsyncClient(timeout=30) as http:
        reply = await http.get(f"http://{host}:{port}/healthz")
    return reply.status_code, reply.json()


def logged(service: Service, event_id: int, cause: str = "") -> list[dict[str, Any]]:
    service.events.flush()
    found = events.read_events(service.folders["log"] / "events.jsonl")
    return [e for e in found if e["id"] == event_id and (not cause or e.get("cause") == cause)]


async def test_a_scheduler_that_dies_is_logged_reported_unhealthy_and_restarted(
    tmp_path: Path, started: Started, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    service, stream = await started(tmp_path / "mailroot")
    assert (await health(service))[0] == 200
    broken = True
    real_start_due = service.scheduler._start_due

    async def start_due(limit: int) -> float | None:
        if broken:  # a bug in the scheduler, as it would surface: an exception out of its loop
            raise RuntimeError("simulated scheduler bug:\nsecond line")
        return await real_start_due(limit)

    service.scheduler._start_due = start_due  # type: ignore[method-assign]
    await send(service, "alice@local.test", ["bob@remote.test"])  # taken, but nothing delivers it

    async def unhealthy() -> dict[str, Any] | None:
        code, body = await health(service)
        return body if code == 503 else None

    body = await eventually(unhealthy, what="/healthz 503 while the scheduler is down")
    assert body["status"] == "task-stopped: scheduler"
    assert "RuntimeError: simulated scheduler bug: second line" in body["tasks_stopped"]["scheduler"]
    [stopped, *_] = logged(service, events.TASK_STOPPED)
    assert stopped["level"] == "error" and stopped["cause"] == "task-stopped"
    assert stopped["text"].startswith(
        "The scheduler task stopped with an error: RuntimeError: simulated scheduler bug: second line (in "
        "start_due, test_supervise.py:"
    )
    assert stopped["text"].endswith("; it is restarted in 1s")
    assert not sink.messages

    broken = False  # the next restart runs for good
    await eventually(
        lambda: _ok(service), timeout=30, what="/healthz ok again once the scheduler is restarted"
    )
    assert logged(service, events.SERVICE_STARTED, "task-restarted")
    await wait_until(lambda: sink.messages, what="the message delivered by the restarted scheduler")
    service.events.flush()
    assert "Traceback" not in stream.getvalue()
    assert "Traceback" not in (service.folders["log"] / "events.jsonl").read_text()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # asyncio's "never retrieved"


async def _ok(service: Service) -> bool:
    code, body = await health(service)
    return code == 200 and body["status"] == "ok" and body["tasks_stopped"] == {}


async def test_a_recovery_that_dies_is_restarted_and_indexes_the_whole_queue(
    tmp_path: Path, started: Started, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "mailroot"
    spool = LocalSpool(root / "queue")  # a stopped service's queue, with ten messages due now
    spool.open()
    for n in range(10):
        writer = spool.create_writer()
        writer.write(f"Subject: m{n}\r\n\r\nbody\r\n".encode())
        await spool.put(writer, _envelope(writer.id, n))
    await spool.drain()
    spool.close()
    real_take_batch = LocalSpool._take_batch
    failures = [RuntimeError("simulated indexing bug")]

    def take_batch(self: LocalSpool, batch: Any) -> None:
        if failures:
            raise failures.pop()
        real_take_batch(self, batch)

    monkeypatch.setattr(LocalSpool, "_take_batch", take_batch)
    service, stream = await started(root)
    await wait_until(lambda: len(sink.messages) == 10, timeout=30, what="all ten delivered")
    [stopped] = logged(service, events.TASK_STOPPED)
    assert stopped["text"].startswith(
        "The queue-recovery task stopped with an error: RuntimeError: simulated indexing bug"
    )
    assert logged(service, events.SERVICE_STARTED, "task-restarted")
    assert logged(service, events.SERVICE_STARTED, "queue-recovered")
    assert await _ok(service)
    assert "Traceback" not in stream.getvalue()


def _envelope(queue_id: str, n: int) -> Envelope:
    recipient = Recipient(f"r{n}@remote.test", route="smarthost")
    return Envelope(queue_id, "alice@local.test", [recipient], time.time())


@pytest.mark.parametrize(
    ("previous", "ran_for", "expected"),
    [
        (None, 0.0, 1.0),  # the first failure: 1 s
        (1.0, 0.5, 2.0),  # again at once: doubled
        (32.0, 3.0, 60.0),  # never more than a minute
        (60.0, 3.0, 60.0),
        (60.0, 60.0, 1.0),  # it had run a minute: a new failure, not a crash loop
    ],
)
def test_the_restart_backoff_doubles_up_to_a_minute_and_resets_after_a_good_run(
    previous: float | None, ran_for: float, expected: float
) -> None:
    assert backoff(previous, ran_for) == expected


def test_an_error_is_described_in_one_line_with_where_it_was_raised() -> None:
    try:
        raise OSError(5, "Input/output error\non the disk")
    except OSError as exc:
        text = describe(exc)
    assert "\n" not in text
    assert text.startswith("OSError: [Errno 5] Input/output error on the disk (in test_an_error_is_described")
    assert describe(KeyError()) == "KeyError"
