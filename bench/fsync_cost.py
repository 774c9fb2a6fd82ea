#!/usr/bin/env python3
"""What one durable write of a small message costs on a file system: the floor under every `250`.

smtpsvc answers `250` after the fsync of the message, of its envelope and of the folder entries
(docs/architecture.md, "Durability"); how long those take is the largest part of the end-of-DATA -> `250`
time with one session, and of the CPU per message at 10. This measures, for a payload of --size bytes, the
median of --count repetitions of each of:

- **new file**: create a file, write, fsync it, fsync its folder (a new name made durable);
- **reused file**: overwrite a file that already has its blocks, cut it to length, fsync (what a spare
  file costs, queue/spares.py);
- **three side by side by threads**: a reused file, a second reused file and the folder, each fsynced by
  its own thread at once (the `.eml`, the `.pending` and `incoming/` of a commit), as the queue did until
  2026-12-05 and still does where the kernel refuses native AIO;
- **the same three by the kernel**: handed to the kernel in one `io_submit` and reaped on an event loop,
  by the service's own `smtpsvc.queue.fsyncs` (the way the queue commits on Linux);
- **journal**: write at the next offset of a preallocated, already written file, then fdatasync (no
  metadata to write: what a write-ahead log on recycled segments costs).

    .venv/bin/python bench/fsync_cost.py [--dir DIR] [--size 1100] [--count 400]

--dir must be on the file system to judge (the mailroot's; default: a temporary folder in the current
one, since /tmp may be a tmpfs, where fsync costs nothing). Everything it writes is under one temporary
folder, removed at the end. Bounded: at most --count x 5 timed writes and 8 MiB of journal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from smtpsvc.queue import fsyncs

JOURNAL_SIZE = 8 * 1024 * 1024
BLOCK = 4096


def median_ms(count: int, step: Callable[[int], None]) -> float:
    times = []
    for i in range(count):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def by_the_kernel(count: int, reused: list[int], folder_fd: int, payload: bytes) -> float:
    """The commit's three fsyncs as the service makes them on Linux: smtpsvc.queue.fsyncs.KernelFsync, on an
    event loop (threads where the kernel refuses native AIO, as in the service)."""

    async def timed() -> float:
        loop = asyncio.get_running_loop()
        syncer = fsyncs.start(loop)
        times = []
        try:
            for _ in range(count):
                for fd in reused:
                    os.pwrite(fd, payload, 0)
                    os.ftruncate(fd, len(payload))
                start = time.perf_counter()
                # copies: the syncer closes what it is given
                errors = await syncer.run(loop, [os.dup(fd) for fd in (*reused, folder_fd)])
                times.append(time.perf_counter() - start)
                failed = next((e for e in errors if e is not None), None)
                if failed is not None:
                    raise failed
        finally:
            syncer.stop()
        return statistics.median(times) * 1000

    return asyncio.run(timed())


def measure(folder: Path, size: int, count: int) -> list[tuple[str, float]]:
    payload = b"x" * size
    folder_fd = os.open(folder, os.O_RDONLY)
    opened = [folder_fd]
    threads = ThreadPoolExecutor(3, thread_name_prefix="fsync")  # started once, like the committer's
    try:

        def new_file(i: int) -> None:
            fd = os.open(folder / f"new{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(folder_fd)

        reused = []
        for name in ("reused.eml", "reused.pending"):
            fd = os.open(folder / name, os.O_CREAT | os.O_RDWR, 0o600)
            opened.append(fd)
            os.write(fd, payload)
            os.fsync(fd)
            reused.append(fd)

        def reused_file(i: int) -> None:
            os.pwrite(reused[0], payload, 0)
            os.ftruncate(reused[0], size)
            os.fsync(reused[0])

        def three(i: int) -> None:
            for fd in reused:
                os.pwrite(fd, payload, 0)
                os.ftruncate(fd, size)
            # each on a thread of its own, all at once, then wait for all: as queue/commit.py's threads do
            list(threads.map(os.fsync, [*reused, folder_fd]))

        journal = os.open(folder / "journal", os.O_CREAT | os.O_RDWR, 0o600)
        opened.append(journal)
        os.write(journal, b"\0" * JOURNAL_SIZE)  # written once, so later writes change no metadata
        os.fsync(journal)
        slots = JOURNAL_SIZE // BLOCK
        record = -(-size // BLOCK) * BLOCK  # each write starts on a block of its own

        def journal_write(i: int) -> None:
            os.pwrite(journal, payload, (i * record) % (slots * BLOCK))
            os.fdatasync(journal)

        kernel = by_the_kernel(count, reused, folder_fd, payload)
        return [
            ("new file: create, write, fsync, fsync the folder", median_ms(count, new_file)),
            ("reused file: overwrite, cut to length, fsync", median_ms(count, reused_file)),
            ("three side by side by threads: 2 reused files and the folder", median_ms(count, three)),
            ("the same three by the kernel's AIO (queue/fsyncs.py, the service's way)", kernel),
            ("journal: write into a preallocated file, fdatasync", median_ms(count, journal_write)),
        ]
    finally:
        threads.shutdown()
        for fd in opened:
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--dir", type=Path, default=Path.cwd(), help="where to write (default: here)")
    p.add_argument("--size", type=int, default=1100, help="payload bytes (default 1100: a 1 KiB message)")
    p.add_argument("--count", type=int, default=400, help="repetitions of each (default 400)")
    args = p.parse_args(argv)
    if not 1 <= args.size <= 1024 * 1024:
        p.error("--size must be between 1 and 1048576")
    if not 1 <= args.count <= 10000:
        p.error("--count must be between 1 and 10000")
    if not args.dir.is_dir():
        p.error(f"--dir {args.dir}: not a folder")
    folder = Path(tempfile.mkdtemp(prefix="smtpsvc-fsync-", dir=args.dir))
    try:
        rows = measure(folder, args.size, args.count)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"{args.size} bytes, median of {args.count}, in {args.dir.resolve()}")
    for what, ms in rows:
        print(f"  {ms:6.3f} ms  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
