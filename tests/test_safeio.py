"""smtpsvc.safeio: the safe file writes every part uses (the queue's commit path, Drop, Badmail, Pickup
submissions, the accounts file, the admin token)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from smtpsvc import safeio


def test_replace_file_puts_the_new_content_in_place_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "users.toml"
    target.write_bytes(b"old")
    safeio.replace_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["users.toml"]


def test_replace_file_that_fails_keeps_the_old_file_and_no_temporary_one(tmp_path: Path) -> None:
    target = tmp_path / "users.toml"
    target.write_bytes(b"old")

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        safeio.replace_file(target, b"new", prepare=fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["users.toml"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX modes")
def test_replace_file_gives_the_file_the_mode_asked(tmp_path: Path) -> None:
    target = tmp_path / "admin.token"
    safeio.replace_file(target, b"secret\n", mode=safeio.PRIVATE, durable=False)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_a_synced_file_whose_writer_fails_is_removed(tmp_path: Path) -> None:
    partial = tmp_path / ".drop.tmp"
    with pytest.raises(RuntimeError), safeio.synced_file(partial) as out:
        out.write(b"half a message")
        raise RuntimeError("the source went away")
    assert not partial.exists()


def test_publish_renames_the_file_over_its_target(tmp_path: Path) -> None:
    tmp, final = tmp_path / ".x.tmp", tmp_path / "x.eml"
    with safeio.synced_file(tmp) as out:
        out.write(b"message")
    safeio.publish(tmp, final)
    assert final.read_bytes() == b"message" and not tmp.exists()


def test_publish_that_cannot_rename_removes_the_temporary_file(tmp_path: Path) -> None:
    tmp = tmp_path / ".x.tmp"
    safeio.write_synced(tmp, b"message")
    with pytest.raises(OSError):
        safeio.publish(tmp, tmp_path / "missing-folder" / "x.eml")
    assert not tmp.exists()


def test_write_new_hands_back_a_descriptor_for_the_caller_to_sync(tmp_path: Path) -> None:
    path = tmp_path / "q.eml"
    fd = safeio.write_new(path, b"x" * 100_000)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 100_000
