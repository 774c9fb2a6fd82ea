"""The group committer on its own: batches share fsyncs, and a failure fails only the commits it concerns."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from smtpsvc.queue.commit import Commit, GroupCommitter, Lingering
from tests.fsyncspy import spy_on_fsyncs


def written(path: Path, data: bytes = b"x") -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    os.write(fd, data)
    return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_concurrent_commits_share_one_batch_and_every_fd_is_closed(tmp_path: Path) -> None:
    committer = GroupCommitter()
    fds = [written(tmp_path / f"f{n}") for n in range(20)]
    renamed: list[int] = []
    await asyncio.gather(
        *(
            committer.run(Commit([fd], lambda n=n: renamed.append(n), (tmp_path,)))  # type: ignore[misc]
            for n, fd in enumerate(fds)
        )
    )
    assert committer.jobs == 20 and committer.batches <= 2  # the first may start alone, the rest wait
    assert sorted(renamed) == list(range(20))  # each `then` ran once, after its fsync
    assert not any(is_open(fd) for fd in fds)
    await committer.close()


async def test_a_failing_fsync_fails_its_own_commit_only(tmp_path: Path) -> None:
    committer = GroupCommitter()
    good = written(tmp_path / "good")
    # A descriptor number nothing holds, nor will (a closed one may be handed out again meanwhile, to the
    # committer's own eventfd for instance): fsync says EBADF.
    bad = 999_999
    ran: list[str] = []
    results = await asyncio.gather(
        committer.run(Commit([good], lambda: ran.append("good"), (tmp_path,))),
        committer.run(Commit([bad], lambda: ran.append("bad"), (tmp_path,))),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], OSError)
    assert ran == ["good"]  # the failed commit published nothing
    await committer.close()


async def test_a_failing_then_and_an_unopenable_directory_fail_their_commits(tmp_path: Path) -> None:
    committer = GroupCommitter()

    def refuse() -> None:
        raise PermissionError("rename refused")

    results = await asyncio.gather(
        committer.run(Commit([written(tmp_path / "a")], refuse, (tmp_path,))),
        committer.run(Commit([written(tmp_path / "b")], None, (tmp_path / "missing",))),
        committer.run(Commit([written(tmp_path / "c")], None, (tmp_path,))),
        return_exceptions=True,
    )
    assert isinstance(results[0], PermissionError)
    assert isinstance(results[1], FileNotFoundError)
    assert results[2] is None
    await committer.close()


async def test_an_unexpected_error_in_a_then_fails_its_commit_and_the_batch_goes_on(tmp_path: Path) -> None:
    """Not only OSError: a bug in a publish step answers its own caller; no caller is left waiting."""
    committer = GroupCommitter()

    def broken() -> None:
        raise ValueError("a bug")

    results = await asyncio.wait_for(
        asyncio.gather(
            committer.run(Commit([written(tmp_path / "a")], broken, (tmp_path,))),
            committer.run(Commit([written(tmp_path / "b")], None, (tmp_path,))),
            return_exceptions=True,
        ),
        timeout=30,
    )
    assert isinstance(results[0], ValueError)
    assert results[1] is None
    await committer.run(Commit([written(tmp_path / "c")], None, (tmp_path,)))  # the committer still works
    await committer.close()


async def test_a_cancelled_caller_does_not_stop_the_batch(tmp_path: Path) -> None:
    committer = GroupCommitter()
    published: list[str] = []

    def commit(name: str) -> asyncio.Task[None]:
        job = Commit([written(tmp_path / name)], lambda: published.append(name))
        return asyncio.create_task(committer.run(job))

    first, second = commit("a"), commit("b")
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await second
    await committer.close()
    assert published == ["a", "b"]  # the batch went on: "a" is on disk even though its caller left


async def test_new_entries_are_synced_with_the_files_one_directory_fsync_for_the_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []

    def recording(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")

    spy_on_fsyncs(monkeypatch, recording)
    committer = GroupCommitter()
    published: list[int] = []
    fds = [written(tmp_path / f"f{n}") for n in range(5)]
    gate = asyncio.Event()  # hold the first batch until all five wait, so they share the next one

    async def commit(n: int, fd: int) -> None:
        await gate.wait()
        await committer.run(Commit([fd], lambda: published.append(n), created_in=(tmp_path,)))

    tasks = [asyncio.create_task(commit(n, fd)) for n, fd in enumerate(fds)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    await committer.close()
    assert sorted(published) == list(range(5))
    assert synced.count("file") == 5
    assert synced.count("dir") == committer.batches  # one per batch, in step 1; no step 3 was asked for
    assert committer.batches <= 2


async def test_an_unopenable_created_in_directory_fails_only_its_commits(tmp_path: Path) -> None:
    committer = GroupCommitter()
    ran: list[str] = []
    results = await asyncio.gather(
        committer.run(
            Commit([written(tmp_path / "a")], lambda: ran.append("a"), created_in=(tmp_path / "gone",))
        ),
        committer.run(Commit([written(tmp_path / "b")], lambda: ran.append("b"), created_in=(tmp_path,))),
        return_exceptions=True,
    )
    assert isinstance(results[0], FileNotFoundError)
    assert results[1] is None
    assert ran == ["b"]  # the failed commit published nothing
    await committer.close()


async def test_lingering_commits_wait_then_share_one_batch(tmp_path: Path) -> None:
    committer = GroupCommitter()
    lingering = Lingering(committer, linger=0.05)
    ran: list[int] = []
    futures = [lingering.run(Commit((), lambda n=n: ran.append(n), (tmp_path,))) for n in range(5)]  # type: ignore[misc]
    await asyncio.sleep(0)
    assert ran == [] and committer.jobs == 0  # held: nothing reached the committer yet
    await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
    assert ran == list(range(5))  # in their order
    assert (committer.batches, committer.jobs) == (1, 5)  # one batch, so one fsync of tmp_path for all five
    await committer.close()


async def test_lingering_commits_go_at_once_when_flushed_or_a_batch_is_full(tmp_path: Path) -> None:
    committer = GroupCommitter()
    lingering = Lingering(committer, linger=3600, limit=3)  # the timer never fires in this test
    first = [lingering.run(Commit((), None, (tmp_path,))) for _ in range(3)]  # the third fills it
    await asyncio.wait_for(asyncio.gather(*first), timeout=30)
    assert (committer.batches, committer.jobs) == (1, 3)
    held = lingering.run(Commit((), None, (tmp_path,)))
    await asyncio.sleep(0)
    assert not held.done()
    lingering.flush()  # what the spool does before it stops, and for `removed()`
    await asyncio.wait_for(held, timeout=30)
    assert committer.jobs == 4
    await committer.close()


async def test_a_lingering_commit_that_fails_fails_alone(tmp_path: Path) -> None:
    committer = GroupCommitter()
    lingering = Lingering(committer, linger=0.01)

    def broken() -> None:
        raise OSError(5, "Input/output error")

    bad = lingering.run(Commit((), broken, (tmp_path,)))
    good = lingering.run(Commit((), None, (tmp_path,)))
    results = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), timeout=30)
    assert isinstance(results[0], OSError) and results[1] is None
    await committer.close()
