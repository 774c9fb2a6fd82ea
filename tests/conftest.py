"""Shared fixtures: a config writer, the service running in-process on 127.0.0.1:0, a sink, a DNS server, and
a throwaway PostgreSQL cluster with a fresh database per test (tests/queue, tests/cluster).

Without PostgreSQL (server binaries or the asyncpg driver) its tests are skipped on a developer's machine
and FAIL in CI (CI=true), where .ci/run installs both.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from smtpsvc.app import Service
from smtpsvc.config import Config, load_config
from smtpsvc.queue import pgschema
from smtpsvc.queue.local import LocalSpool
from tests.dnsserver import DnsServer
from tests.pg import PgCluster, find_bindir
from tests.sink import Sink


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in keys.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def base_sections(root: Path, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A test config: hostname relay.test, local domain local.test, loopback port 0, fast retries."""
    sections: dict[str, dict[str, Any]] = {
        "server": {
            "hostname": "relay.test",
            "root": str(root),
            "listen": ["127.0.0.1:0"],
            "connection_timeout": "30s",
            "data_timeout": "60s",
        },
        "domains": {"local": ["local.test"]},
        "delivery": {"retry": ["1s"], "expiration": "1h", "timeout": "10s"},
        "admin": {"listen": ""},  # tests that use the admin API ask for "127.0.0.1:0"
    }
    for section, keys in overrides.items():
        sections.setdefault(section, {}).update(keys)
    return sections


T = TypeVar("T")


async def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `predicate` until truthy; fail after `timeout` seconds (a bounded wait, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def eventually(probe: Callable[[], Awaitable[T]], timeout: float = 20.0, what: str = "condition") -> T:
    """Await `probe()` until it returns something truthy; fail after `timeout` seconds (bounded polling)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


StartService = Callable[..., Awaitable[Service]]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[LocalSpool]:
    """An opened local spool in tmp_path/queue (the spool's and the spare pool's tests)."""
    s = LocalSpool(tmp_path / "queue")
    s.open()
    yield s
    s.close()


@pytest.fixture
async def start_service(tmp_path: Path) -> AsyncIterator[StartService]:
    """Start the service in this event loop with a test config (overrides per section)."""
    started: list[Service] = []

    async def start(_extra: str = "", **overrides: dict[str, Any]) -> Service:
        """`_extra` is raw TOML appended to the config (arrays of tables such as [[connector]])."""
        config_file = write_config(
            tmp_path / f"smtpsvc{len(started)}.toml",
            base_sections(tmp_path / f"mailroot{len(started) or ''}", **overrides),
        )
        if _extra:
            config_file.write_text(config_file.read_text() + "\n" + _extra)
        config: Config = load_config(str(config_file), env={})
        service = Service(config, str(config_file), log_stream=None, pickup_interval=0.05)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink().start()
    yield server
    server.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def events_of(service: Service, event_id: int) -> list[dict[str, Any]]:
    """The service's events with this id, from log/events.jsonl (flushed first)."""
    service.events.flush()
    path = service.folders["log"] / "events.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["id"] == event_id]


async def wait_events(
    service: Service, event_id: int, count: int = 1, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """At least `count` events with this id (all of them, as `events_of`). The SMTP workers (the default,
    `server.workers = "auto"`) write their sessions' events themselves, within a second as the main
    process does (each flushes its buffer every second): a test waits for them, bounded."""

    def enough() -> list[dict[str, Any]] | None:
        found = events_of(service, event_id)
        return found if len(found) >= count else None

    found: list[dict[str, Any]] = await wait_until(enough, timeout, what=f"{count} event(s) {event_id}")
    return found


def smtp_port(service: Service) -> int:
    return service.smtp.sockets[0][1]


# -- PostgreSQL -----------------------------------------------------------------------------------------
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
