"""Group commit: file-system changes that must be durable, batched so concurrent callers share fsyncs.

Each caller hands in a small synchronous job (write + fsync a file, rename, unlink) and awaits its future.
Jobs that arrive while a batch is being written wait for the next batch; a batch runs in one worker thread
(one thread hop per batch, not per message), ends with a single fsync of each directory the jobs touched,
and only then are the callers' futures resolved. So the 250 after DATA still waits for its own fsync, but
fifty sessions finishing at the same moment pay for about one directory sync, not fifty.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Job = Callable[[], None]


@dataclass(slots=True)
class _Pending:
    job: Job
    dirs: tuple[Path, ...]
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable. A no-op where unsupported."""
    if os.name == "nt":  # Windows cannot open a directory; NTFS metadata is journalled
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class GroupCommitter:
    def __init__(self, max_batch: int = 256) -> None:
        self._pending: list[_Pending] = []
        self._running: asyncio.Task[None] | None = None
        self._max_batch = max_batch
        self.batches = 0  # statistics: how many batches ran
        self.jobs = 0  # and how many jobs they carried

    async def run(self, job: Job, *dirs: Path) -> None:
        """Run `job` in the next batch; return once it and the directory syncs are durable."""
        item = _Pending(job, dirs)
        self._pending.append(item)
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(item.future)

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                errors = await asyncio.to_thread(_execute, batch)
                self.batches += 1
                self.jobs += len(batch)
                for item, error in zip(batch, errors, strict=True):
                    if item.future.done():
                        continue
                    if error is None:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(error)
        finally:
            self._running = None

    async def close(self) -> None:
        if self._running is not None:
            await self._running


def _execute(batch: list[_Pending]) -> list[BaseException | None]:
    """Worker thread: run every job, then sync each touched directory once. Errors stay per job."""
    errors: list[BaseException | None] = []
    dirs: dict[Path, list[int]] = {}
    for index, item in enumerate(batch):
        try:
            item.job()
            errors.append(None)
            for d in item.dirs:
                dirs.setdefault(d, []).append(index)
        except BaseException as exc:  # handed to the waiting caller
            errors.append(exc)
    for directory, indexes in dirs.items():
        try:
            fsync_dir(directory)
        except OSError as exc:
            for index in indexes:
                errors[index] = exc
    return errors
