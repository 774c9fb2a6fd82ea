"""A PostgreSQL restart under load (issue 7): the `250` waits for the COMMIT, so while the database is down
the clients get 4xx, never a false 250, and every message that did get its 250 is delivered afterwards."""

from __future__ import annotations

import asyncio

import aiosmtplib

from smtpsvc.app import Service
from tests.cluster.conftest import Cluster, send_to, subjects
from tests.conftest import smtp_port, wait_until
from tests.pg import PgCluster


async def test_a_database_restart_mid_load_loses_no_acknowledged_message(
    cluster: Cluster, pg_cluster: PgCluster
) -> None:
    a, b = await cluster.node("node-a"), await cluster.node("node-b")
    acknowledged: list[str] = []
    refused: list[str] = []
    stop = asyncio.Event()

    async def client(node: Service, prefix: str) -> None:
        n = 0
        while not stop.is_set():
            name = f"{prefix}{n:04}"
            n += 1
            try:
                await send_to(smtp_port(node), name)
            except aiosmtplib.SMTPResponseException as exc:
                assert 400 <= exc.code < 500, exc  # a temporary failure, never a 5xx bounce
                refused.append(name)
            else:
                acknowledged.append(name)

    clients = [asyncio.ensure_future(client(node, p)) for node, p in ((a, "a"), (b, "b"), (a, "c"))]
    await wait_until(lambda: len(acknowledged) >= 20, what="load before the outage")
    await asyncio.to_thread(pg_cluster.stop, "immediate")  # a crash: the next start replays the WAL
    await wait_until(lambda: len(refused) >= 3, what="4xx answers while the database is down")
    await asyncio.to_thread(pg_cluster.start)
    before = len(acknowledged)
    await wait_until(lambda: len(acknowledged) >= before + 20, what="load after the restart")
    stop.set()
    await asyncio.gather(*clients)

    await wait_until(
        lambda: set(acknowledged) <= set(subjects(cluster.sink)),
        timeout=60,
        what="every acknowledged message delivered (at least once)",
    )
    assert refused and not set(refused) & set(acknowledged)
