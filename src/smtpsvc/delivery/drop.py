"""Local delivery: write the message into the Drop folder, as IIS did for its local domains.

The file starts with `X-Sender: <addr>` and one `X-Receiver: <addr>` per local recipient, then the queued
message byte for byte, so copying it into Pickup replays it with the same envelope (KB306043). Written to a
temporary name, fsynced and renamed: a reader of drop/ never sees half a file. Runs in a worker thread.

The message comes from the queue as an open handle (`QueueStore.open_message`: the spool file, or the
bytes PostgreSQL returned), so Drop works the same with either backend; in a cluster the node that
delivers writes into its own drop/ folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from smtpsvc.queue.commit import fsync_dir

COPY_CHUNK = 1024 * 1024


def envelope_lines(sender: str, recipients: Sequence[str]) -> bytes:
    lines = [f"X-Sender: <{sender}>\r\n"] + [f"X-Receiver: <{r}>\r\n" for r in recipients]
    return "".join(lines).encode("utf-8")


def write_drop_file(
    drop_dir: Path, queue_id: str, sender: str, recipients: Sequence[str], message: Path | BinaryIO
) -> Path:
    """Deliver into drop/; returns the final path. Raises OSError (a transient failure, e.g. disk full).
    `message` is a file name or a seekable handle, read from its start (the caller closes a handle)."""
    drop_dir.mkdir(parents=True, exist_ok=True)
    tmp = drop_dir / f".{queue_id}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as out, _opened(message) as src:
            out.write(envelope_lines(sender, recipients))
            src.seek(0)
            shutil.copyfileobj(src, out, COPY_CHUNK)
            out.flush()
            os.fsync(out.fileno())
        final = _free_name(drop_dir, queue_id)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(drop_dir)
    return final


def _opened(message: Path | BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """The file opened for reading, or the caller's handle left open (nullcontext)."""
    if isinstance(message, Path):
        return open(message, "rb")
    return contextlib.nullcontext(message)


def _free_name(drop_dir: Path, queue_id: str) -> Path:
    """`<id>.eml`, or `<id>-N.eml` when a retry after a crash delivers the same message again."""
    candidate = drop_dir / f"{queue_id}.eml"
    n = 1
    while candidate.exists():
        candidate = drop_dir / f"{queue_id}-{n}.eml"
        n += 1
    return candidate
