"""The newest events of `log/events.jsonl`, for the API and the web viewer's live tail.

Only the end of the file is read (a busy relay's log grows by megabytes a day): enough blocks from the end
to find `limit` matching records, capped at TAIL_BYTES.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BLOCK = 64 * 1024
TAIL_BYTES = 8 * 1024 * 1024


def tail(path: Path, limit: int = 100, since: str = "", event_id: int | None = None) -> list[dict[str, Any]]:
    """Up to `limit` newest records, oldest first; `since` is an RFC 3339 time (records strictly after it)."""
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below; a missing log is simply empty
    except FileNotFoundError:
        return []
    with fh:
        end = fh.seek(0, os.SEEK_END)
        start = end
        found: list[dict[str, Any]] = []
        carry = b""
        while start > 0 and end - start < TAIL_BYTES and len(found) < limit:
            step = min(BLOCK, start)
            start -= step
            fh.seek(start)
            data = fh.read(step) + carry
            lines = data.split(b"\n")
            carry = lines.pop(0) if start > 0 else b""  # maybe cut: completed by the next block
            batch = [r for line in lines if (r := _match(line, since, event_id)) is not None]
            found = batch + found
            if since and batch and str(batch[0].get("time", "")) <= since:
                break
        if start == 0 and carry:
            record = _match(carry, since, event_id)
            if record is not None:
                found.insert(0, record)
    return found[-limit:] if limit > 0 else []


def _match(line: bytes, since: str, event_id: int | None) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a crash may cut the last line
    if not isinstance(record, dict):
        return None
    if event_id is not None and record.get("id") != event_id:
        return None
    if since and str(record.get("time", "")) <= since:
        return None
    return record
