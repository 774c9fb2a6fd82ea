"""Fixtures for the PostgreSQL queue: open queues ("nodes") on the test's database. The cluster and the
per-test database (`pg_cluster`, `pg_dsn`, `queue_dsn`) are in tests/conftest.py, shared with tests/cluster.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from smtpsvc.queue.postgres import PostgresQueue

OpenQueue = Callable[..., Awaitable[PostgresQueue]]


@pytest.fixture
async def open_queue(queue_dsn: str) -> AsyncIterator[OpenQueue]:
    """open_queue(node_id, **kwargs) -> an open PostgresQueue on the test database (a "node"); closed
    at the end of the test."""
    opened: list[PostgresQueue] = []

    async def factory(node_id: str = "node-a", **kwargs: Any) -> PostgresQueue:
        kwargs.setdefault("lease_seconds", 30.0)
        queue = PostgresQueue(queue_dsn, node_id, **kwargs)
        await queue.open()
        opened.append(queue)
        return queue

    yield factory
    for queue in opened:
        await queue.close()
