"""The PostgreSQL queue schema: versioned migrations, idempotent and safe to run concurrently, and the
`smtpsvc db init|migrate` helpers' answers and errors."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from smtpsvc.queue import pgschema
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.postgres import PostgresQueue
from tests.pg import PgCluster, free_port


async def versions(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["version"] for r in await conn.fetch("SELECT version FROM schema_version ORDER BY version")]
    finally:
        await conn.close()


async def test_migrate_is_idempotent(pg_dsn: str) -> None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await pgschema.migrate(conn) == (0, pgschema.LATEST)
        assert await pgschema.migrate(conn) == (pgschema.LATEST, pgschema.LATEST)
    finally:
        await conn.close()
    assert await versions(pg_dsn) == [m.version for m in pgschema.MIGRATIONS]


async def test_concurrent_migrations_apply_each_step_once(pg_dsn: str) -> None:
    results = await asyncio.gather(*(pgschema.migrate_dsn(pg_dsn) for _ in range(4)))
    assert sum(r.startswith("created") for r in results) == 1
    assert sum("nothing to do" in r for r in results) == 3
    assert await versions(pg_dsn) == [m.version for m in pgschema.MIGRATIONS]


async def test_a_version_1_database_is_upgraded_with_the_frozen_links_and_keeps_its_mail(pg_dsn: str) -> None:
    first = pgschema.MIGRATIONS[0]
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with conn.transaction():  # what smtpsvc 0.1 (schema version 1) left behind
            await conn.execute(
                "CREATE TABLE schema_version (version integer PRIMARY KEY, description text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            await conn.execute(first.sql)
            await conn.execute("INSERT INTO schema_version VALUES (1, $1)", first.description)
            await conn.execute(
                "INSERT INTO messages (id, sender, received_at, size, envelope, body, next_due)"
                " VALUES ('Q1', '', 1.0, 1, '{}', 'x', 0)"
            )
    finally:
        await conn.close()
    with pytest.raises(QueueError, match="run `smtpsvc db migrate`"):
        await PostgresQueue(pg_dsn, "node-a").open()
    assert (
        await pgschema.migrate_dsn(pg_dsn)
        == f"upgraded the smtpsvc queue schema from version 1 to {pgschema.LATEST}"
    )
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM links") == 0
        assert await conn.fetchval("SELECT id FROM messages") == "Q1"
    finally:
        await conn.close()


async def test_init_creates_then_reports_nothing_to_do(pg_dsn: str) -> None:
    assert await pgschema.init(pg_dsn) == f"created the smtpsvc queue schema, version {pgschema.LATEST}"
    assert "nothing to do" in await pgschema.init(pg_dsn)
    assert "nothing to do" in await pgschema.migrate_dsn(pg_dsn)


async def test_a_schema_newer_than_this_program_is_refused(pg_dsn: str) -> None:
    await pgschema.migrate_dsn(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("INSERT INTO schema_version (version, description) VALUES (999, 'future')")
    finally:
        await conn.close()
    with pytest.raises(pgschema.DatabaseError, match="upgrade smtpsvc"):
        await pgschema.migrate_dsn(pg_dsn)
    with pytest.raises(pgschema.DatabaseError, match="upgrade smtpsvc"):
        await pgschema.init(pg_dsn)
    with pytest.raises(QueueError, match="upgrade smtpsvc"):
        await PostgresQueue(pg_dsn, "node-a").open()


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("", "queue.dsn is empty"),
        ("postgresql://u@127.0.0.1:notaport/db", "not a valid PostgreSQL connection string"),
    ],
)
async def test_setup_errors_say_what_to_fix(dsn: str, expected: str) -> None:
    with pytest.raises(pgschema.DatabaseError, match=expected):
        await pgschema.init(dsn)


async def test_a_wrong_password_is_named(pg_cluster: PgCluster) -> None:
    with pytest.raises(pgschema.DatabaseError, match=r"refused the login.*password in queue.dsn"):
        await pgschema.migrate_dsn(pg_cluster.dsn(password="wrong"))


async def test_a_server_that_is_down_is_named(pg_cluster: PgCluster) -> None:
    dsn = f"postgresql://postgres:x@127.0.0.1:{free_port()}/db"
    with pytest.raises(pgschema.DatabaseError, match=r"cannot reach PostgreSQL at 127.0.0.1:.*is the server"):
        await pgschema.init(dsn, timeout=5)
    with pytest.raises(QueueError, match="cannot reach PostgreSQL"):
        await PostgresQueue(dsn, "node-a", connect_timeout=5).open()


async def test_a_missing_database_is_named(pg_cluster: PgCluster) -> None:
    with pytest.raises(pgschema.DatabaseError, match=r"does not exist.*createdb"):
        await pgschema.init(pg_cluster.dsn("no_such_db"))
