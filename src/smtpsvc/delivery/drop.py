"""Local delivery: write the message into the Drop folder, as IIS did for its local domains.

The file starts with `X-Sender: <addr>` and one `X-Receiver: <addr>` per local recipient, then the queued
message byte for byte, so copying it into Pickup replays it with the same envelope (KB306043). Written to a
temporary name, fsynced and renamed: a reader of drop/ never sees half a file. Runs in a worker thread.

`DropTransport` is the Drop folder as a `Transport` (delivery/transport.py). The message comes from the
queue as an open handle (`QueueStore.open_message`: the spool file, or the bytes PostgreSQL returned), so
Drop works the same with either backend; in a cluster the node that delivers writes into its own drop/.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from smtpsvc import diskspace
from smtpsvc.delivery.transport import MessageSource, Outcome
from smtpsvc.model import DeliveryResult, Envelope, Recipient
from smtpsvc.queue.base import MessageSetAside, QueueError
from smtpsvc.routing.connectors import RouteChoice
from smtpsvc.safeio import publish, synced_file

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
    with _opened(message) as src, synced_file(tmp) as out:
        out.write(envelope_lines(sender, recipients))
        src.seek(0)
        shutil.copyfileobj(src, out, COPY_CHUNK)
    final = _free_name(drop_dir, queue_id)
    publish(tmp, final)
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


class DropTransport:
    """Local delivery: one Drop file per route group. A write error (disk full) or a queue that cannot be
    read defers the recipients (451): never a loss (SPEC 2.6). A full disk is told to the watcher (event
    9010) and the outcome says so (`cause` "disk-full"): the scheduler tries those recipients again as soon
    as there is room, not at their next retry time."""

    def __init__(self, drop_dir: Path, space: diskspace.SpaceWatcher | None = None) -> None:
        self.drop_dir = drop_dir
        self.space = space

    async def deliver(
        self, route: RouteChoice, envelope: Envelope, recipients: Sequence[Recipient], message: MessageSource
    ) -> Outcome:
        addresses = [r.address for r in recipients]
        try:
            handle = await message.open()
            try:
                path = await asyncio.to_thread(
                    write_drop_file, self.drop_dir, envelope.id, envelope.sender, addresses, handle
                )
            finally:
                handle.close()
        except MessageSetAside:
            raise  # not a deferral: the message is no longer queued (queue/corrupt/, event 9001)
        except (OSError, QueueError) as exc:
            if isinstance(exc, OSError):
                reply = f"451 4.3.1 Cannot write to the Drop folder: {exc.strerror or exc}"
            else:
                reply = f"451 4.3.0 Cannot read the message from the queue: {exc}"
            status = reply.split(" ", 2)[1]
            deferred = [
                DeliveryResult(a, ok=False, permanent=False, reply=reply, status=status, remote_mta="drop")
                for a in addresses
            ]
            if isinstance(exc, OSError) and diskspace.is_full(exc):
                if self.space is not None:
                    self.space.full(
                        self.drop_dir,
                        "the Drop folder",
                        "Local delivery waits and is tried again as soon as there is room.",
                    )
                return Outcome(deferred, cause=diskspace.CAUSE)
            return Outcome(deferred)
        reply = f"250 2.0.0 Delivered to the Drop folder as {path.name}"
        return Outcome(
            [
                DeliveryResult(a, ok=True, permanent=False, reply=reply, status="2.0.0", remote_mta="drop")
                for a in addresses
            ]
        )

    def revive(self, links: set[str] | frozenset[str] | None) -> None:
        """Nothing to forget: the Drop folder has no backoff."""

    async def close(self) -> None:
        return None
