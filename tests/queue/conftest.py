"""Fixtures for the PostgreSQL queue: one throwaway cluster per test session, one fresh database per test.

Without PostgreSQL (server binaries or the asyncpg driver) the tests are skipped on a developer's machine
and FAIL in CI (CI=true), where .ci/run installs both.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NoReturn

import pytest

from smtpsvc.queue import pgschema
from smtpsvc.queue.postgres import PostgresQueue
from tests.pg import PgCluster, find_bindir

OpenQueue = Callable[..., Awaitable[PostgresQueue]]


def _missing(what: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: .ci/run installs it")
    pytest.skip(f"{what} is not installed here (CI installs it)")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _missing("the asyncpg driver (pip install -e '.[test]')")
    bindir = find_bindir()
    if bindir is None:
        _missing("PostgreSQL (apt-get install postgresql)")
    cluster = PgCluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def pg_dsn(pg_cluster: PgCluster) -> AsyncIterator[str]:
    """A DSN for a new, empty database, dropped after the test."""
    import asyncpg

    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_cluster.dsn(), timeout=10)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield pg_cluster.dsn(name)
    if pg_cluster.pid() is None:  # a test stopped the server and failed before starting it again
        pg_cluster.start()
    admin = await asyncpg.connect(pg_cluster.dsn(), timeout=10)
    try:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await admin.close()


@pytest.fixture
async def queue_dsn(pg_dsn: str) -> str:
    """A DSN for a new database with the queue schema in it."""
    await pgschema.migrate_dsn(pg_dsn)
    return pg_dsn


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
