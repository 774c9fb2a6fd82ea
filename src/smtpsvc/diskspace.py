"""A full disk, noticed and watched: which OS errors mean "no space" (ENOSPC, EDQUOT), and a watcher that,
told of a write that failed for lack of space, looks at the file system's free space (`statvfs`, cheap: no
write) every POLL_INTERVAL seconds until there is room again, then calls its subscribers (the spool writes
what it could not, the scheduler retries what the Drop folder refused) at once, instead of leaving them to
a retry schedule minutes long.

The watcher never stops a write: SMTP, Pickup and delivery keep trying and fail on their own. It only says
when to try again. Standard library only; the events it reports are made by the caller (`report`), so
the queue, which must not import the event log, can own one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
CAUSE = "disk-full"  # the event cause, and a transport's `Outcome.cause` when its folder is full
POLL_INTERVAL = 1.0  # seconds between two looks at a full file system
# Room that counts as "space again": what a few envelopes and an average message need, so a disk that
# frees a few kilobytes does not flap between full and not full at every write.
MIN_FREE_BYTES = 1024 * 1024
MIN_FREE_INODES = 16


def is_full(exc: BaseException | None) -> bool:
    """Did this error (or the OS error it was raised from) happen for lack of space or quota?"""
    seen = 0
    while exc is not None and seen < 5:  # a chain of a few causes at most (QueueError from OSError)
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def has_room(path: Path) -> bool:
    """Is there room again on the file system of `path`? The root user may use the blocks reserved for it
    (ext4's 5 %), and the service often runs as root; anybody else only the available ones. A file system
    that does not count inodes (btrfs says 0 of 0) is judged by its blocks alone. Where there is no
    `statvfs` (Windows), `shutil.disk_usage` (GetDiskFreeSpaceExW: the bytes this user may use) decides."""
    if not hasattr(os, "statvfs"):
        try:
            return shutil.disk_usage(path).free >= MIN_FREE_BYTES
        except OSError:
            return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False  # gone or unreadable: not a sign of space; a write will tell
    blocks = st.f_bfree if _is_root() else st.f_bavail
    if blocks * st.f_frsize < MIN_FREE_BYTES:
        return False
    inodes = st.f_ffree if _is_root() else st.f_favail
    return st.f_files == 0 or inodes >= MIN_FREE_INODES


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(slots=True)
class _Full:
    path: Path  # the folder the write failed in
    what: str  # what could not be written there, in an operator's words


class SpaceWatcher:
    """One per process. `full(path, what, meanwhile)` after a write failed for lack of space;
    `subscribe(callback)` to hear when there is room again. `report(full, text)` is called once when a
    thing (the queue, the Drop folder) cannot be written for lack of space, and once when its file system
    has room again (the caller makes the events: 9010 and 9011)."""

    def __init__(self, interval: float = POLL_INTERVAL) -> None:
        self.interval = interval
        self.report: Callable[[bool, str], None] = lambda full, text: None
        # By (device, what): each thing that cannot be written on a full file system is reported once
        # (the queue, the Drop folder: an operator learns what each failure means), however often it fails.
        self._full: dict[tuple[int, str], _Full] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def is_full(self) -> bool:
        """A write failed for lack of space and the file system has not had room since."""
        return bool(self._full)

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call `callback()` on the event loop each time a full file system has room again."""
        self._callbacks.append(callback)

    def full(self, path: Path, what: str, meanwhile: str) -> None:
        """A write of `what` under `path` failed for lack of space: report it (once until its file system
        has room again), saying what happens `meanwhile`, and watch it. Called on the event loop; without
        one running (a tool), only reported."""
        key = (_device(path), what)
        if key in self._full:
            return
        self._full[key] = _Full(path, what)
        self.report(
            True,
            f"The disk is full: {what} cannot be written in {path} (no space left on the device, or the "
            f"quota is used up). {meanwhile} Free space on that disk.",
        )
        self._ensure_polling()

    def _ensure_polling(self) -> None:
        if self._task is not None and not self._task.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a tool): nothing to wake later
        self._task = loop.create_task(self._poll(), name="disk-space-watch")

    async def _poll(self) -> None:
        while self._full:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> bool:
        """Look at each full file system now; True when one of them has room again (its subscribers have
        been called)."""
        back = [(key, full) for key, full in self._full.items() if has_room(full.path)]
        for key, full in back:
            del self._full[key]
            self.report(False, f"Disk space is available again in {full.path}: {full.what} is written again")
        if back:
            for callback in list(self._callbacks):
                with contextlib.suppress(Exception):  # one subscriber's bug must not stop the others
                    callback()
        return bool(back)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _device(path: Path) -> int:
    """The file system `path` is on (its device number); -1 when it cannot be looked at."""
    try:
        return os.stat(path).st_dev
    except OSError:
        return -1
