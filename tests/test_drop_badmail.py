"""Drop files (X-Sender/X-Receiver + message) and Badmail items (.bad/.bdr/.bdp)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from smtpsvc.delivery.drop import write_drop_file
from smtpsvc.folders.badmail import enforce_cap, write_badmail


def test_drop_file_has_envelope_lines_then_the_message(tmp_path: Path) -> None:
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: hi\r\n\r\nbody\r\n")
    path = write_drop_file(tmp_path / "drop", "Q1", "a@x.test", ["b@local.test", "c@local.test"], message)
    assert path.name == "Q1.eml"
    assert path.read_bytes() == (
        b"X-Sender: <a@x.test>\r\nX-Receiver: <b@local.test>\r\n"
        b"X-Receiver: <c@local.test>\r\nSubject: hi\r\n\r\nbody\r\n"
    )
    assert [p.name for p in (tmp_path / "drop").iterdir()] == ["Q1.eml"]  # no temporary left behind


def test_second_drop_of_the_same_message_does_not_overwrite_the_first(tmp_path: Path) -> None:
    message = tmp_path / "m.eml"
    message.write_bytes(b"Subject: hi\r\n\r\nbody\r\n")
    first = write_drop_file(tmp_path / "drop", "Q1", "", ["b@local.test"], message)
    second = write_drop_file(tmp_path / "drop", "Q1", "", ["b@local.test"], message)
    assert first != second and first.exists() and second.exists()
    assert first.read_bytes().startswith(b"X-Sender: <>\r\n")


def test_badmail_item_has_message_reason_and_envelope(tmp_path: Path) -> None:
    bad = write_badmail(
        tmp_path / "badmail",
        "Q9",
        b"Subject: ndr\r\n\r\nx\r\n",
        ["first failure 5.1.1", "second 4.4.7"],
        {"id": "Q9", "sender": ""},
        max_size=10**6,
    )
    assert bad is not None and bad.name == "Q9.bad"
    assert bad.read_bytes() == b"Subject: ndr\r\n\r\nx\r\n"
    assert (tmp_path / "badmail" / "Q9.bdr").read_bytes() == b"first failure 5.1.1\r\nsecond 4.4.7\r\n"
    assert json.loads((tmp_path / "badmail" / "Q9.bdp").read_text())["id"] == "Q9"


def test_badmail_disabled_by_max_size_zero_writes_nothing(tmp_path: Path) -> None:
    assert write_badmail(tmp_path / "badmail", "Q9", b"x", ["r"], None, max_size=0) is None
    assert not (tmp_path / "badmail").exists()


def test_cap_removes_the_oldest_items_first_and_keeps_the_newest(tmp_path: Path) -> None:
    folder = tmp_path / "badmail"
    for n in range(5):
        path = write_badmail(folder, f"Q{n}", b"x" * 1000, ["r"], {"id": n}, max_size=10**9)
        assert path is not None
        stamp = 1_000_000 + n  # distinct ages, oldest first
        for sibling in folder.glob(f"Q{n}.*"):
            os.utime(sibling, (stamp, stamp))
    removed = enforce_cap(folder, max_size=2500)
    assert removed == ["Q0", "Q1", "Q2"]
    assert sorted(p.stem for p in folder.glob("*.bad")) == ["Q3", "Q4"]
    assert not list(folder.glob("Q0.*"))


def test_cap_never_removes_the_item_just_written(tmp_path: Path) -> None:
    folder = tmp_path / "badmail"
    write_badmail(folder, "BIG", b"x" * 5000, ["r"], None, max_size=10**9)
    assert enforce_cap(folder, max_size=100) == []
    assert (folder / "BIG.bad").exists()
