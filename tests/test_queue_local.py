"""The local spool beyond the QueueStore contract (tests/queue/test_contract.py, run on it too): commit
protocol and its files, leasing, crash recovery, corrupt files, group commit, SMTP workers' lock."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import threading
import time
import zlib
from pathlib import Path

import pytest

from smtpsvc.model import Envelope, Recipient, RecipientState
from smtpsvc.queue import local
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.intake import IntakeSpool
from smtpsvc.queue.local import MEMORY_LIMIT, WORKERS_LOCK, LocalSpool, LocalStore
from tests.fsyncspy import spy_on_fsyncs


def make_envelope(queue_id: str, due: float = 0.0) -> Envelope:
    return Envelope(
        id=queue_id,
        sender="a@local.test",
        received_at=1.0,
        recipients=[Recipient("b@remote.test", next_attempt=due)],
    )


async def put(spool: LocalSpool, body: bytes = b"Subject: x\r\n\r\nbody\r\n", due: float = 0.0) -> Envelope:
    writer = spool.create_writer()
    writer.write(body)
    envelope = make_envelope(writer.id, due)
    await spool.put(writer, envelope)
    return envelope


async def test_put_makes_body_and_envelope_files_and_nothing_in_tmp(spool: LocalSpool) -> None:
    envelope = await put(spool)
    assert (spool.dir / f"{envelope.id}.eml").read_bytes() == b"Subject: x\r\n\r\nbody\r\n"
    saved = json.loads((spool.dir / f"{envelope.id}.env").read_bytes())
    assert saved["recipients"][0]["address"] == "b@remote.test"
    assert saved["size"] == len(b"Subject: x\r\n\r\nbody\r\n")
    assert list(spool.tmp_dir.iterdir()) == []


async def test_aborted_writer_leaves_no_file(spool: LocalSpool) -> None:
    writer = spool.create_writer()
    writer.write(b"partial")
    writer.abort()
    assert list(spool.tmp_dir.iterdir()) == []
    assert spool.list() == []


async def test_save_persists_state_and_reschedules(spool: LocalSpool) -> None:
    envelope = await put(spool)
    [leased] = spool.lease(now=1.0, limit=1)
    leased.recipients[0].attempts = 1
    leased.recipients[0].next_attempt = 50.0
    await spool.save(leased)
    assert spool.next_due() == 50.0
    saved = json.loads((spool.dir / f"{envelope.id}.env").read_bytes())
    assert saved["recipients"][0]["attempts"] == 1


async def test_complete_removes_both_files(spool: LocalSpool) -> None:
    envelope = await put(spool)
    await spool.complete(envelope.id)
    assert spool.get(envelope.id) is None  # gone from the index at once; its files a moment later
    await spool.removed()
    assert list(spool.dir.glob(f"{envelope.id}.*")) == []
    assert spool.get(envelope.id) is None


async def test_recovery_discards_unacknowledged_writes_and_keeps_committed_mail(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    committed = await put(spool)
    half = spool.create_writer()
    half.write(b"x" * (MEMORY_LIMIT + 1))  # past the memory limit: streamed to tmp/
    assert list(spool.tmp_dir.iterdir())  # then a crash while receiving leaves it there
    (spool.incoming_dir / "0000TORN.eml").write_bytes(b"no envelope")  # a crash before its .pending
    orphan = spool.dir / "0000ORPHAN.eml"  # a completion cut short, before this start
    orphan.write_bytes(b"its envelope is gone")
    (spool.spares.dir / ".0000ORPHAN.env").write_bytes(b"{}")  # ... which had moved its .env into spare/
    os.utime(orphan, (time.time() - 60, time.time() - 60))
    spool.close()

    again = LocalSpool(tmp_path / "queue")
    again.open()
    assert [e.id for e in again.list()] == [committed.id]
    assert list(again.tmp_dir.iterdir()) == [] and list(again.incoming_dir.iterdir()) == []
    assert not orphan.exists()
    again.close()


async def test_a_message_file_without_envelope_newer_than_the_start_is_left_alone(tmp_path: Path) -> None:
    # It may be an SMTP worker's put between its two renames into queue/, at this very moment.
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    spool.close()
    (spool.dir / "0000INFLIGHT.eml").write_bytes(b"its .env comes next")
    again = LocalSpool(tmp_path / "queue")
    again.open()
    assert (again.dir / "0000INFLIGHT.eml").exists()
    again.close()


async def test_put_records_size_and_crc32_and_leaves_no_pending_file(spool: LocalSpool) -> None:
    body = b"Subject: x\r\n\r\nbody\r\n"
    envelope = await put(spool, body)
    saved = json.loads((spool.dir / f"{envelope.id}.env").read_bytes())
    assert (saved["size"], saved["crc32"]) == (len(body), zlib.crc32(body))
    assert list(spool.dir.glob("*.pending")) == []


@pytest.mark.parametrize("size", [100, MEMORY_LIMIT + 10])
async def test_a_failed_commit_raises_and_leaves_no_file(
    spool: LocalSpool, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    spy_on_fsyncs(monkeypatch, lambda fd: OSError(errno.EIO, "Input/output error"))
    writer = spool.create_writer()
    writer.write(b"x" * size)
    with pytest.raises(QueueError, match="Input/output error"):
        await spool.put(writer, make_envelope(writer.id))
    assert sorted(p.name for p in spool.dir.iterdir() if p.is_file() and p.name != "spool.id") == [
        ".lock",
        ".workers.lock",
    ]
    assert list(spool.tmp_dir.iterdir()) == [] and spool.list() == []


def crashed_in_commit(spool: LocalSpool, envelope: Envelope, where: str = "before publishing") -> Path:
    """The state a crash leaves after the commit's fsync round: everything still in incoming/ (before
    publishing), the message file published and the .pending not (half published), or an older version's
    layout, the .pending beside the message in queue/ ("older version")."""
    stem = envelope.id
    if where == "older version":
        pending = spool.dir / f"{stem}.pending"
    else:
        pending = spool.incoming_dir / f"{stem}.pending"
        if where == "before publishing":
            for suffix in (".eml", ".x50"):
                if (spool.dir / f"{stem}{suffix}").exists():
                    (spool.dir / f"{stem}{suffix}").rename(spool.incoming_dir / f"{stem}{suffix}")
    (spool.dir / f"{stem}.env").rename(pending)
    return pending


def file_of(spool: LocalSpool, queue_id: str, suffix: str) -> Path:
    """Where a crashed commit's file is: still in incoming/, or in queue/."""
    incoming = spool.incoming_dir / f"{queue_id}{suffix}"
    return incoming if incoming.exists() else spool.dir / f"{queue_id}{suffix}"


@pytest.mark.parametrize("where", ["before publishing", "half published", "older version"])
async def test_a_whole_pending_commit_whose_files_match_is_queued_at_recovery(
    tmp_path: Path, where: str
) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    small = await put(spool)
    streamed = await put(spool, b"y" * (MEMORY_LIMIT + 10))  # its CRC was computed while streaming
    for envelope in (small, streamed):
        crashed_in_commit(spool, envelope, where)
    spool.close()

    reports: list[str] = []
    again = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.append(name))
    again.open()
    assert sorted(e.id for e in again.list()) == sorted([small.id, streamed.id])
    assert list(again.dir.glob("*.pending")) == [] and list(again.incoming_dir.iterdir()) == []
    assert (again.dir / f"{small.id}.env").exists() and reports == []
    assert (again.dir / f"{streamed.id}.eml").stat().st_size == MEMORY_LIMIT + 10
    again.close()


async def test_a_pending_commit_cut_short_was_never_acknowledged_and_is_removed(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    torn, empty = await put(spool), await put(spool)
    pending = crashed_in_commit(spool, torn)
    pending.write_bytes(pending.read_bytes()[:40])  # written only in part when the power went
    crashed_in_commit(spool, empty).write_bytes(b"")  # created, nothing written yet (kill -9)
    spool.close()

    reports: list[str] = []
    again = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.append(name))
    again.open()
    assert again.list() == []
    assert [p.name for p in again.dir.iterdir() if p.suffix in (".eml", ".pending", ".env")] == []
    assert list(again.incoming_dir.iterdir()) == []
    assert reports == [] and list(again.corrupt_dir.iterdir()) == []
    again.close()


async def test_a_pending_commit_whose_files_do_not_match_is_moved_aside(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    changed, missing = await put(spool, b"Subject: a\r\n\r\nabc\r\n"), await put(spool)
    crashed_in_commit(spool, changed)
    crashed_in_commit(spool, missing)
    file_of(spool, changed.id, ".eml").write_bytes(b"Subject: a\r\n\r\nabd\r\n")  # same size, other bytes
    file_of(spool, missing.id, ".eml").unlink()
    spool.close()

    reports: dict[str, str] = {}
    again = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.update({name: reason}))
    again.open()
    assert again.list() == []
    assert "CRC-32" in reports[changed.id] and "missing" in reports[missing.id]
    assert sorted(p.name for p in again.corrupt_dir.iterdir()) == sorted(
        [f"{changed.id}.eml", f"{changed.id}.pending", f"{missing.id}.pending"]
    )
    again.close()


async def test_a_pending_commit_checks_the_xexch50_blob_too(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    envelopes = []
    for _ in range(2):
        writer = spool.create_writer()
        writer.write(b"Subject: x\r\n\r\nbody\r\n")
        writer.attach_xexch50(b"opaque")
        envelope = make_envelope(writer.id)
        envelope.xexch50 = 6
        await spool.put(writer, envelope)
        crashed_in_commit(spool, envelope)
        envelopes.append(envelope)
    kept, damaged = envelopes
    file_of(spool, damaged.id, ".x50").write_bytes(b"OPAQUE")
    spool.close()

    reports: list[str] = []
    again = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.append(name))
    again.open()
    assert [e.id for e in again.list()] == [kept.id]
    assert again.xexch50_blob(kept.id) == b"opaque"
    assert reports == [damaged.id]
    again.close()


async def test_a_lone_surrogate_in_an_envelope_is_written_and_read_back_as_it_was(tmp_path: Path) -> None:
    # UTF-8 cannot hold one: it is kept as the JSON escape \\udXXX, not a UnicodeEncodeError at the commit.
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    writer = spool.create_writer()
    writer.write(b"Subject: x\r\n\r\nx\r\n")
    envelope = make_envelope(writer.id)
    envelope.sender = "a\\\udc80@local.test"
    envelope.recipients[0].last_reply = "451 odd \ud800 peer"
    await spool.put(writer, envelope)
    spool.close()
    again = LocalSpool(tmp_path / "queue")
    again.open()
    [loaded] = again.list()
    assert (loaded.sender, loaded.recipients[0].last_reply) == (
        envelope.sender,
        envelope.recipients[0].last_reply,
    )
    again.close()


async def test_corrupt_envelope_is_moved_aside_with_a_report_and_others_still_load(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    good = await put(spool)
    bad = await put(spool)
    (spool.dir / f"{bad.id}.env").write_bytes(b"{not json")
    spool.close()

    reports: list[tuple[str, str]] = []
    again = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.append((name, reason)))
    again.open()
    assert [e.id for e in again.list()] == [good.id]
    assert sorted(p.name for p in again.corrupt_dir.iterdir()) == [f"{bad.id}.eml", f"{bad.id}.env"]
    assert reports and reports[0][0] == bad.id
    again.close()


async def test_envelope_without_message_file_is_moved_aside(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    lost = await put(spool)
    (spool.dir / f"{lost.id}.eml").unlink()
    spool.close()
    reports: list[str] = []
    again = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.append(reason))
    again.open()
    assert again.list() == []
    assert "missing" in reports[0]
    again.close()


async def test_a_second_process_cannot_open_the_same_spool(spool: LocalSpool) -> None:
    other = LocalSpool(spool.dir)
    with pytest.raises(QueueError, match="in use"):
        other.open()


async def test_concurrent_puts_share_fsync_batches(spool: LocalSpool) -> None:
    await asyncio.gather(*(put(spool) for _ in range(50)))
    batches, jobs = spool.commit_stats
    assert jobs == 50
    assert batches < 50  # group commit: callers waiting at the same time shared a batch
    assert len(spool.list()) == 50


async def test_frozen_message_is_not_leased(spool: LocalSpool) -> None:
    envelope = await put(spool)
    [leased] = spool.lease(now=1.0, limit=1)
    leased.frozen = True
    await spool.save(leased)
    assert spool.lease(now=1e12, limit=10) == []
    assert spool.get(envelope.id) is not None


def test_envelope_json_round_trip() -> None:
    envelope = make_envelope("ABC")
    envelope.recipients[0].state = RecipientState.FAILED
    envelope.recipients[0].notify = ("FAILURE", "DELAY")
    assert Envelope.from_json(json.loads(json.dumps(envelope.to_json()))) == envelope


# -- LocalStore: the spool behind the async QueueStore interface ------------------------------------------
async def test_a_retry_while_the_delivery_s_save_is_being_written_still_makes_the_message_due(
    spool: LocalSpool,
) -> None:
    store = LocalStore(spool, "mx1")
    envelope = await put(spool)
    [claim] = await store.claim(time.time(), 10)
    claim.envelope.recipients[0].next_attempt = time.time() + 3600  # the delivery deferred it
    saving = asyncio.ensure_future(store.save(claim.envelope))
    await asyncio.sleep(0)  # the save's write is with the committer: the message is still leased
    assert spool.is_leased(envelope.id)
    assert (await store.make_due(time.time(), queue_id=envelope.id)).messages == 1
    await saving
    assert [c.envelope.id for c in await store.claim(time.time(), 10)] == [envelope.id]
    assert json.loads((spool.dir / f"{envelope.id}.env").read_bytes())["recipients"][0]["next_attempt"] < (
        time.time() + 60
    )


async def test_a_message_made_due_is_claimable_only_once_make_due_has_returned(spool: LocalSpool) -> None:
    # ETRN lifts the destination's backoff right after make_due: a delivery pass in between would find the
    # destination still down and postpone the message again.
    store = LocalStore(spool, "mx1")
    envelope = await put(spool, due=time.time() + 3600)
    making = asyncio.ensure_future(store.make_due(time.time(), domain="remote.test"))
    for _ in range(1000):  # a few turns of the loop, until make_due is writing the envelope
        if any(spool.tmp_dir.iterdir()):
            break
        await asyncio.sleep(0)
    assert not making.done()
    assert await store.claim(time.time(), 10) == []
    await making
    assert [c.envelope.id for c in await store.claim(time.time(), 10)] == [envelope.id]


def test_recovery_waits_for_smtp_workers_of_an_earlier_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An earlier run's worker, still committing after its main process died, holds the shared lock.
    (tmp_path / "queue").mkdir()
    worker = open(tmp_path / "queue" / WORKERS_LOCK, "a+b")  # noqa: SIM115
    fcntl.flock(worker.fileno(), fcntl.LOCK_SH)
    monkeypatch.setattr(local, "WORKERS_GONE_TIMEOUT", 0.2)
    with pytest.raises(QueueError, match="earlier run still use"):
        LocalSpool(tmp_path / "queue").open()
    again = LocalSpool(tmp_path / "queue")  # the failed start let go of the spool lock too
    threading.Timer(0.1, worker.close).start()  # the worker exits: its lock goes with it
    monkeypatch.setattr(local, "WORKERS_GONE_TIMEOUT", 30.0)
    again.open()
    again.close()


async def test_a_worker_cannot_join_during_recovery_and_holds_its_share_for_its_life(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    intake = IntakeSpool(tmp_path / "queue", lambda queue_id: None)
    intake.open()
    spool.close()
    probe = open(tmp_path / "queue" / WORKERS_LOCK, "a+b")  # noqa: SIM115
    with pytest.raises(BlockingIOError):
        fcntl.flock(probe.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a new start would wait for
    fcntl.flock(probe.fileno(), fcntl.LOCK_SH)  # another worker may share it
    probe.close()
