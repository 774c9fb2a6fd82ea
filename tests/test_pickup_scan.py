"""The Pickup scanner: a file still being written waits until it settles; claimed files survive a crash."""

from __future__ import annotations

import os
import time

from smtpsvc.folders.pickup import PickupScanner
from tests.conftest import StartService, wait_until


async def test_file_still_being_written_is_left_for_a_later_scan(start_service: StartService) -> None:
    service = await start_service()
    # A scanner of its own on a folder the service does not watch: this test drives scan() by hand.
    folder = service.root / "pickup-under-test"
    folder.mkdir()
    scanner = PickupScanner(folder, service.folders["badmail"], service.ingest, service.live, service.events)
    scanner.open()
    path = folder / "growing.eml"
    path.write_bytes(b"X-Receiver: <b@local.test>\r\nFrom: a@local.test\r\n")
    assert await scanner.scan() == 0  # first sight of a fresh file: wait
    with open(path, "ab") as fh:
        fh.write(b"Subject: more\r\n")
    assert await scanner.scan() == 0  # it changed since the last scan: still being written
    with open(path, "ab") as fh:
        fh.write(b"\r\nbody\r\n")
    stamp = time.time() - 60
    os.utime(path, (stamp, stamp))  # untouched for a minute now: settled
    assert await scanner.scan() == 1
    assert not path.exists()
    await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="delivery")


async def test_a_file_claimed_before_a_crash_is_submitted_at_the_next_start(
    start_service: StartService,
) -> None:
    service = await start_service()
    root = service.root
    await service.stop()
    claimed = root / "pickup" / ".claimed"
    (claimed / "left.eml").write_bytes(b"X-Receiver: <b@local.test>\r\nFrom: a@local.test\r\n\r\nx\r\n")
    again = await start_service(server={"root": str(root)})
    await wait_until(lambda: list(again.folders["drop"].glob("*.eml")), what="the claimed file delivered")
    assert not (claimed / "left.eml").exists()
