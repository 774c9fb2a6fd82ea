"""The QueueStore contract (queue/base.py), one suite run against every backend: the local file spool
(`LocalStore` over a `LocalSpool`) and PostgreSQL (`PostgresQueue` on a real throwaway cluster, tests/pg.py).
One behaviour per test, named after it. What only one backend has stays with it: crash recovery and the
commit files in tests/test_queue_local.py, leases shared by several nodes, takeover and SQL in
tests/queue/test_postgres.py."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from smtpsvc.model import Attempt, Envelope, Recipient, RecipientState, domain_of
from smtpsvc.queue.base import QueueError, QueueStore
from smtpsvc.queue.local import LocalSpool, LocalStore
from smtpsvc.queue.postgres import PostgresQueue
from tests.conftest import eventually

NODE = "node-a"
LEASE = 2.0  # PostgreSQL: an abandoned lease comes back after this long (renewed every third of it)
BODY = b"Received: from client\r\nSubject: x\r\n\r\nbody \x00\xff\r\n"
LATER = 3600.0  # "not due yet": an hour from now


class Backend:
    """The store under test, and a way to close it and open it again on the same storage."""

    def __init__(self, store: QueueStore, open_store: Callable[[], Awaitable[QueueStore]]) -> None:
        self.store = store
        self._open = open_store

    async def reopen(self) -> QueueStore:
        await self.store.close()
        self.store = await self._open()
        return self.store


@pytest.fixture(params=["local", "postgres"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Awaitable[QueueStore]]:
    """How to open the backend of this run. The PostgreSQL run gets a database of its own (`queue_dsn`:
    the test fails in CI, and is skipped with the reason elsewhere, when PostgreSQL is not installed)."""
    if request.param == "local":
        root = tmp_path / "queue"

        async def open_local() -> QueueStore:
            spool = LocalSpool(root)
            spool.open()
            return LocalStore(spool, NODE)

        return open_local
    dsn: str = request.getfixturevalue("queue_dsn")

    async def open_postgres() -> QueueStore:
        queue = PostgresQueue(dsn, NODE, lease_seconds=LEASE, poll_interval=5.0)
        await queue.open()
        return queue

    return open_postgres


@pytest.fixture
async def backend(open_store: Callable[[], Awaitable[QueueStore]]) -> AsyncIterator[Backend]:
    opened = Backend(await open_store(), open_store)
    yield opened
    await opened.store.close()


@pytest.fixture
def store(backend: Backend) -> QueueStore:
    return backend.store


async def put(
    store: QueueStore, *addresses: str, due: float = 0.0, body: bytes = BODY, blob: bytes = b""
) -> Envelope:
    """Queue one message (by default to b@remote.test, due now) the way ingest does; each recipient's
    route is its domain, as for mail delivered by MX."""
    writer = store.create_writer()
    writer.write(body)
    if blob:
        writer.attach_xexch50(blob)
    envelope = Envelope(
        id=writer.id,
        sender="a@local.test",
        received_at=time.time(),
        recipients=[
            Recipient(address, next_attempt=due, route=domain_of(address))
            for address in addresses or ("b@remote.test",)
        ],
        xexch50=len(blob),
    )
    await store.put(writer, envelope)
    return envelope


async def claimed(store: QueueStore, now: float | None = None, limit: int = 10) -> list[str]:
    """The ids a claim at `now` (default: now) hands out."""
    return [c.envelope.id for c in await store.claim(time.time() if now is None else now, limit)]


async def stored(store: QueueStore, queue_id: str) -> Envelope:
    envelope = await store.get(queue_id)
    assert envelope is not None
    return envelope


# -- receiving -----------------------------------------------------------------------------------------------
async def test_put_makes_the_message_readable_with_its_envelope(store: QueueStore) -> None:
    envelope = await put(store, "b@remote.test", "c@other.test")
    got = await stored(store, envelope.id)
    assert (got.sender, [r.address for r in got.recipients]) == (
        "a@local.test",
        ["b@remote.test", "c@other.test"],
    )
    assert got.size == len(BODY)


async def test_the_message_bytes_come_back_as_written(store: QueueStore) -> None:
    envelope = await put(store)
    with await store.open_message(envelope.id) as fh:
        assert fh.read() == BODY


async def test_a_message_larger_than_any_memory_buffer_comes_back_byte_for_byte(store: QueueStore) -> None:
    body = bytes(range(256)) * (9 * 1024) + b"end"  # 2.25 MiB: past the spool's 256 KiB and the 1 MiB of SQL
    envelope = await put(store, body=body)
    with await store.open_message(envelope.id) as fh:
        assert fh.read() == body
    assert (await stored(store, envelope.id)).size == len(body)


async def test_an_opened_message_is_seekable(store: QueueStore) -> None:
    envelope = await put(store)
    with await store.open_message(envelope.id) as fh:
        fh.read()
        fh.seek(0, io.SEEK_SET)
        assert fh.read(8) == BODY[:8]


async def test_each_open_of_a_message_is_a_handle_of_its_own(store: QueueStore) -> None:
    envelope = await put(store)
    with await store.open_message(envelope.id) as first, await store.open_message(envelope.id) as second:
        first.read(5)
        assert second.read() == BODY


async def test_an_xexch50_blob_comes_back_with_its_message(store: QueueStore) -> None:
    envelope = await put(store, blob=b"\x00blob\xff")
    assert await store.xexch50_blob(envelope.id) == b"\x00blob\xff"


async def test_a_message_without_a_blob_has_none(store: QueueStore) -> None:
    envelope = await put(store)
    assert await store.xexch50_blob(envelope.id) is None


async def test_an_aborted_writer_queues_nothing_and_takes_no_more_bytes(store: QueueStore) -> None:
    writer = store.create_writer()
    writer.write(BODY)
    writer.abort()
    with pytest.raises(QueueError):
        writer.write(b"late")
    assert await store.count() == 0


async def test_put_refuses_an_envelope_of_another_writer(store: QueueStore) -> None:
    writer = store.create_writer()
    writer.write(BODY)
    with pytest.raises(ValueError):
        await store.put(
            writer, Envelope(id="other", sender="", recipients=[Recipient("b@remote.test")], received_at=1.0)
        )
    writer.abort()
    assert await store.count() == 0


# -- reading -------------------------------------------------------------------------------------------------
async def test_list_gives_every_message_by_id_and_count_their_number(store: QueueStore) -> None:
    ids = [(await put(store)).id for _ in range(3)]
    assert [e.id for e in await store.list()] == sorted(ids)
    assert await store.count() == 3


async def test_ids_lists_every_message_or_the_frozen_ones_or_the_others(store: QueueStore) -> None:
    held, free = await put(store), await put(store)
    await store.set_frozen(held.id, True)
    assert sorted(await store.ids()) == sorted([held.id, free.id])
    assert await store.ids(frozen=True) == [held.id]
    assert await store.ids(frozen=False) == [free.id]


async def test_an_unknown_message_reads_as_absent(store: QueueStore) -> None:
    assert await store.get("NOPE") is None
    assert await store.xexch50_blob("NOPE") is None
    with pytest.raises(QueueError):
        await store.open_message("NOPE")


async def test_recent_knows_a_message_this_node_just_queued(store: QueueStore) -> None:
    envelope = await put(store)
    recent = store.recent(envelope.id)
    assert recent is not None and recent.id == envelope.id
    assert store.recent("NOPE") is None


# -- claiming ------------------------------------------------------------------------------------------------
async def test_claim_hands_out_only_the_messages_due(store: QueueStore) -> None:
    due = await put(store, due=time.time() - 1)
    await put(store, due=time.time() + LATER)
    assert await claimed(store) == [due.id]


async def test_claim_hands_out_at_most_limit_messages(store: QueueStore) -> None:
    for _ in range(3):
        await put(store)
    assert len(await claimed(store, limit=2)) == 2
    assert len(await claimed(store, limit=2)) == 1


async def test_a_claimed_message_is_not_claimed_again(store: QueueStore) -> None:
    envelope = await put(store)
    assert await claimed(store) == [envelope.id]
    assert await claimed(store) == []


async def test_a_claimed_message_is_held_by_this_node(store: QueueStore) -> None:
    envelope = await put(store)
    await put(store, due=time.time() + LATER)
    await claimed(store)
    assert await store.holders() == {envelope.id: NODE}


async def test_a_claim_is_not_taken_over_from_anyone(store: QueueStore) -> None:
    await put(store)
    [claim] = await store.claim(time.time(), 10)
    assert not claim.taken_over


async def test_a_frozen_message_is_not_claimed(store: QueueStore) -> None:
    envelope = await put(store)
    await store.set_frozen(envelope.id, True)
    assert await claimed(store) == []


async def test_a_thawed_message_is_claimed_again(store: QueueStore) -> None:
    envelope = await put(store)
    await store.set_frozen(envelope.id, True)
    await store.set_frozen(envelope.id, False)
    assert await claimed(store) == [envelope.id]


async def test_a_message_waiting_only_on_a_frozen_link_is_not_claimed_until_the_link_is_thawed(
    store: QueueStore,
) -> None:
    envelope = await put(store, "b@remote.test")
    await store.set_link_frozen("remote.test", True)
    assert await claimed(store) == []
    assert await store.next_due() is None
    await store.set_link_frozen("remote.test", False)
    assert await claimed(store) == [envelope.id]


async def test_next_due_is_the_earliest_due_time_of_a_message_not_claimed(store: QueueStore) -> None:
    soon, later = time.time() + 600, time.time() + 1200
    await put(store, due=soon)
    await put(store, due=later)
    assert await store.next_due() == pytest.approx(soon)
    await claimed(store, now=soon)
    assert await store.next_due() == pytest.approx(later)


async def test_next_due_of_an_empty_queue_is_none(store: QueueStore) -> None:
    assert await store.next_due() is None


# -- waiting for work ----------------------------------------------------------------------------------------
async def test_wake_ends_a_wait_for_work_at_once(store: QueueStore) -> None:
    waiting = asyncio.ensure_future(store.wait_for_work(60.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    store.wake()
    assert await asyncio.wait_for(waiting, 10) is True


async def test_a_wake_before_the_wait_is_not_lost(store: QueueStore) -> None:
    store.wake()
    assert await asyncio.wait_for(store.wait_for_work(60.0), 10) is True


async def test_wait_for_work_returns_false_after_its_timeout(store: QueueStore) -> None:
    started = time.monotonic()
    assert await store.wait_for_work(0.05) is False
    assert time.monotonic() - started < 5


# -- the end of a delivery -----------------------------------------------------------------------------------
async def test_save_persists_the_delivery_state(store: QueueStore) -> None:
    envelope = await put(store, "b@remote.test", "c@other.test")
    [claim] = await store.claim(time.time(), 10)
    first, second = claim.envelope.recipients
    first.state, first.attempts, first.last_reply = RecipientState.DELIVERED, 1, "250 2.0.0 ok"
    second.attempts, second.next_attempt, second.last_reply = 1, time.time() + LATER, "451 4.3.0 later"
    await store.save(claim.envelope)
    got = await stored(store, envelope.id)
    assert [(r.state, r.attempts, r.last_reply) for r in got.recipients] == [
        (RecipientState.DELIVERED, 1, "250 2.0.0 ok"),
        (RecipientState.PENDING, 1, "451 4.3.0 later"),
    ]


async def test_save_releases_the_lease(store: QueueStore) -> None:
    envelope = await put(store)
    [claim] = await store.claim(time.time(), 10)
    await store.save(claim.envelope)
    assert await store.holders() == {}
    assert await claimed(store) == [envelope.id]  # still due: its recipient's time has come


async def test_a_saved_message_waits_for_its_next_attempt(store: QueueStore) -> None:
    await put(store)
    [claim] = await store.claim(time.time(), 10)
    retry_at = time.time() + 600
    claim.envelope.recipients[0].next_attempt = retry_at
    await store.save(claim.envelope)
    assert await claimed(store) == []
    assert await store.next_due() == pytest.approx(retry_at)


async def test_release_makes_a_claimed_message_claimable_again(store: QueueStore) -> None:
    envelope = await put(store)
    await claimed(store)
    assert await store.release(envelope.id) is True
    assert await store.holders() == {}
    assert await claimed(store) == [envelope.id]


async def test_release_of_a_message_not_claimed_says_so(store: QueueStore) -> None:
    envelope = await put(store)
    assert await store.release(envelope.id) is False
    assert await store.release("NOPE") is False


async def test_an_abandoned_message_is_claimed_again_later(store: QueueStore) -> None:
    envelope = await put(store)
    await claimed(store)
    store.abandon(envelope.id)  # the local spool at once, a cluster when the lease has run out

    async def claimable() -> list[str]:
        return await claimed(store)

    assert await eventually(claimable, timeout=LEASE * 5, what="the abandoned lease") == [envelope.id]


async def test_complete_removes_the_message(store: QueueStore) -> None:
    envelope, kept = await put(store, blob=b"blob"), await put(store, due=time.time() + LATER)
    await claimed(store)
    await store.complete(envelope.id)
    assert await store.get(envelope.id) is None
    assert [e.id for e in await store.list()] == [kept.id]
    assert await store.holders() == {}
    assert await store.xexch50_blob(envelope.id) is None
    with pytest.raises(QueueError):
        await store.open_message(envelope.id)


# -- operator verbs ------------------------------------------------------------------------------------------
async def test_set_frozen_returns_the_envelope_after_the_change(store: QueueStore) -> None:
    envelope = await put(store)
    frozen = await store.set_frozen(envelope.id, True)
    assert frozen is not None and frozen.id == envelope.id and frozen.frozen
    thawed = await store.set_frozen(envelope.id, False)
    assert thawed is not None and not thawed.frozen


async def test_set_frozen_of_an_unknown_message_returns_none(store: QueueStore) -> None:
    assert await store.set_frozen("NOPE", True) is None


async def test_a_freeze_during_a_delivery_survives_its_save(store: QueueStore) -> None:
    envelope = await put(store)
    [claim] = await store.claim(time.time(), 10)
    await store.set_frozen(envelope.id, True)
    await store.save(claim.envelope)
    assert (await stored(store, envelope.id)).frozen
    assert await claimed(store) == []


async def test_make_due_of_one_message_makes_its_pending_recipients_due(store: QueueStore) -> None:
    envelope = await put(store, due=time.time() + LATER)
    other = await put(store, due=time.time() + LATER)
    done = await store.make_due(time.time(), queue_id=envelope.id)
    assert done.messages == 1
    assert await claimed(store) == [envelope.id]
    assert (await stored(store, other.id)).recipients[0].next_attempt > time.time() + 60


async def test_make_due_at_a_domain_touches_only_its_recipients(store: QueueStore) -> None:
    envelope = await put(store, "x@partner.test", "y@other.test", due=time.time() + LATER)
    await put(store, "z@mx.partner.test", due=time.time() + LATER)
    done = await store.make_due(time.time(), domain="Partner.Test.")
    assert done.messages == 1
    got = await stored(store, envelope.id)
    assert [r.next_attempt < time.time() + 60 for r in got.recipients] == [True, False]


async def test_make_due_with_subdomains_takes_the_domain_and_its_subdomains(store: QueueStore) -> None:
    at_domain = await put(store, "x@partner.test", due=time.time() + LATER)
    at_sub = await put(store, "y@mx.partner.test", due=time.time() + LATER)
    await put(store, "z@notpartner.test", due=time.time() + LATER)
    done = await store.make_due(time.time(), domain="partner.test", subdomains=True)
    assert done.messages == 2
    assert sorted(await claimed(store)) == sorted([at_domain.id, at_sub.id])


async def test_make_due_for_a_link_touches_only_the_recipients_waiting_for_it(store: QueueStore) -> None:
    envelope = await put(store, "a@one.test", "b@two.test", due=time.time() + LATER)
    done = await store.make_due(time.time(), link="two.test")
    assert (done.messages, done.links) == (1, frozenset({"two.test"}))
    got = await store.get(envelope.id)
    assert got is not None
    one, two = got.recipients
    assert one.next_attempt > time.time() + LATER / 2 and two.next_attempt <= time.time()


async def test_make_due_of_every_message(store: QueueStore) -> None:
    ids = [(await put(store, f"x@d{n}.test", due=time.time() + LATER)).id for n in range(3)]
    assert (await store.make_due(time.time())).messages == 3
    assert sorted(await claimed(store)) == sorted(ids)


async def test_make_due_leaves_a_frozen_message_alone(store: QueueStore) -> None:
    envelope = await put(store, due=time.time() + LATER)
    await store.set_frozen(envelope.id, True)
    assert (await store.make_due(time.time(), domain="remote.test")).messages == 0
    assert (await stored(store, envelope.id)).recipients[0].next_attempt > time.time() + 60


async def test_make_due_returns_the_links_of_the_recipients_it_made_due(store: QueueStore) -> None:
    await put(store, "x@partner.test", "y@other.test", due=time.time() + LATER)
    done = await store.make_due(time.time(), domain="partner.test")
    assert done.links == frozenset({"partner.test"})


async def test_make_due_of_nothing_changes_nothing(store: QueueStore) -> None:
    await put(store, due=time.time() + LATER)
    done = await store.make_due(time.time(), domain="nowhere.test")
    assert (done.messages, done.links) == (0, frozenset())


async def test_a_message_made_due_during_its_delivery_is_due_again_after_its_save(store: QueueStore) -> None:
    envelope = await put(store)
    [claim] = await store.claim(time.time(), 10)
    assert (await store.make_due(time.time(), queue_id=envelope.id)).messages == 1  # it counts
    claim.envelope.recipients[0].next_attempt = time.time() + LATER  # the delivery deferred it
    await store.save(claim.envelope)
    assert await claimed(store) == [envelope.id]


async def test_a_message_made_due_during_its_delivery_is_due_again_after_its_release(
    store: QueueStore,
) -> None:
    envelope = await put(store)
    [claim] = await store.claim(time.time(), 10)
    await store.make_due(time.time(), domain="remote.test")
    claim.envelope.recipients[0].next_attempt = time.time() + LATER  # what the cut-short delivery had
    await store.release(claim.envelope.id)
    assert await claimed(store) == [envelope.id]


async def test_two_make_due_of_one_message_at_once_both_succeed(store: QueueStore) -> None:
    envelope = await put(store, due=time.time() + LATER)
    done = await asyncio.gather(*(store.make_due(time.time(), domain="remote.test") for _ in range(2)))
    assert [d.messages for d in done] == [1, 1]
    assert await claimed(store) == [envelope.id]


def partners(address: str) -> str:
    """A routing under a new configuration: everything through the connector "partners"."""
    return "partners"


async def test_recategorize_records_each_pending_recipient_s_new_link_and_makes_it_due(
    store: QueueStore,
) -> None:
    envelope = await put(store, "x@partner.test", "y@other.test", due=time.time() + LATER)
    done = await store.recategorize(partners, time.time())
    assert (done.messages, done.links) == (1, frozenset({"partners"}))
    [claim] = await store.claim(time.time(), 10)
    assert claim.envelope.id == envelope.id
    assert [r.route for r in claim.envelope.recipients] == ["partners", "partners"]


async def test_recategorize_leaves_finished_recipients_as_they_were(store: QueueStore) -> None:
    envelope = await put(store, "x@partner.test", "y@other.test")
    [claim] = await store.claim(time.time(), 10)
    claim.envelope.recipients[0].state = RecipientState.DELIVERED
    claim.envelope.recipients[1].next_attempt = time.time() + LATER
    await store.save(claim.envelope)
    await store.recategorize(partners, time.time())
    got = await stored(store, envelope.id)
    assert [(r.state, r.route) for r in got.recipients] == [
        (RecipientState.DELIVERED, "partner.test"),
        (RecipientState.PENDING, "partners"),
    ]


async def test_recategorize_with_changed_only_touches_only_the_recipients_it_picks(store: QueueStore) -> None:
    moved = await put(store, "x@partner.test", "y@other.test", due=time.time() + LATER)
    unmoved = await put(store, "z@other.test", due=time.time() + LATER)
    done = await store.recategorize(partners, time.time(), changed_only=lambda a: a.endswith("@partner.test"))
    assert done.messages == 1
    got = await stored(store, moved.id)
    assert [(r.route, r.next_attempt < time.time() + 60) for r in got.recipients] == [
        ("partners", True),
        ("other.test", False),
    ]
    assert (await stored(store, unmoved.id)).recipients[0].route == "other.test"


async def test_recategorize_of_one_message_leaves_the_others_alone(store: QueueStore) -> None:
    envelope = await put(store, due=time.time() + LATER)
    other = await put(store, due=time.time() + LATER)
    assert (await store.recategorize(partners, time.time(), queue_id=envelope.id)).messages == 1
    assert (await stored(store, other.id)).recipients[0].route == "remote.test"
    assert await claimed(store) == [envelope.id]


async def test_recategorize_leaves_a_frozen_message_alone(store: QueueStore) -> None:
    envelope = await put(store, due=time.time() + LATER)
    await store.set_frozen(envelope.id, True)
    assert (await store.recategorize(partners, time.time())).messages == 0
    assert (await stored(store, envelope.id)).recipients[0].route == "remote.test"


async def test_a_message_recategorized_during_its_delivery_is_due_again_after_its_save(
    store: QueueStore,
) -> None:
    envelope = await put(store)
    [claim] = await store.claim(time.time(), 10)
    assert (await store.recategorize(partners, time.time())).messages == 1  # it counts
    claim.envelope.recipients[0].next_attempt = time.time() + LATER  # the delivery deferred it
    await store.save(claim.envelope)
    assert await claimed(store) == [envelope.id]


async def test_recategorize_reports_its_progress_in_messages(store: QueueStore) -> None:
    for _ in range(3):
        await put(store, due=time.time() + LATER)
    seen: list[tuple[int, int]] = []
    await store.recategorize(partners, time.time(), progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (3, 3)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


async def test_delete_removes_a_message_and_says_whether_there_was_one(store: QueueStore) -> None:
    envelope = await put(store)
    assert await store.delete(envelope.id) is True
    assert await store.get(envelope.id) is None
    assert await store.delete(envelope.id) is False


async def test_a_frozen_link_is_listed_until_it_is_thawed(store: QueueStore) -> None:
    await store.set_link_frozen("smarthost", True)
    await store.set_link_frozen("partners", True)
    assert await store.frozen_links() == frozenset({"smarthost", "partners"})
    await store.set_link_frozen("smarthost", False)
    assert await store.frozen_links() == frozenset({"partners"})


# -- summary -----------------------------------------------------------------------------------------------
async def test_the_summary_of_an_empty_queue_is_empty(store: QueueStore) -> None:
    summary = await store.summary()
    assert (summary.messages, summary.links, summary.oldest, summary.bytes) == (0, {}, None, 0)
    assert summary.states == {"ready": 0, "retry": 0, "frozen": 0}


async def test_the_summary_counts_messages_by_state(store: QueueStore) -> None:
    ready = await put(store)
    tried = await put(store)
    frozen = await put(store, due=time.time() + LATER)
    [claim] = await store.claim(time.time(), 1)
    claim.envelope.recipients[0].attempts = 1
    claim.envelope.recipients[0].next_attempt = time.time() + LATER
    await store.save(claim.envelope)
    await store.set_frozen(frozen.id, True)
    summary = await store.summary()
    assert summary.messages == 3 and summary.states == {"ready": 1, "retry": 1, "frozen": 1}
    assert {ready.id, tried.id} >= {claim.envelope.id}
    assert summary.bytes >= 3 * len(BODY)


async def test_the_summary_counts_pending_recipients_per_link_with_the_oldest_messages_first(
    store: QueueStore,
) -> None:
    first = await put(store, "a@one.test", "b@one.test", "c@two.test", due=time.time() + LATER)
    second = await put(store, "d@one.test", due=time.time() + 2 * LATER)
    summary = await store.summary()
    one, two = summary.links["one.test"], summary.links["two.test"]
    assert (one.messages, one.recipients, one.sample) == (2, 3, (first.id, second.id))
    assert (two.messages, two.recipients, two.sample) == (1, 1, (first.id,))
    assert one.states == frozenset({"retry"})  # never tried, but held until later (model.queue_status_of)
    assert one.next_due is not None and abs(one.next_due - (time.time() + LATER)) < 60
    assert abs(one.oldest - first.received_at) < 1 and summary.oldest is not None
    assert abs(summary.oldest - first.received_at) < 1


async def test_a_message_held_until_later_without_an_attempt_counts_as_retry(store: QueueStore) -> None:
    """What the destination's backoff does to a message it holds: a later due time, no attempt. Every view
    says retry, like `queue list` (model.queue_status_of)."""
    await put(store, "a@one.test")  # due now, never tried
    held = await put(store, "b@one.test", due=time.time() + LATER)
    summary = await store.summary()
    assert summary.states == {"ready": 1, "retry": 1, "frozen": 0}
    one = summary.links["one.test"]
    assert one.states == frozenset({"ready", "retry"}) and one.next_due is not None
    assert one.next_due <= time.time() < held.recipients[0].next_attempt


async def test_a_frozen_link_shows_its_messages_as_frozen_and_none_due(store: QueueStore) -> None:
    await put(store, "a@one.test", due=time.time() + LATER)
    await store.set_link_frozen("one.test", True)
    summary = await store.summary()
    assert summary.states["frozen"] == 1
    link = summary.links["one.test"]
    assert link.states == frozenset({"frozen"}) and link.next_due is None


async def test_a_delivered_recipient_leaves_the_summary_of_its_link(store: QueueStore) -> None:
    await put(store, "a@one.test", "b@two.test")
    [claim] = await store.claim(time.time(), 1)
    claim.envelope.recipients[0].state = RecipientState.DELIVERED
    claim.envelope.recipients[1].next_attempt = time.time() + LATER
    await store.save(claim.envelope)
    summary = await store.summary()
    assert set(summary.links) == {"two.test"} and summary.messages == 1


# -- durability ----------------------------------------------------------------------------------------------
async def test_a_reopened_store_shows_the_same_messages_and_state(backend: Backend) -> None:
    store = backend.store
    saved, frozen = await put(store, "b@remote.test", blob=b"blob"), await put(store, due=time.time() + LATER)
    [claim] = await store.claim(time.time(), 1)
    claim.envelope.recipients[0].attempts = 1
    claim.envelope.recipients[0].next_attempt = retry_at = time.time() + 600
    await store.save(claim.envelope)
    await store.set_frozen(frozen.id, True)
    await store.set_link_frozen("smarthost", True)
    before = [e.to_json() for e in await store.list()]

    store = await backend.reopen()
    assert [e.to_json() for e in await store.list()] == before
    assert (await stored(store, saved.id)).recipients[0].attempts == 1
    assert (await stored(store, frozen.id)).frozen
    assert await store.frozen_links() == frozenset({"smarthost"})
    with await store.open_message(saved.id) as fh:
        assert fh.read() == BODY
    assert await store.xexch50_blob(saved.id) == b"blob"
    assert await store.next_due() == pytest.approx(retry_at)


async def test_a_completed_message_stays_gone_after_a_reopen(backend: Backend) -> None:
    envelope = await put(backend.store)
    await backend.store.complete(envelope.id)
    store = await backend.reopen()
    assert await store.get(envelope.id) is None
    assert await store.count() == 0


async def test_make_due_of_every_message_survives_a_reopen(backend: Backend) -> None:
    envelope = await put(backend.store, due=time.time() + LATER)
    await backend.store.make_due(time.time())
    store = await backend.reopen()
    assert await claimed(store) == [envelope.id]


async def test_a_message_tried_after_make_due_of_everything_keeps_its_own_retry_time(
    backend: Backend,
) -> None:
    await put(backend.store, due=time.time() + LATER)
    await backend.store.make_due(time.time())
    [claim] = await backend.store.claim(time.time(), 1)
    rcpt = claim.envelope.recipients[0]
    rcpt.attempts += 1
    rcpt.history.append(Attempt(time.time() + 1, "451 4.3.2 later", "mx"))
    rcpt.next_attempt = time.time() + LATER
    await backend.store.save(claim.envelope)
    store = await backend.reopen()
    assert await store.claim(time.time(), 10) == []


async def test_a_change_made_by_make_due_survives_a_reopen(backend: Backend) -> None:
    envelope = await put(backend.store, due=time.time() + LATER)
    await backend.store.make_due(time.time(), domain="remote.test")
    store = await backend.reopen()
    assert await claimed(store) == [envelope.id]
