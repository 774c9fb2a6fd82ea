"""Spare files: the emptied files of delivered messages, kept in `queue/spare/` and reused for new ones.

Creating a file and removing one are the dearest steps of a message's life on disk: allocating an inode,
freeing it again, and (on a file system mounted with `discard`) trimming its blocks. On ext4 without a
journal, allocating an inode even scans past every inode freed in the last seconds, so the cost grows
with the rate of mail. PostgreSQL recycles its WAL segments for the same reason. So a completed
message's `.env` and `.eml` are renamed into `queue/spare/` instead of being removed, and a new message's
files are renamed out of it and overwritten in place (written, then cut to their new length), their
inodes and blocks used again.

Safety rests on two rules:
  - a file becomes reusable only once its removal from `queue/` is durable: `retire` renames it to a
    dot name (`spare/.<name>`), which no taker considers, and `release` renames it to its plain name only
    after the caller's directory fsync of `queue/` has returned. Otherwise a crash could bring back
    `queue/<old id>.eml` holding another message's bytes;
  - the new content is trusted only through the commit protocol: whatever a crash leaves of a reused file
    is judged like a new one (the `.pending` must parse and the files must match its size and CRC-32).
The pool is bounded (`SPARE_LIMIT` files, none over `SPARE_MAX_SIZE`): past that, files are removed as
before. Recovery empties `spare/` at every start. Several processes share the pool (the main process
retires, the SMTP workers take): a rename is atomic, so a file goes to one taker; a taker that loses the
race to another tries the next name.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

from smtpsvc.safeio import write_all, write_new

FILE_MODE = 0o640  # queue files: the service's user and group only
SPARE_LIMIT = 512  # files kept at most
SPARE_MAX_SIZE = 128 * 1024  # a larger file is removed, not kept
LIST_INTERVAL = 0.005  # seconds between two listings of an empty (for us) pool
COUNT_INTERVAL = 1.0  # seconds between two recounts of the pool by a retiring process
FULL_RECOUNT_INTERVAL = 0.05  # when the count says full: recount at most this often before removing files


class SparePool:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._prefix = f"{directory}{os.sep}"
        self._names: list[str] = []  # plain names seen at the last listing, not taken yet (by us)
        self._listed = -LIST_INTERVAL
        self._kept = 0  # about how many files the pool holds (others take from it too)
        self._counted = -COUNT_INTERVAL

    def clear(self) -> None:
        """At recovery: create the folder, or empty it (it may hold names a crash left linked twice)."""
        self.dir.mkdir(exist_ok=True)
        for leftover in self.dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        self._names, self._kept = [], 0

    # -- taking --------------------------------------------------------------------------------------
    def write(self, path: str, payload: bytes) -> int:
        """`payload` in a file at `path` (a spare one if there is one, else a new one); returns the open
        descriptor for the committer to fsync."""
        if self._take(path):
            fd = os.open(path, os.O_WRONLY)
            try:
                write_all(fd, payload)
                os.ftruncate(fd, len(payload))
            except BaseException:
                os.close(fd)
                raise
            return fd
        return write_new(path, payload, FILE_MODE)

    def _take(self, path: str) -> bool:
        while True:
            if not self._names:
                now = time.monotonic()
                if now - self._listed < LIST_INTERVAL:
                    return False  # looked a moment ago: do not list the folder for every file
                self._listed = now
                try:
                    names = [name for name in os.listdir(self.dir) if not name.startswith(".")]
                except OSError:
                    return False
                random.shuffle(names)  # processes listing together start at different names
                self._names = names
                if not names:
                    return False
            name = self._names.pop()
            try:
                os.rename(f"{self._prefix}{name}", path)
            except FileNotFoundError:
                continue  # another process took it
            except OSError:
                return False
            self._kept = max(0, self._kept - 1)
            return True

    # -- giving back ---------------------------------------------------------------------------------
    def retire(self, paths: list[tuple[str, int | None]]) -> list[str]:
        """Move each (path, size or None when unknown) out of `queue/`, in order: into the pool under a
        dot name when it has room and the file is small enough, else remove it. Returns the dot names,
        for `release` once the removal from `queue/` is durable. A missing path is skipped."""
        self._recount()
        retired: list[str] = []
        for path, known_size in paths:
            try:
                size = os.stat(path).st_size if known_size is None else known_size
                if self._kept >= SPARE_LIMIT:
                    self._recount(FULL_RECOUNT_INTERVAL)
                if size <= SPARE_MAX_SIZE and self._kept < SPARE_LIMIT:
                    name = f".{os.path.basename(path)}"
                    os.rename(path, f"{self._prefix}{name}")
                    retired.append(name)
                    self._kept += 1
                else:
                    os.unlink(path)
            except FileNotFoundError:
                continue
        return retired

    def release(self, names: list[str]) -> None:
        """Make retired files reusable (after the directory fsync that made their removal durable)."""
        for name in names:
            with contextlib.suppress(OSError):
                os.rename(f"{self._prefix}{name}", f"{self._prefix}{name[1:]}")

    def _recount(self, interval: float = COUNT_INTERVAL) -> None:
        # The count is an estimate: the takers (other processes) empty the pool as fast as this process
        # fills it, so a count that says "full" is checked against the folder before a file is removed
        # instead of kept (removing would cost this process an unlink and a taker a new inode).
        now = time.monotonic()
        if now - self._counted >= interval:
            self._counted = now
            with contextlib.suppress(OSError):
                self._kept = len(os.listdir(self.dir))
