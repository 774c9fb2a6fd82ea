"""The spare-file pool: completed messages' files reused for new ones, never before their removal is
durable, bounded in count and size, emptied at recovery."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import pytest

from smtpsvc.queue import spares
from smtpsvc.queue.local import LocalSpool
from smtpsvc.queue.spares import SparePool
from tests.fsyncspy import spy_on_fsyncs
from tests.test_queue_local import put


@pytest.fixture(autouse=True)
def list_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spares, "LIST_INTERVAL", 0.0)  # the tests look at the folder at once


@pytest.fixture
def pool(tmp_path: Path) -> SparePool:
    queue = tmp_path / "queue"
    queue.mkdir()
    spare = SparePool(queue / "spare")
    spare.clear()
    return spare


def queued(pool: SparePool, name: str, data: bytes) -> str:
    path = str(pool.dir.parent / name)
    Path(path).write_bytes(data)
    return path


def write(pool: SparePool, path: Path, payload: bytes) -> None:
    os.close(pool.write(str(path), payload))


def test_without_spares_a_new_file_is_made(pool: SparePool) -> None:
    target = pool.dir.parent / "A.eml"
    write(pool, target, b"hello")
    assert target.read_bytes() == b"hello"
    assert (target.stat().st_mode & 0o777) == 0o640


def test_a_retired_file_is_reused_only_after_release_and_holds_only_the_new_bytes(pool: SparePool) -> None:
    old = queued(pool, "OLD.eml", b"the old message, longer than the new one")
    inode = os.stat(old).st_ino
    retired = pool.retire([(old, None)])
    assert retired == [".OLD.eml"] and not os.path.exists(old)

    write(pool, pool.dir.parent / "NEW1.eml", b"new")  # not released yet: a new file
    assert (pool.dir.parent / "NEW1.eml").stat().st_ino != inode

    pool.release(retired)
    write(pool, pool.dir.parent / "NEW2.eml", b"new")
    reused = pool.dir.parent / "NEW2.eml"
    assert reused.stat().st_ino == inode  # the same file, renamed and overwritten
    assert reused.read_bytes() == b"new"  # cut to its new length: nothing of the old message is left
    assert list(pool.dir.iterdir()) == []


def test_files_too_large_or_past_the_limit_are_removed(
    pool: SparePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spares, "SPARE_LIMIT", 2)
    big = queued(pool, "BIG.eml", b"x" * (spares.SPARE_MAX_SIZE + 1))
    small = [queued(pool, f"S{n}.env", b"{}") for n in range(3)]
    retired = pool.retire(
        [(big, None), *((path, 2) for path in small), (str(pool.dir.parent / "GONE.x50"), 1)]
    )
    assert retired == [".S0.env", ".S1.env"]  # the missing file is skipped, the third small one removed
    assert not any(os.path.exists(path) for path in [big, *small])
    assert sorted(p.name for p in pool.dir.iterdir()) == [".S0.env", ".S1.env"]


def test_a_pool_the_takers_emptied_keeps_taking_files_though_its_count_said_full(
    pool: SparePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retiring process counts what it puts in and recounts once a second; the takers (the SMTP
    # workers) empty the pool as fast. Trusting the stale count, it removed every file past the limit
    # in each second of a busy queue, and the workers made new ones: the folder is looked at again first.
    monkeypatch.setattr(spares, "SPARE_LIMIT", 2)
    monkeypatch.setattr(spares, "FULL_RECOUNT_INTERVAL", 0.0)
    pool.release(pool.retire([(queued(pool, f"A{n}.env", b"a"), None) for n in range(2)]))
    taker = SparePool(pool.dir)
    for n in range(2):
        write(taker, pool.dir.parent / f"N{n}.env", b"n")  # both spares taken by another process
    assert list(pool.dir.iterdir()) == []
    retired = pool.retire([(queued(pool, f"B{n}.env", b"b"), None) for n in range(3)])
    assert retired == [".B0.env", ".B1.env"]  # kept, not removed; the limit still holds for the third
    assert sorted(p.name for p in pool.dir.iterdir()) == [".B0.env", ".B1.env"]


def test_a_spare_another_process_took_first_is_skipped(pool: SparePool) -> None:
    pool.release(pool.retire([(queued(pool, "A.env", b"a"), None), (queued(pool, "B.env", b"b"), None)]))
    other = SparePool(pool.dir)  # another process listing the same pool
    write(other, pool.dir.parent / "X.env", b"x")  # takes one of the two
    write(pool, pool.dir.parent / "Y.env", b"y")  # its listing is older: one rename fails, the next wins
    write(pool, pool.dir.parent / "Z.env", b"z")  # nothing left: a new file
    assert list(pool.dir.iterdir()) == []
    assert [(pool.dir.parent / n).read_bytes() for n in ("X.env", "Y.env", "Z.env")] == [b"x", b"y", b"z"]


def test_clear_empties_the_pool(pool: SparePool) -> None:
    pool.retire([(queued(pool, "A.env", b"a"), None)])
    (pool.dir / "B.eml").write_bytes(b"b")
    pool.clear()
    assert list(pool.dir.iterdir()) == []


# -- in the spool (`spool`: tests/conftest.py; `put`: the spool's own tests) ---------------------------


async def test_a_delivered_message_s_files_carry_the_next_message(spool: LocalSpool) -> None:
    first = await put(spool, b"Subject: first\r\n\r\n" + b"a" * 500 + b"\r\n")
    inodes = {(spool.dir / f"{first.id}{s}").stat().st_ino for s in (".eml", ".env")}
    await spool.complete(first.id)
    await spool.removed()  # a completion returns before its files are gone
    assert sorted(p.name for p in spool.spares.dir.iterdir()) == [f"{first.id}.eml", f"{first.id}.env"]

    second = await put(spool, b"Subject: second\r\n\r\nb\r\n")
    files = {s: spool.dir / f"{second.id}{s}" for s in (".eml", ".env")}
    assert {path.stat().st_ino for path in files.values()} == inodes
    assert files[".eml"].read_bytes() == b"Subject: second\r\n\r\nb\r\n"
    assert json.loads(files[".env"].read_bytes())["id"] == second.id
    assert list(spool.spares.dir.iterdir()) == []

    spool.close()
    again = LocalSpool(spool.dir)  # and a restart reads it like any other
    again.open()
    assert [e.id for e in again.list()] == [second.id]
    again.close()


async def test_a_stream_of_completions_shares_one_sync_of_the_queue_folder(
    spool: LocalSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue_dir = os.stat(spool.dir)
    synced: list[str] = []
    watching = False  # from the first completion on

    def counting(fd: int) -> None:
        info = os.fstat(fd)
        if watching and (info.st_dev, info.st_ino) == (queue_dir.st_dev, queue_dir.st_ino):
            # what the pool holds when queue/ is synced: the files wait under their dot names
            synced.append(" ".join(sorted(p.name[:1] for p in spool.spares.dir.iterdir())))

    spy_on_fsyncs(monkeypatch, counting)  # before the spool's committer starts its fsyncs (first put)
    envelopes = [await put(spool, b"Subject: x\r\n\r\nx\r\n") for _ in range(12)]
    watching = True
    # Held until removed() hands them over, however slow this machine is (20 ms by default).
    monkeypatch.setattr(spool._lingering, "_linger", 3600.0)
    for envelope in envelopes:  # one by one, as deliveries end
        await spool.complete(envelope.id)
        await asyncio.sleep(0)
    await asyncio.wait_for(spool.removed(), timeout=30)
    assert synced == [" ".join(["."] * 24)]  # one sync for the twelve, before any file was reusable
    assert len([p for p in spool.spares.dir.iterdir() if not p.name.startswith(".")]) == 24


async def test_files_stay_unusable_when_their_removal_could_not_be_made_durable(
    spool: LocalSpool, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = False  # from the completion on: the syncs of directories fail

    def verdict(fd: int) -> OSError | None:
        if failing and os.path.isdir(f"/proc/self/fd/{fd}"):
            return OSError(errno.EIO, "Input/output error")
        return None

    spy_on_fsyncs(monkeypatch, verdict)  # before the spool's committer starts its fsyncs (first put)
    envelope = await put(spool, b"Subject: x\r\n\r\nx\r\n")
    failing = True
    await spool.complete(envelope.id)
    with pytest.raises(OSError, match="Input/output error"):
        await spool.removed()
    # Renamed out of queue/, but the directory sync failed: a crash might bring the names back, so the
    # files keep their dot names and no new message may take them. The next start empties the pool.
    assert sorted(p.name for p in spool.spares.dir.iterdir()) == [
        f".{envelope.id}.eml",
        f".{envelope.id}.env",
    ]


async def test_recovery_empties_the_pool(tmp_path: Path) -> None:
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    await spool.complete((await put(spool, b"Subject: x\r\n\r\nx\r\n")).id)
    await spool.removed()
    assert list(spool.spares.dir.iterdir())
    spool.close()
    again = LocalSpool(tmp_path / "queue")
    again.open()
    assert list(again.spares.dir.iterdir()) == []
    again.close()
