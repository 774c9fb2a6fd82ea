"""Safe file writes, done in one place (chasquid's `safeio`): a new file written and handed back for its
fsync, a file written and fsynced, a file written in pieces and fsynced, the rename that publishes it
followed by the fsync of its folder, an atomic replacement in one call, and a folder's fsync. Standard
library only.

Why each step: a rename is atomic, so a reader sees the old file or the new one, never half of one; the
fsync of the file before the rename makes sure the new name never points at contents that did not reach
the disk; the fsync of the folder after it makes the rename itself survive a crash (names live in the
directory, which POSIX syncs separately). Windows cannot open a folder to sync it, and NTFS journals its
names: there `fsync_dir` does nothing (`SYNCS_DIRS`).

The queue's group commit (queue/commit.py) batches these fsyncs across concurrent callers in threads of
its own; it takes its primitives from here and keeps the batching to itself.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

SYNCS_DIRS = os.name != "nt"  # a folder can be opened and fsynced (Windows: no, and NTFS journals names)
PRIVATE = 0o600  # files holding secrets: the accounts file, the admin token

StrPath = str | os.PathLike[str]


def write_all(fd: int, payload: bytes) -> None:
    """Write all of `payload` to the descriptor (os.write may write less than asked)."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view) :]


def write_new(path: StrPath, payload: bytes, mode: int = 0o666) -> int:
    """`payload` in a new (or truncated) file at `path`; returns its open descriptor, not yet fsynced: the
    caller fsyncs and closes it (the group committer does, many at once). When the write fails (a full
    disk), the file is removed: a half-written file left behind would only take space and confuse."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, payload)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return fd


def write_synced(path: StrPath, payload: bytes, mode: int = 0o666) -> None:
    """`payload` in a new (or truncated) file at `path`, fsynced and closed; removed when that fails. Its
    name is not synced: do that with the folder (`fsync_dir`, `publish`)."""
    fd = write_new(path, payload, mode)
    try:
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


@contextlib.contextmanager
def synced_file(path: StrPath, mode: int = 0o666) -> Iterator[BinaryIO]:
    """A new (or truncated) file at `path`, open for writing in pieces (a message copied in chunks). When
    the block ends it is flushed, fsynced and closed; when the block raises, it is closed and removed."""
    out = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb")
    try:
        with out:
            yield out
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def publish(tmp: StrPath, path: StrPath) -> None:
    """Rename the written and fsynced `tmp` over `path`, then fsync the folder of `path`: after a crash,
    `path` is the old file or the new one, whole. `tmp` is removed when the rename fails."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(Path(path).parent)


def replace_file(
    path: StrPath,
    payload: bytes,
    *,
    mode: int = 0o666,
    durable: bool = True,
    prepare: Callable[[int], None] | None = None,
) -> None:
    """Replace the file at `path` with `payload` atomically: written to a temporary file in the same folder
    (a random dot name, created exclusively), then renamed over it. `durable`: the file is fsynced before
    the rename and the folder after it, so the new content survives a crash; without, readers still never
    see half a file, but a crash may bring the old one back (for files made again at every start).
    `prepare(fd)` runs on the written temporary file before its fsync (to give it the old file's owner)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            write_all(fd, payload)
            if prepare is not None:
                prepare(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: StrPath) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable. Nothing on Windows."""
    if not SYNCS_DIRS:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
