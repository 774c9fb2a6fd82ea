"""A running service with its admin API on 127.0.0.1:0 and a smart host (the sink) that can be "down"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from smtpsvc.app import Service
from smtpsvc.model import Envelope, Recipient
from tests.conftest import StartService, eventually
from tests.sink import Sink


@dataclass
class Admin:
    service: Service
    sink: Sink
    url: str
    token: str

    def client(self, token: bool = True) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token}"} if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
async def admin(start_service: StartService, sink: Sink) -> AsyncIterator[Admin]:
    service = await start_service(
        admin={"listen": "127.0.0.1:0"},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["1h"]},
    )
    assert service.admin is not None and service.admin_context is not None
    host, port = service.admin.address
    yield Admin(service, sink, f"http://{host}:{port}", service.admin_context.token)


async def job_done(http: httpx.AsyncClient, started: httpx.Response) -> dict[str, Any]:
    """The job a bulk request answered with (202, Location), polled until it is no longer running."""
    assert started.status_code == 202, started.text
    location = started.headers["location"]
    assert location == f"/api/jobs/{started.json()['job']['id']}"

    async def ended() -> dict[str, Any] | None:
        job: dict[str, Any] = (await http.get(location)).json()["job"]
        return job if job["state"] != "running" else None

    found: dict[str, Any] = await eventually(ended, what=f"job {location} to end")
    return found


async def queue_many(service: Service, count: int) -> list[str]:
    """`count` messages put straight into the service's queue (far quicker than SMTP), each for one
    recipient at remote.test on the smarthost link, tried once and waiting an hour (state retry)."""
    later = time.time() + 3600

    async def one(n: int) -> str:
        writer = service.store.create_writer()
        writer.write(b"From: alice@local.test\r\nSubject: bulk\r\n\r\nbody\r\n")
        recipient = Recipient(f"r{n}@remote.test", attempts=1, next_attempt=later, route="smarthost")
        envelope = Envelope(writer.id, "alice@local.test", [recipient], time.time())
        await service.store.put(writer, envelope)
        return envelope.id

    return list(await asyncio.gather(*(one(n) for n in range(count))))
