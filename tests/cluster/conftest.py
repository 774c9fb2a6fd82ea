"""Nodes of a cluster: smtpsvc services (in this process, or a child process that can be SIGKILLed) with
their own mailroot and configuration, sharing one PostgreSQL queue on the test's database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from smtpsvc.app import Service
from smtpsvc.queue.postgres import PostgresQueue
from tests.conftest import StartService, base_sections, write_config
from tests.sink import Sink

LEASE = "2s"  # short, so that a dead node's mail is taken over quickly
LEASE_SECONDS = 2.0


@dataclass
class Cluster:
    dsn: str
    sink: Sink
    start_service: StartService
    tmp_path: Path

    def queue_section(self, node_id: str) -> dict[str, Any]:
        return {"backend": "postgres", "dsn": self.dsn, "node_id": node_id, "lease": LEASE}

    async def node(self, node_id: str, **overrides: dict[str, Any]) -> Service:
        """A node in this process; delivers to the sink unless told otherwise."""
        sections: dict[str, dict[str, Any]] = {
            "queue": self.queue_section(node_id),
            "delivery": {"smart_host": f"[127.0.0.1]:{self.sink.port}", "retry": ["1s"]},
        }
        for section, keys in overrides.items():
            sections.setdefault(section, {}).update(keys)
        return await self.start_service(**sections)

    def config_file(self, node_id: str, **overrides: dict[str, Any]) -> Path:
        """A configuration file for a node run as a child process (tests/process.py)."""
        root = self.tmp_path / f"mailroot-{node_id}"
        sections = base_sections(root, queue=self.queue_section(node_id), **overrides)
        return write_config(self.tmp_path / f"{node_id}.toml", sections)


@pytest.fixture
async def cluster(queue_dsn: str, sink: Sink, start_service: StartService, tmp_path: Path) -> Cluster:
    # queue_dsn comes first: the nodes stop (start_service's teardown) before the database is dropped.
    return Cluster(queue_dsn, sink, start_service, tmp_path)


@pytest.fixture
async def observer(queue_dsn: str) -> AsyncIterator[PostgresQueue]:
    """The shared queue as seen by the test itself (reads, and leases taken by hand)."""
    queue = PostgresQueue(queue_dsn, "observer", 30.0, listen=False)
    await queue.open()
    yield queue
    await queue.close()


async def send_to(port: int, subject: str, recipient: str = "someone@remote.test") -> str:
    """One message through SMTP to 127.0.0.1:port; the reply to the end of DATA (raises on 4xx/5xx)."""
    message = f"From: a@local.test\r\nTo: {recipient}\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n"
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
    await client.connect()
    try:
        _, reply = await client.sendmail("a@local.test", [recipient], message.encode())
    finally:
        try:
            await client.quit()
        except aiosmtplib.SMTPException:
            client.close()
    return reply


def subjects(sink: Sink) -> list[str]:
    """The Subject of every message the sink received, duplicates included."""
    out = []
    for received in sink.messages:
        for line in received.content.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line.removeprefix(b"Subject: ").decode())
    return sorted(out)


async def wait_until_async(probe: Callable[[], Awaitable[object]], what: str, timeout: float = 30.0) -> None:
    """wait_until for a coroutine function: poll until truthy, fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
