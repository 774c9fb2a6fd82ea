"""The fsyncs of a group commit, side by side: by the kernel (Linux native AIO) where it can, else by threads.

`run(loop, fds)` fsyncs every descriptor at once, waits for all, closes them and returns each one's error
(or None), in order. Two ways, one contract:

- **KernelFsync**, the default on Linux: one `io_submit(2)` hands all the fsyncs of a call to the kernel
  (`IOCB_CMD_FSYNC`, which runs `vfs_fsync()` in a kernel worker, exactly what `fsync(2)` does, and
  reports its result), and each completion bumps an eventfd that the event loop watches. No thread of
  ours waits: the loop submits, goes on, and reaps the results when the eventfd says they are there.
  With threads, every fsync woke a thread that then had to win the GIL back from the busy event loop
  to report its result; without that handing back and forth, the machine spends about a tenth less CPU
  per message and takes 6% to 36% more messages per second (docs/performance.md, "fsyncs by the kernel").
- **FsyncThreads**, where native AIO is missing (not Linux on x86-64 or arm64, or `io_setup` refused:
  ENOSYS, EPERM under a seccomp filter, EAGAIN when `fs.aio-max-nr` is used up), for good once the
  kernel turns down an fsync by AIO that `fsync(2)` then makes (kernels before 4.18, some sandboxes),
  and for the fsyncs the kernel will not queue at a given moment (its ring of requests full).

There is no well-kept Python binding for native AIO that needs no system library (python-libaio wraps
libaio.so through ctypes as well), so the four system calls are made here through ctypes; their structures
are the kernel's ABI (linux/aio_abi.h), whose layout has not changed since 2.6. See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import os
import platform
import queue
import sys
import threading
from typing import Protocol

FSYNC_THREADS = 8  # fsyncs in flight at once, when threads do them
# Requests in flight at once per process; past that, threads take the rest. A busy SMTP worker's batch holds
# a few dozen; the system-wide fs.aio-max-nr (65536 by default) then has room for 255 such processes.
RING = 256

# System call numbers (the kernel's own tables): x86-64, and arm64's generic table.
_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
_IOCB_CMD_FSYNC = 2
_IOCB_FLAG_RESFD = 1  # signal `aio_resfd` (our eventfd) at completion


class Fsyncs(Protocol):
    async def run(self, loop: asyncio.AbstractEventLoop, fds: list[int]) -> list[BaseException | None]: ...

    def stop(self) -> None: ...


def start(loop: asyncio.AbstractEventLoop) -> Fsyncs:
    """The kernel's AIO where this process may use it, else threads."""
    kernel = KernelFsync.open(loop)
    return kernel if kernel is not None else FsyncThreads(FSYNC_THREADS)


# ------------------------------------------------------------------------------------------ the kernel


class _Iocb(ctypes.Structure):  # struct iocb, little-endian layout (x86-64 and arm64 Linux)
    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_uint32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):  # struct io_event
    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Call:
    """One `run`: the results so far and the future the last completion resolves."""

    __slots__ = ("errors", "fds", "future", "left")

    def __init__(self, loop: asyncio.AbstractEventLoop, fds: list[int]) -> None:
        self.fds = fds
        self.left = len(fds)
        self.errors: list[BaseException | None] = [None] * len(fds)
        self.future: asyncio.Future[list[BaseException | None]] = loop.create_future()

    def finished(self, index: int, error: BaseException | None) -> None:
        self.errors[index] = error
        self.left -= 1
        if self.left == 0:
            _close(self.fds)
            if not self.future.done():  # the caller may have left; the descriptors are closed anyway
                self.future.set_result(self.errors)


class KernelFsync:
    """fsync by Linux native AIO, completions read on the event loop (see the module's docstring)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, libc: ctypes.CDLL, numbers: dict[str, int]) -> None:
        self._loop = loop
        self._syscall = libc.syscall
        self._numbers = numbers
        self._context = ctypes.c_ulong(0)
        self._eventfd = -1
        self._tokens = itertools.count(1)
        self._in_flight: dict[int, tuple[_Call, int]] = {}  # aio_data -> (its call, its index there)
        self._events = (_IoEvent * 256)()
        self._no_wait = _Timespec(0, 0)
        self._threads: FsyncThreads | None = None  # for what the kernel's ring has no room for
        self._helpers: set[asyncio.Task[None]] = set()
        self._no_kernel_fsync = False  # the kernel refused an fsync that fsync(2) then made

    @classmethod
    def open(cls, loop: asyncio.AbstractEventLoop, ring: int = RING) -> KernelFsync | None:
        """A context of `ring` requests with its eventfd on `loop`; None where native AIO is unavailable."""
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or not sys.platform.startswith("linux") or not hasattr(os, "eventfd"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
        libc.syscall.restype = ctypes.c_long
        self = cls(loop, libc, numbers)
        if self._call("io_setup", ctypes.c_uint(ring), ctypes.byref(self._context)) < 0:
            return None  # ENOSYS, EPERM (seccomp), EAGAIN (fs.aio-max-nr used up): threads instead
        try:
            self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            loop.add_reader(self._eventfd, self._reap)
        except (OSError, NotImplementedError):
            self._close_context()
            return None
        return self

    def _call(self, name: str, *args: object) -> int:
        result = int(self._syscall(ctypes.c_long(self._numbers[name]), *args))
        return -ctypes.get_errno() if result < 0 else result

    async def run(self, loop: asyncio.AbstractEventLoop, fds: list[int]) -> list[BaseException | None]:
        """fsync and close each of `fds`, side by side; each one's error or None, in order."""
        if not fds:
            return []
        if loop is not self._loop or self._no_kernel_fsync:
            # The eventfd is watched by the loop this began on: threads for another loop; and for every
            # call once the kernel has shown it cannot fsync by AIO.
            return await self._thread_pool().run(loop, fds)
        call = _Call(loop, fds)
        blocks = (_Iocb * len(fds))()
        pointers = (ctypes.POINTER(_Iocb) * len(fds))()
        tokens = [next(self._tokens) for _ in fds]
        for index, fd in enumerate(fds):
            block = blocks[index]
            block.aio_data = tokens[index]
            block.aio_lio_opcode = _IOCB_CMD_FSYNC
            block.aio_fildes = fd
            block.aio_flags = _IOCB_FLAG_RESFD
            block.aio_resfd = self._eventfd
            pointers[index] = ctypes.pointer(block)
        start = 0
        while start < len(fds):
            # The kernel copies each request as it takes it: the blocks need not outlive this loop. No
            # completion can be reaped before the requests are registered below: that happens on this loop.
            rest = ctypes.byref(pointers, start * ctypes.sizeof(ctypes.c_void_p))
            taken = self._call("io_submit", self._context, ctypes.c_long(len(fds) - start), rest)
            if taken > 0:
                for index in range(start, start + taken):
                    self._in_flight[tokens[index]] = (call, index)
                start += taken
            elif taken == -errno.EINTR:
                continue
            elif taken == -errno.EBADF and not _is_open(fds[start]):  # fsync(2) would say the same
                call.finished(start, OSError(errno.EBADF, os.strerror(errno.EBADF)))
                start += 1
            else:
                # EAGAIN: the ring is full (or the kernel short of memory). EINVAL and the like: the kernel
                # will not fsync this one by AIO (a pipe, which fsync(2) refuses too; or a kernel before
                # 4.18, or a sandbox, that has no AIO fsync at all). Threads take the rest of the call and
                # give fsync(2)'s own verdict.
                self._by_threads(call, start, refused=taken != -errno.EAGAIN)
                break
        return await call.future

    def _by_threads(self, call: _Call, start: int, refused: bool) -> None:
        """fsync the call's descriptors from `start` on, which the kernel did not take, by threads. When
        the kernel `refused` the first of them and fsync(2) then syncs it, the kernel has no AIO fsync
        here: every later call goes to the threads at once."""
        threads = self._thread_pool()
        indexes = list(range(start, len(call.fds)))

        async def rest() -> None:
            copies: list[int] = []  # the threads close what they are given; the call closes its own
            handed: list[int] = []
            for index in indexes:
                try:
                    copies.append(os.dup(call.fds[index]))
                    handed.append(index)
                except OSError as exc:  # EBADF, EMFILE
                    call.finished(index, exc)
            try:
                errors = await threads.run(self._loop, copies)
            except Exception as exc:  # whatever it is, these fail, and the call still ends
                errors = [exc] * len(handed)
            if refused and handed and handed[0] == start and errors[0] is None:
                self._no_kernel_fsync = True
            for index, error in zip(handed, errors, strict=True):
                call.finished(index, error)

        task = self._loop.create_task(rest())
        self._helpers.add(task)  # asyncio keeps tasks weakly
        task.add_done_callback(self._helpers.discard)

    def _thread_pool(self) -> FsyncThreads:
        if self._threads is None:
            self._threads = FsyncThreads(FSYNC_THREADS)
        return self._threads

    def _reap(self) -> None:
        """The eventfd is readable: take every completion there is."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._eventfd)
        events = self._events
        while True:
            count = self._call(
                "io_getevents",
                self._context,
                ctypes.c_long(0),
                ctypes.c_long(len(events)),
                events,
                ctypes.byref(self._no_wait),
            )
            if count == -errno.EINTR:
                continue
            if count <= 0:
                return
            for event in events[:count]:
                entry = self._in_flight.pop(event.data, None)
                if entry is None:
                    continue
                call, index = entry
                result = event.res
                call.finished(index, OSError(-result, os.strerror(-result)) if result < 0 else None)
            if count < len(events):
                return

    def stop(self) -> None:
        """After the last `run` has returned (the committer's close): nothing is in flight."""
        if self._eventfd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._eventfd)
            os.close(self._eventfd)
            self._eventfd = -1
        self._close_context()
        if self._threads is not None:
            self._threads.stop()
            self._threads = None

    def _close_context(self) -> None:
        if self._context.value:
            self._call("io_destroy", self._context)  # waits for requests still in flight, if any
            self._context = ctypes.c_ulong(0)


# ------------------------------------------------------------------------------------------- threads


class FsyncThreads:
    """A fixed set of threads that only fsync the file descriptors handed to them.

    The event loop puts one item per descriptor into a C-level SimpleQueue and awaits one future, which the
    thread finishing the last descriptor of the call resolves: no executor machinery (a concurrent Future,
    a work item and a condition per call) and one wake-up of the loop per call, not one per descriptor.
    The descriptors are closed back on the loop: each step a thread takes after a system call must first
    win the GIL back from the busy event loop, so the threads take as few as they can.
    """

    def __init__(self, count: int) -> None:
        self._queue: queue.SimpleQueue[tuple[_ThreadCall, int, int] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"smtpsvc-fsync_{n}", daemon=True) for n in range(count)
        ]
        for thread in self._threads:
            thread.start()

    async def run(self, loop: asyncio.AbstractEventLoop, fds: list[int]) -> list[BaseException | None]:
        """fsync and close each of `fds`, side by side; each one's error or None, in order."""
        if not fds:
            return []
        call = _ThreadCall(loop, fds)
        for index, fd in enumerate(fds):
            self._queue.put((call, index, fd))
        return await call.future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            call, index, fd = item
            call.finished(index, _fsync(fd))

    def stop(self) -> None:
        for _ in self._threads:
            self._queue.put(None)


class _ThreadCall:
    """One `FsyncThreads.run`: its results, filled in by the threads, and the future they resolve."""

    __slots__ = ("_fds", "_left", "_lock", "_loop", "errors", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop, fds: list[int]) -> None:
        self._loop = loop
        self._fds = fds
        self._left = len(fds)
        self._lock = threading.Lock()
        self.errors: list[BaseException | None] = [None] * len(fds)
        self.future: asyncio.Future[list[BaseException | None]] = loop.create_future()

    def finished(self, index: int, error: BaseException | None) -> None:
        self.errors[index] = error
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        """On the loop, once every thread is done with the descriptors (also when the caller left)."""
        _close(self._fds)
        if not self.future.done():
            self.future.set_result(self.errors)


def _fsync(fd: int) -> BaseException | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
