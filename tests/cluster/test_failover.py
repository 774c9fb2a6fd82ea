"""Failover (issue 7, SPEC 2.8): a node killed with SIGKILL while it holds leases leaves them to expire, and
another node takes its messages over, re-categorizes them with its own configuration and delivers them:
none is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpsvc.model import Envelope
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.postgres import PostgresQueue
from tests.cluster.conftest import LEASE_SECONDS, Cluster, send_to, subjects, wait_until_async
from tests.conftest import events_of, smtp_port, wait_until
from tests.peers import LoopbackPeer
from tests.process import ServiceProcess


class Stalling(LoopbackPeer):
    """A next hop that greets and then never answers: a delivery to it hangs, holding its lease."""

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 stalling.test ESMTP\r\n")
        await writer.drain()
        while await reader.read(4096):
            pass  # read the EHLO and whatever follows, answer nothing
        writer.close()


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


async def test_a_node_killed_while_holding_leases_has_its_mail_delivered_by_another_node(
    cluster: Cluster, observer: PostgresQueue, processes: list[ServiceProcess], tmp_path: Path
) -> None:
    stall = Stalling()
    await stall.start()
    config = cluster.config_file(
        "doomed", delivery={"smart_host": f"[127.0.0.1]:{stall.port}", "timeout": "5m", "retry": ["1s"]}
    )
    doomed = ServiceProcess(config, tmp_path / "mailroot-doomed").start()
    processes.append(doomed)
    wanted = [f"f{i}" for i in range(5)]
    for name in wanted:
        assert (await send_to(doomed.port, name)).startswith("2.6.0")

    async def held_by_doomed() -> bool:
        holders = await observer.holders()
        return len(holders) == len(wanted) and set(holders.values()) == {"doomed"}

    await wait_until_async(held_by_doomed, what="every message leased by the doomed node, mid-delivery")
    await wait_until(lambda: stall.connections >= 1, what="the doomed node connected to the next hop")
    doomed.kill()  # SIGKILL: no release, no save; its leases stay until they expire

    survivor = await cluster.node("survivor")  # routes to the sink: its own configuration decides
    await wait_until(lambda: len(cluster.sink.messages) >= len(wanted), what="the survivor's deliveries")
    await wait_until(lambda: survivor.scheduler.inflight == 0, what="the survivor idle")
    assert subjects(cluster.sink) == wanted  # none lost, none twice
    assert await survivor.store.count() == 0
    taken = [e for e in events_of(survivor, 9005) if e.get("cause") == "lease-taken-over"]
    assert len(taken) == len(wanted)
    assert all("node doomed" in e["text"] and "node survivor took it over" in e["text"] for e in taken)
    await stall.stop()


async def test_a_message_whose_state_cannot_be_saved_is_tried_again_after_its_lease_not_in_a_loop(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = await cluster.node("node-a")
    attempts: list[float] = []

    async def failing_process(envelope: Envelope) -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("a bug in one message's delivery")

    async def failing_save(envelope: Envelope) -> None:
        raise QueueError("cannot write this message's state")

    monkeypatch.setattr(node.scheduler, "process", failing_process)
    monkeypatch.setattr(node.store, "save", failing_save)
    await send_to(smtp_port(node), "poison")
    await wait_until(lambda: len(attempts) >= 2, what="a second attempt, after the lease expired")
    assert attempts[1] - attempts[0] >= LEASE_SECONDS * 0.9  # let go, and not taken again before then
    assert any(e.get("cause") == "internal-error" for e in events_of(node, 4000))
