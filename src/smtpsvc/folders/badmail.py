"""The Badmail folder: what can be neither delivered nor returned to its sender.

Each item is three files sharing a name: `<name>.bad` (the message as it was), `<name>.bdr` (plain text:
one line per failure, each with its status code) and `<name>.bdp` (the JSON envelope, so a replay can use
the original sender and recipients). The .bad file is written last and by rename, so an item whose .bad is
present is complete. `badmail.max_size` caps the folder (MaxBadMailFolderSize): after each write the oldest
items are removed until the folder fits; `0` keeps nothing (Exchange 2003 SP1); the event is logged anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from smtpsvc import events
from smtpsvc.events import EventLog
from smtpsvc.safeio import fsync_dir, publish, synced_file, write_synced


def write_badmail(
    badmail_dir: Path,
    name: str,
    message: Path | bytes | BinaryIO,
    reasons: Sequence[str],
    envelope: dict[str, Any] | None,
    max_size: int,
    move: bool = False,
) -> Path | None:
    """Write one Badmail item; returns the .bad path, or None when Badmail is disabled (max_size 0).
    `message` is a file name, the bytes, or a seekable handle read from its start (the caller closes it).
    With `move`, the file named is renamed into Badmail instead of copied (one that cannot be read).

    Runs in a worker thread. Raises OSError when the folder cannot be written.
    """
    if max_size == 0:
        return None
    badmail_dir.mkdir(parents=True, exist_ok=True)
    name = _free_name(badmail_dir, name)
    bdr = badmail_dir / f"{name}.bdr"
    bdp = badmail_dir / f"{name}.bdp"
    bad = badmail_dir / f"{name}.bad"
    tmp = badmail_dir / f".{name}.bad.tmp"
    # "backslashreplace": a lone surrogate (a file name that is not UTF-8) is written as an escape, never
    # a UnicodeEncodeError that would leave the item half written.
    try:
        write_synced(bdr, "".join(f"{line}\r\n" for line in reasons).encode("utf-8", "backslashreplace"))
        text = json.dumps(envelope or {}, indent=2, ensure_ascii=False)
        write_synced(bdp, text.encode("utf-8", "backslashreplace"))
        if move and isinstance(message, Path):
            os.rename(message, bad)  # no copy: it cannot be read; kept as it is for the operator
            fsync_dir(badmail_dir)
            return bad
        with synced_file(tmp) as out:
            if isinstance(message, bytes):
                out.write(message)
            elif isinstance(message, Path):
                with open(message, "rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            else:
                message.seek(0)
                shutil.copyfileobj(message, out, 1024 * 1024)
        publish(tmp, bad)  # the folder's fsync covers the .bdr and .bdp names too
    except BaseException:
        # No half item: a .bdr without its .bad would be listed by nobody and left behind at every retry.
        for path in (tmp, bdr, bdp):
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    return bad


def printable(text: str) -> str:
    """Text an event, a .bdr or a terminal can hold: bytes of a file name that are not UTF-8 (Python keeps
    them as lone surrogates) and control characters written as `\\xNN` escapes, the rest unchanged."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no file name made
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else repr(c)[1:-1] for c in text
    )


def _free_name(badmail_dir: Path, name: str) -> str:
    candidate, n = name, 1
    while (badmail_dir / f"{candidate}.bad").exists() or (badmail_dir / f"{candidate}.bdr").exists():
        candidate = f"{name}-{n}"
        n += 1
    return candidate


def enforce_cap(badmail_dir: Path, max_size: int) -> list[str]:
    """Remove the oldest items (all three files of each) until the folder holds at most `max_size` bytes.

    Returns the names removed, oldest first. The newest item is kept even if it alone is over the cap, so
    the failure just recorded is never the one thrown away.
    """
    items: dict[str, list[os.DirEntry[str]]] = {}
    for entry in os.scandir(badmail_dir):
        stem, dot, suffix = entry.name.rpartition(".")
        if dot and suffix in ("bad", "bdr", "bdp") and not entry.name.startswith(".") and entry.is_file():
            items.setdefault(stem, []).append(entry)
    sizes = {stem: sum(e.stat().st_size for e in entries) for stem, entries in items.items()}
    total = sum(sizes.values())
    oldest_first = sorted(items, key=lambda stem: max(e.stat().st_mtime_ns for e in items[stem]))
    removed: list[str] = []
    for stem in oldest_first[:-1]:
        if total <= max_size:
            break
        for entry in items[stem]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        total -= sizes[stem]
        removed.append(stem)
    return removed


async def put_badmail(
    event_log: EventLog,
    badmail_dir: Path,
    name: str,
    message: Path | bytes | BinaryIO,
    reasons: Sequence[str],
    envelope: dict[str, Any] | None,
    max_size: int,
    move: bool = False,
) -> Path | None:
    """Write one item and keep the folder under its cap, in a worker thread; log what the cap removed.

    Raises OSError when the item cannot be written (the caller keeps the message and tries again later).
    """

    def work() -> tuple[Path | None, list[str]]:
        path = write_badmail(badmail_dir, name, message, reasons, envelope, max_size, move)
        return path, (enforce_cap(badmail_dir, max_size) if path is not None else [])

    path, dropped = await asyncio.to_thread(work)
    if dropped:
        event_log.emit(
            events.Event(
                events.BADMAIL_WRITTEN,
                f"Badmail folder over badmail.max_size ({max_size} bytes): removed the oldest item(s) "
                + ", ".join(dropped),
                cause="badmail-cap",
            )
        )
    return path
