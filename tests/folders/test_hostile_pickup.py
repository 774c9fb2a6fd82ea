"""Hostile Pickup files against the running service: a name that is not UTF-8, CR-only line ends, a line
longer than SMTP allows. Each bad file goes to Badmail once, with the right reason, and Pickup goes on."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpsvc.app import Service
from tests.conftest import StartService, base_sections, events_of, wait_until, write_config
from tests.process import ServiceProcess

GOOD = b"X-Sender: app@local.test\r\nX-Receiver: <ops@local.test>\r\nFrom: app@local.test\r\n\r\nhello\r\n"


def drop_files(service: Service) -> list[Path]:
    return sorted(service.folders["drop"].glob("*.eml"))


def badmail(service: Service, suffix: str) -> list[Path]:
    return sorted(service.folders["badmail"].glob(f"*{suffix}"))


def write_named(folder: Path, name: bytes, content: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), name), "wb") as fh:
        fh.write(content)


def every_event_line_is_utf8_json(service: Service) -> bool:
    service.events.flush()
    raw = (service.folders["log"] / "events.jsonl").read_bytes()
    return all(json.loads(line.decode("utf-8")) for line in raw.splitlines())


async def test_a_file_whose_name_is_not_utf8_goes_to_badmail_whole_and_pickup_goes_on(
    start_service: StartService,
) -> None:
    service = await start_service()
    write_named(service.folders["pickup"], b"bad\xffname.eml", b"x\r\n")
    [bad] = await wait_until(lambda: badmail(service, ".bad"), what="the Badmail item")
    assert bad.name == "pickup-bad_name.bad" and bad.read_bytes() == b"x\r\n"
    bdr = bad.with_suffix(".bdr").read_text(encoding="utf-8")
    assert "Pickup file bad\\xffname.eml: the file has no message headers: line 1 is not a header" in bdr
    assert json.loads(bad.with_suffix(".bdp").read_text())["pickup_file"] == "bad\\xffname.eml"
    [written] = await wait_until(lambda: events_of(service, 3005), what="event 3005")
    assert "bad\\xffname.eml" in written["text"] and "no message headers" in written["text"]
    assert not os.listdir(os.fsencode(service.folders["pickup"] / ".claimed"))
    (service.folders["pickup"] / "later.eml").write_bytes(GOOD)
    await wait_until(lambda: drop_files(service), what="a later file delivered")
    assert every_event_line_is_utf8_json(service)


async def test_a_bad_file_left_claimed_by_a_crash_goes_to_badmail_once_and_later_files_are_picked_up(
    start_service: StartService,
) -> None:
    service = await start_service()
    root = service.root
    await service.stop()
    claimed = root / "pickup" / ".claimed"
    write_named(claimed, b"left\xfe\x01name.eml", b"x\r\n")  # as the service before this fix left it
    (root / "pickup" / "later.eml").write_bytes(GOOD)
    again = await start_service(server={"root": str(root)})
    await wait_until(lambda: drop_files(again), what="the later file delivered")
    [bad] = await wait_until(lambda: badmail(again, ".bad"), what="the Badmail item")  # written last
    assert "left\\xfe\\x01name.eml" in bad.with_suffix(".bdr").read_text(encoding="utf-8")
    await again.stop()
    third = await start_service(server={"root": str(root)})
    (root / "pickup" / "after-restart.eml").write_bytes(GOOD)
    await wait_until(lambda: len(drop_files(third)) == 2, what="a file after the restart delivered")
    assert len(badmail(third, ".bdr")) == 1 and len(badmail(third, ".bad")) == 1  # no orphan .bdr per restart
    assert not os.listdir(os.fsencode(claimed))
    assert every_event_line_is_utf8_json(third)


async def test_a_file_with_cr_only_line_ends_and_envelope_lines_is_delivered(
    start_service: StartService,
) -> None:
    service = await start_service()
    (service.folders["pickup"] / "mac.eml").write_bytes(GOOD.replace(b"\r\n", b"\r"))
    [dropped] = await wait_until(lambda: drop_files(service), what="the message delivered")
    data = dropped.read_bytes()
    assert data.startswith(b"X-Sender: <app@local.test>\r\nX-Receiver: <ops@local.test>\r\n")
    assert data.endswith(b"From: app@local.test\r\n\r\nhello\r\n")
    assert not badmail(service, ".bad")


async def test_a_100_kb_header_line_goes_to_badmail_naming_the_line_and_the_limit(
    start_service: StartService,
) -> None:
    service = await start_service()
    long_header = GOOD.replace(b"\r\n\r\n", b"\r\nSubject: " + b"s" * 100_000 + b"\r\n\r\n")
    (service.folders["pickup"] / "long.eml").write_bytes(long_header)
    [bad] = await wait_until(lambda: badmail(service, ".bad"), what="the Badmail item")  # written last
    text = bad.with_suffix(".bdr").read_text(encoding="utf-8")
    assert "line 4 of the file is longer than 1000 octets" in text and "RFC 5321 section 4.5.3.1.6" in text
    assert bad.read_bytes() == long_header
    (service.folders["pickup"] / "later.eml").write_bytes(GOOD)
    await wait_until(lambda: drop_files(service), what="a later file delivered")
    assert len(drop_files(service)) == 1


NOBODY = 65534


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A folder the user nobody owns, outside pytest's tmp (mode 0700, closed to other users)."""
    folder = Path(tempfile.mkdtemp(prefix="smtpsvc-nobody-"))
    os.chown(folder, NOBODY, NOBODY)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def test_a_file_the_service_may_not_read_goes_to_badmail_once_as_it_is(nobody_dir: Path) -> None:
    """The service runs as nobody (as under systemd's User=); an application drops a file only root may
    read. It cannot be copied, so it is moved into Badmail whole, once, instead of being retried forever."""
    root = nobody_dir / "mailroot"
    config = write_config(nobody_dir / "smtpsvc.toml", base_sections(root))
    as_nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    service = ServiceProcess(config, root, prefix=as_nobody).start()
    try:
        secret = root / "pickup" / "secret.eml"
        secret.write_bytes(GOOD)
        secret.chmod(0o600)  # root's own file: nobody may not read it
        # The .bad comes last: once it is there, the item is whole.
        [bad] = await wait_until(lambda: sorted((root / "badmail").glob("*.bad")), what="the Badmail item")
        assert bad.name == "pickup-secret.bad" and bad.read_bytes() == GOOD  # moved as it was
        text = bad.with_suffix(".bdr").read_text()
        assert "Pickup file secret.eml: the file cannot be opened: Permission denied" in text
        (root / "pickup" / "later.eml").write_bytes(GOOD)
        (root / "pickup" / "later.eml").chmod(0o644)
        await wait_until(lambda: list((root / "drop").glob("*.eml")), what="a later file delivered")
    finally:
        assert service.terminate() == 0
    lines = (root / "log" / "events.jsonl").read_text().splitlines()
    about_secret = [e for e in map(json.loads, lines) if "secret.eml" in e["text"]]
    assert [e["id"] for e in about_secret] == [3005]  # once: no "will retry" every second
    assert "Traceback" not in service.stderr_text()
