"""The full-disk watcher's decisions (smtpsvc.diskspace); tests/test_disk_full.py drives the real service."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from smtpsvc.diskspace import MIN_FREE_BYTES, SpaceWatcher, has_room, is_full
from smtpsvc.queue.base import QueueError


def test_no_space_and_no_quota_are_a_full_disk_also_behind_a_queue_error() -> None:
    for code in (errno.ENOSPC, errno.EDQUOT):
        try:
            try:
                raise OSError(code, "full")
            except OSError as exc:
                raise QueueError("cannot commit queue file") from exc
        except QueueError as wrapped:
            assert is_full(wrapped)
    assert not is_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_full(QueueError("the database is down"))
    assert not is_full(None)


def test_the_watcher_reports_each_thing_once_and_calls_back_when_there_is_room(tmp_path: Path) -> None:
    reports: list[tuple[bool, str]] = []
    calls: list[str] = []
    watcher = SpaceWatcher()
    watcher.report = lambda full, text: reports.append((full, text))
    watcher.subscribe(lambda: calls.append("room"))
    for _ in range(3):  # every failed write says so; the operator hears it once
        watcher.full(tmp_path, "the queue", "Clients get 452 4.3.1.")
    watcher.full(tmp_path, "the Drop folder", "Local delivery waits.")
    assert watcher.is_full
    assert [text.split(":")[1].split(" cannot")[0].strip() for _, text in reports] == [
        "the queue",
        "the Drop folder",
    ]
    assert all(full for full, _ in reports)
    assert "Clients get 452 4.3.1. Free space on that disk." in reports[0][1]

    assert watcher.check()  # tmp_path has room: both are announced, and the subscribers are called once
    assert not watcher.is_full
    assert [full for full, _ in reports[2:]] == [False, False]
    assert reports[2][1].startswith(f"Disk space is available again in {tmp_path}: the queue is written")
    assert calls == ["room"]
    assert not watcher.check()  # nothing is full any more
    assert calls == ["room"]


def test_without_statvfs_free_space_is_read_as_windows_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no os.statvfs: the watcher must still tell room from none (shutil.disk_usage, there
    GetDiskFreeSpaceExW), not stop with an AttributeError the first time a write finds the disk full.
    (On Linux shutil.disk_usage itself uses statvfs: it stands in here with the real figures.)"""
    usage = shutil.disk_usage(tmp_path)
    free = {"bytes": MIN_FREE_BYTES - 1}

    def disk_usage(path: str | Path) -> object:
        if not Path(path).exists():
            raise FileNotFoundError(2, "The system cannot find the path specified", str(path))
        return usage._replace(free=free["bytes"])

    monkeypatch.delattr(os, "statvfs")
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    assert not has_room(tmp_path)
    free["bytes"] = MIN_FREE_BYTES
    assert has_room(tmp_path)
    assert not has_room(tmp_path / "gone")  # a folder that is not there: no sign of space, no exception
