"""The committer's fsyncs, both ways (the kernel's native AIO, threads): one contract, each descriptor's own
result, every descriptor closed; and the fall-backs from the kernel to threads."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpsvc.queue import fsyncs
from smtpsvc.queue.commit import Commit, GroupCommitter
from smtpsvc.queue.fsyncs import FsyncThreads, KernelFsync
from tests.queue.test_commit import is_open, written

NOBODY = 999_999  # a descriptor number nothing holds: fsync says EBADF


@pytest.fixture(params=["kernel", "threads"])
def way(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)


def started(way: str, loop: asyncio.AbstractEventLoop) -> fsyncs.Fsyncs:
    if way == "threads":
        return FsyncThreads(2)
    kernel = KernelFsync.open(loop)
    assert kernel is not None, "native AIO is expected on the Linux machines the tests run on"
    return kernel


async def test_files_and_folders_are_synced_and_closed(tmp_path: Path, way: str) -> None:
    loop = asyncio.get_running_loop()
    syncer = started(way, loop)
    fds = [written(tmp_path / f"f{n}") for n in range(3)] + [os.open(tmp_path, os.O_RDONLY)]
    assert await syncer.run(loop, fds) == [None, None, None, None]
    assert not any(is_open(fd) for fd in fds)
    assert await syncer.run(loop, []) == []
    syncer.stop()


async def test_each_descriptor_gets_its_own_result(tmp_path: Path, way: str) -> None:
    loop = asyncio.get_running_loop()
    syncer = started(way, loop)
    read_end, write_end = os.pipe()  # a pipe cannot be fsynced: EINVAL
    os.close(write_end)
    first, last = written(tmp_path / "first"), written(tmp_path / "last")
    results = await syncer.run(loop, [first, read_end, NOBODY, last])
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], OSError) and results[1].errno == errno.EINVAL
    assert isinstance(results[2], OSError) and results[2].errno == errno.EBADF
    assert not any(is_open(fd) for fd in (first, read_end, last))
    syncer.stop()


async def test_a_caller_that_leaves_leaves_no_descriptor_open(tmp_path: Path, way: str) -> None:
    loop = asyncio.get_running_loop()
    syncer = started(way, loop)
    fds = [written(tmp_path / f"f{n}") for n in range(4)]
    call = asyncio.ensure_future(syncer.run(loop, fds))
    await asyncio.sleep(0)  # submitted
    call.cancel()
    for _ in range(1000):  # the fsyncs finish on their own, then their descriptors are closed
        if not any(is_open(fd) for fd in fds):
            break
        await asyncio.sleep(0.01)
    assert not any(is_open(fd) for fd in fds)
    syncer.stop()


async def test_what_the_kernels_ring_has_no_room_for_is_synced_by_threads(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    kernel = KernelFsync.open(loop, ring=4)  # the kernel rounds a ring up, but to far fewer than 300
    assert kernel is not None
    fds = [written(tmp_path / f"f{n}") for n in range(300)]
    assert await kernel.run(loop, fds) == [None] * 300
    assert kernel._threads is not None  # some went to threads
    assert not any(is_open(fd) for fd in fds)
    assert await kernel.run(loop, [written(tmp_path / "after")]) == [None]  # the ring is free again
    kernel.stop()


async def test_where_the_kernel_refuses_native_aio_threads_do_the_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    # io_setup as a system call number the kernel does not have: ENOSYS, as under a kernel built without AIO
    numbers = dict(fsyncs._SYSCALLS["x86_64"], io_setup=100_000)
    monkeypatch.setattr(fsyncs, "_SYSCALLS", {"x86_64": numbers, "aarch64": numbers})
    assert KernelFsync.open(loop) is None
    syncer = fsyncs.start(loop)
    assert isinstance(syncer, FsyncThreads)
    assert await syncer.run(loop, [written(tmp_path / "f")]) == [None]
    syncer.stop()


async def test_the_committer_uses_the_kernel_where_it_can(tmp_path: Path) -> None:
    committer = GroupCommitter()
    await committer.run(Commit([written(tmp_path / "f")], created_in=(tmp_path,)))
    assert isinstance(committer._fsyncs, KernelFsync)
    await committer.close()
    assert committer._fsyncs is None


async def test_stop_releases_the_eventfd_and_the_context() -> None:
    loop = asyncio.get_running_loop()
    kernel = KernelFsync.open(loop)
    assert kernel is not None
    eventfd = kernel._eventfd
    assert is_open(eventfd) and kernel._context.value
    kernel.stop()
    assert not is_open(eventfd) and not kernel._context.value
    kernel.stop()  # twice is harmless


def test_a_call_from_another_event_loop_is_synced_by_threads(tmp_path: Path) -> None:
    first = asyncio.new_event_loop()
    try:

        async def open_kernel() -> KernelFsync | None:
            return KernelFsync.open(asyncio.get_running_loop())

        kernel = first.run_until_complete(open_kernel())
        assert kernel is not None

        async def elsewhere() -> list[BaseException | None]:
            return await kernel.run(asyncio.get_running_loop(), [written(tmp_path / "f")])

        assert asyncio.run(elsewhere()) == [None]  # its eventfd is first's: threads made this one
        assert kernel._threads is not None
        kernel.stop()
    finally:
        first.close()


async def test_a_kernel_without_aio_fsync_hands_every_fsync_to_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    kernel = KernelFsync.open(loop)
    assert kernel is not None
    # An opcode the kernel does not know: io_submit says EINVAL, as kernels before 4.18 do for AIO fsync.
    monkeypatch.setattr(fsyncs, "_IOCB_CMD_FSYNC", 99)
    fds = [written(tmp_path / f"f{n}") for n in range(3)]
    assert await kernel.run(loop, fds) == [None, None, None]  # fsync(2) by the threads
    assert not any(is_open(fd) for fd in fds)
    assert kernel._no_kernel_fsync  # from now on straight to the threads
    assert await kernel.run(loop, [written(tmp_path / "later")]) == [None]
    kernel.stop()
