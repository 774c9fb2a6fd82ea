"""Damaged and hostile Badmail items (`smtpsvc badmail list|show|replay`, /api/badmail): each is listed as
damaged with why and skipped; never a traceback, and the other items stay usable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from smtpsvc.cli import main
from tests.admin.conftest import Admin
from tests.conftest import base_sections, write_config

MESSAGE = b"From: <postmaster@relay.test>\r\nSubject: ndr\r\n\r\nx\r\n"
GOOD_BDP = {"sender": "", "recipients": [{"address": "alice@local.test"}]}

# (item name, its .bdp bytes, words of the damage listed)
DAMAGED_BDP = [
    ("notjson", b"{not json", "the .bdp is not JSON"),
    ("array", b"[]", "the .bdp holds a JSON list, not an object"),
    ("deep", b"[" * 100_000 + b"]" * 100_000, "the .bdp is JSON nested too deep"),
    (
        "numbers",
        json.dumps({"recipients": [{"address": 5}]}).encode(),
        "the .bdp's recipients are not a list of objects",
    ),
    ("sendernum", json.dumps({"sender": 5}).encode(), "the .bdp's sender is not text"),
]


def item(
    folder: Path, name: bytes, bdp: bytes | None = None, bdr: bytes = b"Unable to deliver. 5.1.1\r\n"
) -> None:
    base = os.path.join(os.fsencode(folder), name)
    with open(base + b".bad", "wb") as fh:
        fh.write(MESSAGE)
    with open(base + b".bdr", "wb") as fh:
        fh.write(bdr)
    if bdp is not None:
        with open(base + b".bdp", "wb") as fh:
            fh.write(bdp)


@pytest.fixture
def badmail_config(tmp_path: Path) -> tuple[Path, Path]:
    """A configuration, and its Badmail folder holding a good item and every kind of damaged one."""
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(tmp_path / "mailroot"))
    folder = tmp_path / "mailroot" / "badmail"
    folder.mkdir(parents=True)
    item(folder, b"good", json.dumps(GOOD_BDP).encode())
    for name, bdp, _ in DAMAGED_BDP:
        item(folder, name.encode(), bdp)
    item(folder, b"huge", b" ")
    with open(folder / "huge.bdp", "r+b") as fh:
        fh.truncate(2 * 1024 * 1024)  # sparse: a real size, no blocks written
    item(folder, b"bad\xffname", json.dumps(GOOD_BDP).encode())
    (folder / "folder.bad").mkdir()
    item(folder, b"hugebdr", json.dumps(GOOD_BDP).encode())
    with open(folder / "hugebdr.bdr", "r+b") as fh:
        fh.truncate(512 * 1024 * 1024)  # only its first lines are read
    return config, folder


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def test_badmail_list_shows_each_damaged_item_with_why_and_the_good_ones(
    badmail_config: tuple[Path, Path],
) -> None:
    config, _ = badmail_config
    code, out, _ = run("badmail", "list", "-c", str(config))
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "damaged" not in lines["good"] and "5.1.1" in lines["good"]
    assert "damaged" not in lines["hugebdr"] and "5.1.1" in lines["hugebdr"]
    for name, _, why in DAMAGED_BDP:
        assert f"damaged: {why}" in lines[name]
    assert "damaged: the .bdp is larger than 1,048,576 bytes" in lines["huge"]
    assert "damaged: its file name is not UTF-8 text" in lines["bad\\xffname"]
    assert "damaged: the .bad is not a file" in lines["folder"]


def test_badmail_show_of_a_damaged_item_says_why(badmail_config: tuple[Path, Path]) -> None:
    config, _ = badmail_config
    code, out, _ = run("badmail", "show", "-c", str(config), "deep")
    assert code == 0 and "5.1.1" in out and "Subject: ndr" in out
    code, _, err = run("badmail", "show", "-c", str(config), "folder")
    assert code == 1 and "cannot be read: Is a directory" in err


def test_badmail_replay_all_skips_the_damaged_items_saying_why(badmail_config: tuple[Path, Path]) -> None:
    config, folder = badmail_config
    code, _, err = run("badmail", "replay", "-c", str(config), "--all", "--kind", "all")
    assert code == 0
    pickup = sorted(p.name for p in (folder.parent / "pickup").iterdir())
    assert pickup == ["replay-good.eml", "replay-hugebdr.eml"]
    for name, _, why in DAMAGED_BDP:
        assert f"{name}: skipped, damaged: {why}" in err
    assert (folder / "deep.bad").exists() and not (folder / "good.bad").exists()
    code, _, err = run("badmail", "replay", "-c", str(config), "numbers")
    assert code == 1 and "is damaged and is not replayed" in err and (folder / "numbers.bad").exists()


async def test_the_admin_api_lists_an_item_whose_name_is_not_utf8_as_damaged(admin: Admin) -> None:
    item(admin.service.folders["badmail"], b"bad\xffname", json.dumps(GOOD_BDP).encode())
    async with admin.client() as http:
        response = await http.get("/api/badmail")
        assert response.status_code == 200
        [listed] = response.json()
        assert listed["name"] == "bad\\xffname" and "not UTF-8" in listed["damaged"]
        assert (await http.post("/api/badmail/bad%5Cxffname/replay")).status_code == 400  # not a name
    assert os.path.exists(os.path.join(os.fsencode(admin.service.folders["badmail"]), b"bad\xffname.bad"))
