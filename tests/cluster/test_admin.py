"""Cluster-wide operations (issue 7): whichever node an operator goes through (CLI, admin API, web viewer,
/metrics, ETRN), it sees and changes the one shared queue, with the node that holds each lease."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from smtpsvc.app import Service
from smtpsvc.model import Envelope
from smtpsvc.queue.postgres import PostgresQueue
from tests.cluster.conftest import Cluster, send_to, subjects, wait_until_async
from tests.conftest import smtp_port, wait_until
from tests.security.helpers import greeted
from tests.test_queue_cli import run

HELD = {"admin": {"listen": "127.0.0.1:0"}, "delivery": {"retry": ["1h"]}}  # a failed try waits an hour


def api(node: Service) -> httpx.AsyncClient:
    assert node.admin is not None and node.admin_context is not None
    host, port = node.admin.address
    headers = {"Authorization": f"Bearer {node.admin_context.token}"}
    return httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=headers, timeout=30)


async def tried_once(observer: PostgresQueue, count: int) -> list[Envelope]:
    """Wait until `count` messages have had a (failed) attempt and none is being delivered."""
    found: list[Envelope] = []

    async def probe() -> bool:
        nonlocal found
        found = [e for e in await observer.list() if e.recipients[0].attempts]
        return len(found) == count and not await observer.holders()

    await wait_until_async(probe, what=f"{count} message(s) tried once and waiting")
    return found


async def test_a_message_frozen_through_one_node_is_frozen_for_every_node(
    cluster: Cluster, observer: PostgresQueue
) -> None:
    cluster.sink.handler.defer_everything = True
    a, b = await cluster.node("node-a", **HELD), await cluster.node("node-b", **HELD)
    await send_to(smtp_port(a), "held")
    [envelope] = await tried_once(observer, 1)
    async with api(a) as client:
        assert (await client.post(f"/api/queue/{envelope.id}/freeze")).json()["frozen"] is True
    async with api(b) as client:
        assert (await client.get(f"/api/queue/{envelope.id}")).json()["envelope"]["frozen"] is True
    code, out, _ = await run("queue", "show", "-c", str(b.config_path), envelope.id)
    assert code == 0 and "frozen" in out
    code, _, err = await run("queue", "retry", "-c", str(b.config_path), envelope.id)
    assert code == 1 and "is frozen; thaw it first" in err

    cluster.sink.handler.defer_everything = False
    code, out, _ = await run("queue", "thaw", "-c", str(b.config_path), envelope.id)
    assert code == 0 and "thaw done on the cluster queue" in out
    async with api(a) as client:
        assert (await client.post(f"/api/queue/{envelope.id}/retry")).status_code == 200
    await wait_until(lambda: subjects(cluster.sink) == ["held"], what="delivery after the thaw")


def comparable(listing: str) -> list[dict[str, Any]]:
    """`queue list --json` without what changes from one second to the next."""
    return [
        {k: v for k, v in entry.items() if k != "age_seconds"} for entry in json.loads(listing)["messages"]
    ]


async def test_queue_list_from_either_node_shows_the_same_queue_with_lease_holders(
    cluster: Cluster, observer: PostgresQueue
) -> None:
    cluster.sink.handler.defer_everything = True
    a, b = await cluster.node("node-a", **HELD), await cluster.node("node-b", **HELD)
    for i in range(5):
        await send_to(smtp_port(a if i % 2 else b), f"q{i}")
    await tried_once(observer, 5)
    [held] = await observer.claim(time.time() + 7200, 1)  # as if a third node were delivering it now

    code_a, out_a, err_a = await run("queue", "list", "--json", "-c", str(a.config_path))
    code_b, out_b, _ = await run("queue", "list", "--json", "-c", str(b.config_path))
    assert code_a == code_b == 0 and "the cluster queue in PostgreSQL" in err_a
    assert comparable(out_a) == comparable(out_b)
    assert len(comparable(out_a)) == 5
    assert {e["id"]: e["leased_by"] for e in comparable(out_a) if e["leased_by"]} == {
        held.envelope.id: "observer"
    }
    code, out, _ = await run("queue", "list", "-c", str(b.config_path))
    assert code == 0 and f"{held.envelope.id}  retry" in out and "leased by observer" in out

    listings = []
    for node in (a, b):
        async with api(node) as client:
            listings.append(
                {m["id"]: m["leased_by"] for m in (await client.get("/api/queue")).json()["messages"]}
            )
            page = (await client.get("/")).text
            assert "(delivering on observer)" in page
            metrics = (await client.get("/metrics")).text
            assert 'smtpsvc_queue_messages{state="retry"} 5.0' in metrics
    assert listings[0] == listings[1] and listings[0][held.envelope.id] == "observer"
    await observer.release(held.envelope.id)


async def test_a_link_frozen_through_one_node_holds_its_mail_on_every_node(cluster: Cluster) -> None:
    a, b = await cluster.node("node-a", **HELD), await cluster.node("node-b", **HELD)
    code, out, _ = await run("queue", "freeze", "--link", "smarthost", "-c", str(a.config_path))
    assert code == 0 and "link smarthost: freeze done" in out
    await send_to(smtp_port(b), "on-a-frozen-link")
    code, out, _ = await run("queue", "summary", "--json", "-c", str(b.config_path))
    [link] = json.loads(out)
    assert (link["link"], link["state"], link["messages"]) == ("smarthost", "frozen", 1)
    async with api(b) as client:
        [message] = (await client.get("/api/queue")).json()["messages"]
        assert message["state"] == "frozen"
    code, out, _ = await run("queue", "thaw", "--link", "smarthost", "-c", str(b.config_path))
    assert code == 0
    await wait_until(lambda: subjects(cluster.sink) == ["on-a-frozen-link"], what="delivery after the thaw")


async def test_etrn_through_one_node_makes_mail_another_node_tried_due_now(
    cluster: Cluster, observer: PostgresQueue
) -> None:
    cluster.sink.handler.defer_everything = True
    a, b = await cluster.node("node-a", **HELD), await cluster.node("node-b", **HELD)
    await send_to(smtp_port(a), "etrn")
    await tried_once(observer, 1)
    cluster.sink.handler.defer_everything = False
    client = await greeted(b)
    assert (await client.command("ETRN nothing-queued.test")).startswith("251")  # exact on the database too
    assert (await client.command("ETRN remote.test")).startswith("250")
    await client.close()
    await wait_until(lambda: subjects(cluster.sink) == ["etrn"], what="delivery after ETRN")


async def test_queue_recategorize_hands_a_stopped_nodes_mail_to_the_routes_of_another(
    cluster: Cluster, observer: PostgresQueue
) -> None:
    dead = {"smart_host": "[127.0.0.1]:9", "retry": ["1h"]}  # nothing listens there
    a = await cluster.node("node-a", delivery=dead)
    await send_to(smtp_port(a), "rerouted")
    await tried_once(observer, 1)
    await a.stop()
    b = await cluster.node("node-b", **HELD)  # its smart host is the sink; the message waits an hour
    code, out, _ = await run("queue", "recategorize", "--all", "-c", str(b.config_path))
    assert code == 0 and out.startswith("1 message(s) re-categorized on the cluster queue")
    await wait_until(lambda: subjects(cluster.sink) == ["rerouted"], what="delivery by node-b")
