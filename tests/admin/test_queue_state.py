"""The queue's state reads the same in `queue list`, `queue summary`, the web viewer and `GET /api/queue`
(model.queue_status_of), here for mail the destination's backoff holds: a next hop refused with 4xx, so the
next message to it waits without an attempt of its own. The rule itself: tests/queue/test_state.py."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from smtpsvc.app import Service
from tests.conftest import StartService, wait_until
from tests.peers import LoopbackPeer
from tests.test_queue_cli import run
from tests.test_relay import send


class Refusing(LoopbackPeer):
    """A next hop that is busy: 421 to every connection (the destination backs off)."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"421 4.3.2 Service not available, try again later\r\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def refusing() -> AsyncIterator[Refusing]:
    peer = Refusing()
    await peer.start()
    yield peer
    await peer.stop()


async def held_by_the_backoff(start_service: StartService, peer: Refusing) -> tuple[Service, str, str]:
    """Two messages to the refusing smart host: the first is tried (421) and the destination backs off for
    the first retry interval (an hour); the second, queued then, is held without an attempt."""
    service = await start_service(
        admin={"listen": "127.0.0.1:0"},
        delivery={"smart_host": f"[127.0.0.1]:{peer.port}", "retry": ["1h"]},
    )
    await send(service, "alice@local.test", ["x@remote.test"])
    [tried] = await wait_until(
        lambda: [e for e in service.queue.list() if e.recipients[0].attempts], what="the first attempt"
    )
    await send(service, "alice@local.test", ["y@remote.test"])
    [held] = await wait_until(
        lambda: [
            e
            for e in service.queue.list()
            if e.id != tried.id
            and e.recipients[0].next_attempt > time.time() + 60
            and not service.queue.leased  # both saved: neither is being delivered
        ],
        what="the second message held by the destination's backoff",
    )
    assert held.recipients[0].attempts == 0 and peer.connections == 1  # held, not tried
    return service, tried.id, held.id


async def test_mail_held_by_the_backoff_is_in_retry_in_every_view(
    start_service: StartService, refusing: Refusing
) -> None:
    service, tried, held = await held_by_the_backoff(start_service, refusing)
    config = str(service.config_path)

    code, out, _ = await run("queue", "list", "-c", config)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    for queue_id in (tried, held):
        assert re.search(r"  retry  .* next (5\dm|60m|1h)$", lines[queue_id]), lines[queue_id]
    assert (await run("queue", "list", "-c", config, "--state", "ready"))[1] == "no message matches\n"
    code, out, _ = await run("queue", "list", "-c", config, "--state", "retry")
    assert tried in out and held in out

    code, out, _ = await run("queue", "summary", "-c", config)
    [link] = [line for line in out.splitlines() if line.startswith("smarthost")]
    assert re.search(r" 2 +2 .* retry +in (5\dm|60m|1h)$", link), link

    assert service.admin is not None and service.admin_context is not None
    host, port = service.admin.address
    headers = {"Authorization": f"Bearer {service.admin_context.token}"}
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=headers, timeout=30) as http:
        listed = (await http.get("/api/queue")).json()
        [summary] = (await http.get("/api/queue/summary")).json()
        page = (await http.get("/")).text
    by_id = {m["id"]: m for m in listed["messages"]}
    assert {by_id[tried]["state"], by_id[held]["state"]} == {"retry"}
    assert by_id[held]["next_attempt"] > time.time() + 60
    assert summary["state"] == "retry"
    assert summary["next_attempt"] == min(by_id[q]["next_attempt"] for q in (tried, held))
    # the web viewer: the link and both of its messages in retry, none ready
    assert page.count('class="state-retry"') == 3 and 'class="state-ready"' not in page
