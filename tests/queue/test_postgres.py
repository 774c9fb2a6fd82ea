"""The PostgreSQL queue beyond the QueueStore contract (tests/queue/test_contract.py, run on it too): the
envelope as stored, leases shared by two nodes, takeover after a node dies, operator verbs seen by every
node, NOTIFY wake-ups, paging, and a database restart under load."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from smtpsvc.model import Attempt, Envelope, Recipient, RecipientState, Source
from smtpsvc.queue import postgres
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.local import LocalSpool
from smtpsvc.queue.postgres import Claim, LeaseLost, PostgresQueue
from tests.conftest import eventually
from tests.pg import PgCluster
from tests.queue.conftest import OpenQueue

BODY = b"Received: from client\r\nSubject: x\r\n\r\nbody \x00\xff\r\n"


def rich_envelope(queue_id: str) -> Envelope:
    """Every envelope field set to something other than its default."""
    return Envelope(
        id=queue_id,
        sender="Jörg@example.test",
        recipients=[
            Recipient(
                "a@remote.test",
                notify=("SUCCESS", "FAILURE"),
                orcpt="rfc822;A@remote.test",
                attempts=2,
                next_attempt=1712345678.123456,
                last_reply="451 4.3.0 try later",
                status="4.3.0",
                remote_mta="mx.remote.test[127.0.0.2]:25",
                route="remote.test",
                history=[Attempt(1712345000.5, "451 4.3.0 try later", "mx.remote.test")],
            ),
            Recipient("b@Local.Test", state=RecipientState.DELIVERED, route="drop", attempts=1),
            Recipient("c@remote.test", state=RecipientState.FAILED, status="5.1.1", notified=False),
        ],
        received_at=1712340000.987654,
        source=Source.PICKUP,
        client_ip="192.0.2.1",
        helo="client.example.test",
        auth_user="scanner",
        body="8BITMIME",
        ret="HDRS",
        envid="env-1",
        smtputf8=True,
        xexch50=4,
        delay_notified=True,
        dsn_kind="failure",
        original_id="0123",
        transcripts=[["S: 220 hi", "C: EHLO relay.test"]],
    )


def simple_envelope(queue_id: str, due: float = 0.0, rcpt: str = "b@remote.test") -> Envelope:
    return Envelope(
        id=queue_id, sender="a@local.test", received_at=1.0, recipients=[Recipient(rcpt, next_attempt=due)]
    )


async def put(
    queue: PostgresQueue, body: bytes = BODY, due: float = 0.0, rcpt: str = "b@remote.test"
) -> Envelope:
    writer = queue.create_writer()
    writer.write(body)
    envelope = simple_envelope(writer.id, due, rcpt)
    await queue.put(writer, envelope)
    return envelope


async def claimed(queue: PostgresQueue, now: float, limit: int = 10) -> list[Envelope]:
    """The envelopes of a claim (the takeover flag left aside)."""
    return [claim.envelope for claim in await queue.claim(now, limit)]


async def put_many(queue: PostgresQueue, count: int) -> list[str]:
    return [(await put(queue)).id for _ in range(count)]


def as_json(envelope: Envelope) -> Any:
    """The envelope as the local spool's .env file holds it."""
    return json.loads(json.dumps(envelope.to_json()))


async def lease_row(dsn: str, queue_id: str) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchrow(
            "SELECT leased_by, lease_until, now() AS db_now FROM messages WHERE id = $1", queue_id
        )
    finally:
        await conn.close()


# -- round trips ----------------------------------------------------------------------------------------
async def test_put_then_get_and_list_give_the_envelope_as_the_local_spool_encodes_it(
    open_queue: OpenQueue, tmp_path: Path
) -> None:
    queue = await open_queue()
    writer = queue.create_writer()
    writer.write(BODY)
    writer.attach_xexch50(b"blob")
    await queue.put(writer, rich_envelope(writer.id))

    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    try:
        local_writer = spool.create_writer()
        local_writer.write(BODY)
        local = rich_envelope(local_writer.id)
        await spool.put(local_writer, local)
        local_json = json.loads((spool.dir / f"{local.id}.env").read_bytes())
    finally:
        spool.close()
    local_json["id"] = writer.id
    local_json["spool"] = ""  # the local spool's own id (KB306043 adoption); the database is one shared queue
    local_json["crc32"] = 0  # the local spool's check of a commit cut short; a transaction needs none

    stored = await queue.get(writer.id)
    assert stored is not None
    assert as_json(stored) == local_json
    assert [as_json(e) for e in await queue.list()] == [local_json]
    with await queue.open_message(writer.id) as fh:
        assert fh.read() == BODY
    assert await queue.xexch50_blob(writer.id) == b"blob"


async def test_a_nul_in_a_reply_text_does_not_make_save_fail(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    await put(queue)
    [envelope] = await claimed(queue, time.time(), 10)
    envelope.recipients[0].last_reply = "550 bad\x00peer"
    await queue.save(envelope)
    stored = await queue.get(envelope.id)
    assert stored is not None and stored.recipients[0].last_reply == "550 bad\ufffdpeer"


async def test_a_lone_surrogate_in_a_text_does_not_make_put_or_save_fail(open_queue: OpenQueue) -> None:
    # UTF-8 cannot hold one (the driver raises UnicodeEncodeError, which is no QueueError): U+FFFD instead.
    queue = await open_queue()
    await put(queue, rcpt="b\udc80@remote.test")
    [envelope] = await claimed(queue, time.time(), 10)
    envelope.recipients[0].last_reply = "451 odd \ud800 peer"
    await queue.save(envelope)
    stored = await queue.get(envelope.id)
    assert stored is not None
    assert (stored.recipients[0].address, stored.recipients[0].last_reply) == (
        "b\ufffd@remote.test",
        "451 odd \ufffd peer",
    )


# -- leases -----------------------------------------------------------------------------------------------
async def test_two_nodes_leasing_concurrently_never_get_the_same_message(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    ids = await put_many(a, 200)
    got: dict[str, list[str]] = {"node-a": [], "node-b": []}

    async def drain(queue: PostgresQueue) -> None:
        while batch := await claimed(queue, time.time(), 7):
            got[queue.node_id].extend(e.id for e in batch)
            await asyncio.sleep(0)

    await asyncio.gather(drain(a), drain(a), drain(b), drain(b))
    assert set(got["node-a"]).isdisjoint(got["node-b"])
    assert sorted(got["node-a"] + got["node-b"]) == sorted(ids)
    assert got["node-a"] and got["node-b"]  # both took part
    assert a.held == set(got["node-a"]) and b.held == set(got["node-b"])


async def test_a_dead_nodes_leases_expire_and_another_node_takes_over(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a", lease_seconds=1.0)
    b = await open_queue("node-b")
    ids = await put_many(a, 5)
    assert len(await claimed(a, time.time(), 10)) == 5
    assert await b.claim(time.time(), 10) == []
    await a.close()  # "dies": no save, no release, no renewal

    claims: list[Claim] = await eventually(lambda: b.claim(time.time(), 10), what="the expired leases")
    assert sorted(c.envelope.id for c in claims) == sorted(ids)
    assert {c.taken_over_from for c in claims} == {"node-a"}
    assert (await lease_row(b.dsn, ids[0]))["leased_by"] == "node-b"


async def test_a_message_nobody_held_is_not_flagged_as_taken_over(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a")
    envelope = await put(a)
    [claim] = await a.claim(time.time(), 10)
    assert not claim.taken_over
    await a.release(envelope.id)
    [again] = await a.claim(time.time(), 10)
    assert not again.taken_over  # released, not abandoned


async def test_save_by_a_node_whose_lease_was_taken_over_is_refused(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a", lease_seconds=0.5, auto_renew=False)
    b = await open_queue("node-b")
    await put(a)
    [stale] = await claimed(a, time.time(), 10)
    [claim] = await eventually(lambda: b.claim(time.time(), 10), what="the takeover")
    assert claim.taken_over_from == "node-a"

    stale.recipients[0].state = RecipientState.DELIVERED
    with pytest.raises(LeaseLost):
        await a.save(stale)
    assert not await a.release(stale.id)
    stored = await b.get(stale.id)
    assert stored is not None and stored.recipients[0].state is RecipientState.PENDING

    claim.envelope.recipients[0].attempts = 1
    claim.envelope.recipients[0].next_attempt = time.time() + 600
    await b.save(claim.envelope)
    stored = await a.get(stale.id)
    assert stored is not None and stored.recipients[0].attempts == 1


async def test_save_takes_only_the_envelope_object_the_claim_returned(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a")
    envelope = await put(a)
    [leased] = await claimed(a, time.time(), 10)
    copy = await a.get(envelope.id)
    assert copy is not None
    with pytest.raises(LeaseLost):
        await a.save(copy)
    await a.save(leased)


async def test_a_lease_that_ran_out_under_its_own_node_is_resumed_not_handed_out_twice(
    open_queue: OpenQueue,
) -> None:
    a = await open_queue("node-a", lease_seconds=0.5, auto_renew=False)  # renewals "failed"
    b = await open_queue("node-b")
    envelope = await put(a)
    [leased] = await claimed(a, time.time(), 10)
    first = (await lease_row(a.dsn, envelope.id))["lease_until"]

    async def expired() -> bool:
        return bool((await lease_row(a.dsn, envelope.id))["db_now"] > first)

    await eventually(expired, what="the lease to run out")
    assert await claimed(a, time.time(), 10) == []  # still being delivered here: not a second copy
    assert await claimed(b, time.time(), 10) == []  # and leased again, so no other node takes it
    assert a.held == {envelope.id}
    await a.save(leased)


async def test_save_records_the_state_and_releases_the_lease(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    envelope = await put(a)
    [leased] = await claimed(a, time.time(), 10)
    retry_at = time.time() + 600
    rcpt = leased.recipients[0]
    rcpt.attempts, rcpt.next_attempt, rcpt.last_reply = 1, retry_at, "451 4.4.1 no answer"
    await a.save(leased)
    assert a.held == set()
    row = await lease_row(a.dsn, envelope.id)
    assert row["leased_by"] is None and row["lease_until"] is None
    assert await claimed(b, time.time(), 10) == []  # not due yet
    assert await b.next_due() == pytest.approx(retry_at)
    [again] = await claimed(b, retry_at, 10)
    assert again.recipients[0].last_reply == "451 4.4.1 no answer"
    with pytest.raises(LeaseLost):
        await a.save(leased)  # saved once: the lease is gone


async def test_renew_pushes_the_lease_further_out(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a", lease_seconds=5.0, auto_renew=False)
    envelope = await put(a)
    await claimed(a, time.time(), 10)
    before = (await lease_row(a.dsn, envelope.id))["lease_until"]
    assert await a.renew() == {envelope.id}
    after = (await lease_row(a.dsn, envelope.id))["lease_until"]
    assert after > before
    assert await a.renew(["not-held"]) == set()


async def test_a_live_node_keeps_its_leases_past_lease_seconds(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a", lease_seconds=1.0)  # renewed every 1/3 s in the background
    b = await open_queue("node-b")
    envelope = await put(a)
    await claimed(a, time.time(), 10)
    first = (await lease_row(a.dsn, envelope.id))["lease_until"]

    async def past_first_lease() -> bool:
        return bool((await lease_row(a.dsn, envelope.id))["db_now"] > first)

    await eventually(past_first_lease, what="the first lease to run out")
    assert await claimed(b, time.time(), 10) == []
    assert (await lease_row(a.dsn, envelope.id))["leased_by"] == "node-a"


async def test_release_makes_the_message_claimable_at_once(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    envelope = await put(a)
    await claimed(a, time.time(), 10)
    assert await a.release(envelope.id)
    assert [e.id for e in await claimed(b, time.time(), 10)] == [envelope.id]


async def test_a_node_killed_with_sigkill_leaves_leases_another_node_takes_over(
    open_queue: OpenQueue, queue_dsn: str
) -> None:
    b = await open_queue("node-b")
    ids = await put_many(b, 3)
    script = (
        "import asyncio, sys, time\n"
        "from smtpsvc.queue.postgres import PostgresQueue\n"
        "async def main():\n"
        "    q = PostgresQueue(sys.argv[1], 'doomed', lease_seconds=1.0)\n"
        "    await q.open()\n"
        "    print(' '.join(c.envelope.id for c in await q.claim(time.time(), 10)), flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, queue_dsn, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        assert sorted(line.decode().split()) == sorted(ids)
        first = (await lease_row(queue_dsn, ids[0]))["lease_until"]

        async def renewed() -> bool:
            return bool((await lease_row(queue_dsn, ids[0]))["lease_until"] > first)

        await eventually(renewed, what="the live node to renew its leases")
        assert await claimed(b, time.time(), 10) == []
    finally:
        child.send_signal(signal.SIGKILL)  # by PID: the crash a node must survive
        await asyncio.wait_for(child.wait(), 30)
    claims = await eventually(lambda: b.claim(time.time(), 10), what="the dead node's leases to expire")
    assert sorted(c.envelope.id for c in claims) == sorted(ids)
    assert {c.taken_over_from for c in claims} == {"doomed"}


# -- operator verbs ---------------------------------------------------------------------------------------
async def test_freeze_and_thaw_are_seen_by_the_other_node(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    envelope = await put(a)
    assert await a.set_frozen(envelope.id, True)
    assert await claimed(b, time.time(), 10) == []
    stored = await b.get(envelope.id)
    assert stored is not None and stored.frozen
    assert await b.next_due() is None
    assert await a.set_frozen(envelope.id, False)
    assert [e.id for e in await claimed(b, time.time(), 10)] == [envelope.id]
    assert await a.set_frozen("nope", True) is None


async def test_freeze_during_a_delivery_survives_its_save(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    envelope = await put(a)
    [leased] = await claimed(a, time.time(), 10)
    assert await b.set_frozen(envelope.id, True)
    leased.recipients[0].next_attempt = 0.0
    await a.save(leased)
    stored = await b.get(envelope.id)
    assert stored is not None and stored.frozen
    assert await claimed(b, time.time(), 10) == []


async def test_complete_and_delete_remove_the_message_everywhere(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    done, unwanted, kept = await put(a), await put(a), await put(a)
    await claimed(a, time.time(), 1)
    await a.complete(done.id)
    assert await b.delete(unwanted.id)
    assert not await b.delete(unwanted.id)
    assert [e.id for e in await b.list()] == [kept.id]
    assert await b.get(done.id) is None
    with pytest.raises(QueueError):
        await b.open_message(unwanted.id)
    assert done.id not in a.held


async def test_retry_by_domain_makes_its_pending_recipients_due_now(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    later = time.time() + 3600
    at_domain = await put(a, due=later, rcpt="x@Partner.Test")
    at_sub = await put(a, due=later, rcpt="y@mx.partner.test")
    elsewhere = await put(a, due=later, rcpt="z@other.test")
    now = time.time()
    assert (await b.make_due(now, domain="partner.test.")).messages == 1
    assert [e.id for e in await claimed(a, now, 10)] == [at_domain.id]
    # one of them is leased
    assert (await b.make_due(now, domain="partner.test", subdomains=True)).messages == 2
    assert [e.id for e in await claimed(a, now, 10)] == [at_sub.id]
    assert (await b.make_due(now, queue_id=elsewhere.id)).messages == 1
    assert [e.id for e in await claimed(a, now, 10)] == [elsewhere.id]


async def test_a_retry_asked_during_a_delivery_makes_the_message_due_at_its_save(
    open_queue: OpenQueue,
) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    envelope = await put(a)
    [leased] = await claimed(a, time.time(), 10)
    assert (await b.make_due(time.time(), queue_id=envelope.id)).messages == 1
    leased.recipients[0].next_attempt = time.time() + 3600  # the delivery deferred it
    await a.save(leased)
    assert [e.id for e in await claimed(b, time.time(), 10)] == [envelope.id]


async def test_recategorize_pages_through_the_queue_a_batch_at_a_time(
    open_queue: OpenQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "RECATEGORIZE_BATCH", 2)
    a = await open_queue()
    ids = sorted([(await put(a, due=time.time() + 3600)).id for _ in range(5)])
    frozen = await put(a, due=time.time() + 3600)
    await a.set_frozen(frozen.id, True)
    seen: list[tuple[int, int]] = []
    done = await a.recategorize(lambda address: "partners", time.time(), progress=lambda *p: seen.append(p))
    assert (done.messages, done.links) == (5, frozenset({"partners"}))
    assert seen == [(2, 5), (4, 5), (5, 5)]  # the frozen message is not even looked at
    assert sorted(e.id for e in await claimed(a, time.time(), 10)) == ids


async def test_a_frozen_link_holds_its_mail_on_every_node_until_thawed(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    envelope = await put(a)
    [leased] = await claimed(a, time.time(), 10)
    leased.recipients[0].route = "partners"
    await b.set_link_frozen("partners", True)  # while node-a delivers it: its save sees the freeze
    await a.save(leased)
    assert await a.frozen_links() == frozenset({"partners"})
    assert await claimed(b, time.time(), 10) == []
    assert await b.next_due() is None
    await a.set_link_frozen("partners", False)
    assert [e.id for e in await claimed(b, time.time(), 10)] == [envelope.id]
    assert await a.frozen_links() == frozenset()


async def test_holders_name_the_node_of_each_valid_lease(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    first, _ = await put(a), await put(a)
    await claimed(a, time.time(), 1)
    assert await b.holders() == {first.id: "node-a"}
    assert await b.count() == 2


async def test_a_forced_retry_tells_every_node_which_links_to_try_now(open_queue: OpenQueue) -> None:
    a, b = await open_queue("node-a"), await open_queue("node-b")
    heard: list[frozenset[str] | None] = []
    b.on_forced_retry = heard.append
    envelope = await put(a, due=time.time() + 3600)
    [leased] = await claimed(a, time.time() + 7200, 1)
    leased.recipients[0].route = "smarthost"
    await a.save(leased)
    done = await a.make_due(time.time(), queue_id=envelope.id)
    assert (done.messages, done.links) == (1, frozenset({"smarthost"}))
    await eventually(lambda: asyncio.sleep(0, heard), what="node-b to hear of the retry")
    assert heard == [frozenset({"smarthost"})]


# -- waking up --------------------------------------------------------------------------------------------
async def test_a_put_on_one_node_wakes_a_node_waiting_for_work(open_queue: OpenQueue) -> None:
    a = await open_queue("node-a")
    b = await open_queue("node-b", poll_interval=60.0)
    waiting = asyncio.ensure_future(b.wait_for_work(60.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    await put(a)
    assert await asyncio.wait_for(waiting, 10) is True


async def test_wait_for_work_returns_after_the_poll_interval_without_a_notify(open_queue: OpenQueue) -> None:
    b = await open_queue("node-b", poll_interval=0.2)
    started = time.monotonic()
    assert await b.wait_for_work(None) is False
    assert time.monotonic() - started < 5


# -- the database going away --------------------------------------------------------------------------------
async def test_a_postgresql_restart_under_load_loses_no_acknowledged_message(
    open_queue: OpenQueue, pg_cluster: PgCluster
) -> None:
    queue = await open_queue("node-a", connect_timeout=2.0, command_timeout=5.0)
    idle = await open_queue("node-b", poll_interval=60.0)
    acknowledged: list[str] = []
    refused: list[str] = []
    stop = asyncio.Event()

    async def load() -> None:
        while not stop.is_set():
            try:
                acknowledged.append((await put(queue)).id)
            except QueueError as exc:
                refused.append(str(exc))
                await asyncio.sleep(0.05)

    producer = asyncio.ensure_future(load())
    try:
        await eventually(lambda: _true_after(len(acknowledged) >= 20), what="puts before the restart")
        await asyncio.to_thread(pg_cluster.stop, "immediate")  # a crash: recovery replays the WAL
        started = time.monotonic()
        with pytest.raises(QueueError):
            await asyncio.wait_for(put(queue), 30)
        assert time.monotonic() - started < 15  # bounded by connect/command timeouts, not a hang
        await asyncio.to_thread(pg_cluster.start)
        count = len(acknowledged)
        await eventually(lambda: _true_after(len(acknowledged) >= count + 20), what="puts after the restart")
    finally:
        stop.set()
        await producer
        if pg_cluster.pid() is None:
            pg_cluster.start()
    assert refused  # the outage was seen as 4xx-worthy errors
    stored = {e.id for e in await queue.list()}
    assert set(acknowledged) <= stored

    async def woken_by_a_put() -> bool:  # the idle node's LISTEN connection came back
        while await idle.wait_for_work(0.01):
            pass
        await put(queue)
        return await idle.wait_for_work(2.0)

    await eventually(woken_by_a_put, what="the idle node to listen again")


async def _true_after(value: bool) -> bool:
    await asyncio.sleep(0)
    return value


async def test_open_without_the_schema_says_to_run_db_init(pg_dsn: str) -> None:
    queue = PostgresQueue(pg_dsn, "node-a")
    with pytest.raises(QueueError, match="smtpsvc db init"):
        await queue.open()
