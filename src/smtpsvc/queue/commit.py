"""Group commit: file-system changes that must be durable, batched so concurrent callers share the waits.

A caller has already written its files (page-cache writes on the event loop take microseconds) and hands
in a `Commit`: the file descriptors whose contents must reach the disk, the directories whose new entries
(made before the commit, like those files) must reach it too, the renames or unlinks to do once they have
(`then`, run on the event loop), and the directories whose entries must be durable after those. The batch
that takes it goes through up to three steps and resolves every caller's future only at the end:

  1. fsync every file of the batch and every directory it was `created_in`, side by side (by the kernel's
     native AIO, else by threads: queue/fsyncs.py): fsyncs in flight at the same moment share journal
     commits (ext4, xfs), where one after the other each pays for its own;
  2. on the event loop, each caller's `then` (the renames that publish the files);
  3. fsync each directory named in `dirs` once, the same way (no step 3 when no commit names one).

So the 250 after DATA still waits for its own fsyncs, and fifty sessions finishing together pay for about
one journal commit. Only the fsyncs leave the event loop: every open, write and rename stays on it (when
the whole job ran in a thread, the loop and that thread handed the GIL back and forth in futex storms). A
new message needs step 1 only (queue/local.py).
The primitives (writing a file for its fsync, whether a folder can be synced) come from smtpsvc.safeio;
the batching is this module's own.

While a batch is in step 3, the next batch (the commits that arrived meanwhile) already starts step 1, so
a commit waits for at most the file sync of the batch before it, not the whole of it. Steps 2 run in batch
order on the loop; each batch syncs the directories after its own renames.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from smtpsvc.queue import fsyncs
from smtpsvc.queue.fsyncs import Fsyncs
from smtpsvc.safeio import SYNCS_DIRS

LINGER = 0.02  # how long a commit nobody waits for is held, so that the next ones share its batch


@dataclass(slots=True)
class Commit:
    fds: Sequence[int] = ()  # made durable, then closed by the committer (whatever happens)
    then: Callable[[], None] | None = None  # on the event loop, after the fsyncs: renames, unlinks
    dirs: Sequence[Path] = ()  # fsynced once per batch after every `then`
    created_in: Sequence[Path] = ()  # directories with new entries already made: fsynced with the files


@dataclass(slots=True)
class _Pending:
    commit: Commit
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    error: BaseException | None = None


class GroupCommitter:
    def __init__(self, max_batch: int = 256) -> None:
        self._pending: list[_Pending] = []
        self._running: asyncio.Task[None] | None = None
        self._max_batch = max_batch
        self._fsyncs: Fsyncs | None = None  # started at the first commit
        self._finishing: set[asyncio.Task[None]] = set()  # batches in their directory sync
        self.batches = 0  # statistics: how many batches ran
        self.jobs = 0  # and how many commits they carried

    async def run(self, commit: Commit) -> None:
        """Make `commit` durable in the next batch; raises the OSError of its fsync, `then` or dir sync."""
        item = _Pending(commit)
        self._pending.append(item)
        if self._running is None:
            self._running = asyncio.get_running_loop().create_task(self._drain())
        # Not shielded: a caller cancelled meanwhile cancels only its own future, which the batch then
        # skips; the batch itself (a separate task) runs to its end either way.
        await item.future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                try:
                    dirs = await self._sync_and_publish(loop, batch)
                except Exception as exc:  # a bug here must fail the batch's callers, never leave them waiting
                    _fail(batch, exc)
                    _resolve(batch)
                    continue
                self.batches += 1
                self.jobs += len(batch)
                if not dirs:
                    _resolve(batch)
                    continue
                # The directory sync of this batch runs while the next batch (whoever arrived meanwhile)
                # already syncs its files: a commit no longer waits for the whole of the previous batch.
                # Each batch still syncs the directories after its own renames.
                finishing = loop.create_task(self._sync_dirs(loop, batch, dirs))
                self._finishing.add(finishing)
                finishing.add_done_callback(self._finishing.discard)
        finally:
            self._running = None

    async def _sync_and_publish(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]
    ) -> dict[Path, list[_Pending]]:
        """Steps 1 and 2: fsync the batch's files, then run each caller's `then`; returns the directories
        to sync with the commits that touched them."""
        if self._fsyncs is None:
            self._fsyncs = fsyncs.start(loop)
        files = [(item, fd) for item in batch for fd in item.commit.fds]
        folders: list[tuple[list[_Pending], int]] = []  # one fsync per directory serves all its commits
        if SYNCS_DIRS:
            for directory, members in _created_in(batch).items():
                try:
                    folders.append((members, os.open(directory, os.O_RDONLY)))
                except OSError as exc:
                    _fail(members, exc)
        if files or folders:
            errors = await self._fsyncs.run(loop, [fd for _, fd in files] + [fd for _, fd in folders])
            for (item, _), error in zip(files, errors, strict=False):
                if error is not None:
                    _fail((item,), error)
            for (members, _), error in zip(folders, errors[len(files) :], strict=True):
                if error is not None:
                    _fail(members, error)
        dirs: dict[Path, list[_Pending]] = {}
        for item in batch:
            if item.error is not None:
                continue
            if item.commit.then is not None:
                try:
                    item.commit.then()
                except Exception as exc:  # not only OSError: whatever it is, its own caller hears of it
                    item.error = exc
                    continue
            if SYNCS_DIRS:
                for directory in item.commit.dirs:
                    dirs.setdefault(directory, []).append(item)
        return dirs

    async def _sync_dirs(
        self, loop: asyncio.AbstractEventLoop, batch: list[_Pending], dirs: dict[Path, list[_Pending]]
    ) -> None:
        """Step 3, then the callers' answers."""
        assert self._fsyncs is not None
        try:
            opened: list[int] = []
            errors: list[BaseException | None] = []
            for directory in dirs:
                try:
                    opened.append(os.open(directory, os.O_RDONLY))
                    errors.append(None)
                except OSError as exc:
                    errors.append(exc)
            synced = iter(await self._fsyncs.run(loop, opened))
            errors = [error if error is not None else next(synced) for error in errors]
            for members, error in zip(dirs.values(), errors, strict=True):
                if error is not None:
                    _fail(members, error)
        except Exception as exc:  # as in _drain: the callers get an answer whatever happens
            _fail(batch, exc)
        finally:
            _resolve(batch)

    async def close(self) -> None:
        if self._running is not None:
            await self._running
        if self._finishing:
            await asyncio.gather(*self._finishing)
        if self._fsyncs is not None:
            self._fsyncs.stop()
            self._fsyncs = None


class Lingering:
    """Commits whose callers do not wait for them (a completed message's removal from `queue/`), held for
    up to `linger` seconds and then handed to the committer together, so they share one batch and with
    it one fsync of their directory.

    Under a steady stream of deliveries the completions arrive one or two at a time, and each batch of
    them paid for its own fsync of `queue/`: about one directory sync per message. Held for 20 ms, a
    stream of 600 messages a second pays one sync in twelve messages; the CPU per relayed message fell by
    about a fifth (docs/performance.md, "The defaults, third measurement"). Nothing gets less durable:
    each commit still ends with its directory's fsync, and what waits for that (the spare pool's reuse of
    the removed files) waits 20 ms longer. At `limit` held commits (a batch's worth) they go at once."""

    def __init__(self, committer: GroupCommitter, linger: float = LINGER, limit: int = 256) -> None:
        self._committer = committer
        self._linger = linger
        self._limit = limit
        self._held: list[tuple[Commit, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._handed: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    def run(self, commit: Commit) -> asyncio.Future[None]:
        """Hold `commit`; the future is its outcome, as `GroupCommitter.run` would give it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._held.append((commit, future))
        if len(self._held) >= self._limit:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._linger, self.flush)
        return future

    def flush(self) -> None:
        """Hand every held commit to the committer now. They are queued in this turn of the event loop,
        before its batch task runs again, so they land in the same batch (up to its size)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held, self._held = self._held, []
        loop = asyncio.get_running_loop()
        for commit, future in held:
            task = loop.create_task(self._committer.run(commit))
            self._handed.add(task)
            task.add_done_callback(self._handed.discard)
            task.add_done_callback(functools.partial(_settle, future))


def _settle(future: asyncio.Future[None], task: asyncio.Future[None]) -> None:
    if future.done():
        return  # its owner cancelled it; the commit ran anyway
    if task.cancelled():
        future.cancel()
    elif (error := task.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(None)


def _created_in(batch: list[_Pending]) -> dict[Path, list[_Pending]]:
    """The directories whose new entries the batch makes durable in step 1, with the commits in each."""
    folders: dict[Path, list[_Pending]] = {}
    for item in batch:
        for directory in item.commit.created_in:
            folders.setdefault(directory, []).append(item)
    return folders


def _fail(items: Sequence[_Pending], error: BaseException) -> None:
    """Record `error` for each commit that has none yet (the first error is the one its caller sees)."""
    for item in items:
        if item.error is None:
            item.error = error


def _resolve(batch: list[_Pending]) -> None:
    for item in batch:
        if item.future.done():
            continue  # its caller was cancelled
        if item.error is None:
            item.future.set_result(None)
        else:
            item.future.set_exception(item.error)
