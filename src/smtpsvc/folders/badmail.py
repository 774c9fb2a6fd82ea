"""The Badmail folder: what can be neither delivered nor returned to its sender.

Each item is three files sharing a name: `<name>.bad` (the message as it was), `<name>.bdr` (plain text:
one line per failure, each with its status code) and `<name>.bdp` (the JSON envelope, so a replay can use
the original sender and recipients). The .bad file is written last and by rename, so an item whose .bad is
present is complete. `badmail.max_size = 0` keeps nothing (Exchange 2003 SP1); the event is logged anyway.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smtpsvc.queue.commit import fsync_dir


def write_badmail(
    badmail_dir: Path,
    name: str,
    message: Path | bytes,
    reasons: Sequence[str],
    envelope: dict[str, Any] | None,
    max_size: int,
) -> Path | None:
    """Write one Badmail item; returns the .bad path, or None when Badmail is disabled (max_size 0).

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
    _write_synced(bdr, "".join(f"{line}\r\n" for line in reasons).encode("utf-8"))
    _write_synced(bdp, json.dumps(envelope or {}, indent=2, ensure_ascii=False).encode("utf-8"))
    try:
        with open(tmp, "wb") as out:
            if isinstance(message, bytes):
                out.write(message)
            else:
                with open(message, "rb") as src:
                    shutil.copyfileobj(src, out, 1024 * 1024)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, bad)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(badmail_dir)
    return bad


def _free_name(badmail_dir: Path, name: str) -> str:
    candidate, n = name, 1
    while (badmail_dir / f"{candidate}.bad").exists() or (badmail_dir / f"{candidate}.bdr").exists():
        candidate = f"{name}-{n}"
        n += 1
    return candidate


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as out:
        out.write(payload)
        out.flush()
        os.fsync(out.fileno())
