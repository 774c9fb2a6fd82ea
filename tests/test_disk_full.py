"""A full disk (issue 14): the real service on a small tmpfs mailroot, filled with a ballast file.

Clients get 452 4.3.1; the service starts and stops on the full disk (exit 0, no traceback); what could not
be written (delivery results, a full Drop folder) is retried within seconds of the ballast going, not on the
5-minute internal-error schedule nor the 10-minute retry schedule these tests configure; no half-written
file is left in queue/tmp; the event log counts what it could not write and says so once it can.

Mounting a tmpfs needs root: these tests run as root here and in CI, and fail (never skip) otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from smtpsvc import events
from smtpsvc.events import EventLog, read_events
from smtpsvc.model import Envelope, Recipient
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.local import LocalSpool
from tests.conftest import base_sections, write_config
from tests.rawclient import RawClient
from tests.sink import Sink

DISK_SIZE = "16m"
SOON = 10.0  # "within seconds": the retry schedule here is 10 minutes, the internal-error one 5
MESSAGE = b"From: a@sender.test\r\nTo: b@local.test\r\nSubject: disk full\r\n\r\nhello\r\n"


def mount_small_disk(path: Path, options: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={DISK_SIZE}" + (f",{options}" if options else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)


def unmount(path: Path) -> None:
    for _ in range(50):  # a process that just exited may hold it a moment
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.fixture
def small_disks(tmp_path: Path) -> Iterator[list[Path]]:
    """Mount points of small tmpfs file systems the test mounts (`mount_small_disk`); unmounted after it."""
    mounted: list[Path] = []
    yield mounted
    for path in reversed(mounted):
        unmount(path)


def small_disk(disks: list[Path], path: Path, options: str = "") -> Path:
    mount_small_disk(path, options)
    disks.append(path)
    return path


def fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte with a ballast file; returns it."""
    ballast = folder / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as full:
        (folder / "probe").write_bytes(b"x" * 8192)
    assert full.value.errno == errno.ENOSPC
    return ballast


class Smtpsvc:
    """`smtpsvc serve` as a child process; its stderr (where every event also goes) kept in a file. The
    ports are read from stderr: on a full disk the event log file may not take the start event."""

    def __init__(self, config: Path, stderr: Path) -> None:
        self.config = config
        self.stderr_path = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0
        self.offset = 0  # where this run's lines begin in the stderr file (runs share it)

    def start(self, timeout: float = 60.0) -> Smtpsvc:
        self.offset = offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtpsvc", "serve", "-c", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stderr()[offset:]
            match = re.search(r" 9002 smtpsvc started; .*listening on 127\.0\.0\.1:(\d+)(.*)", text)
            if match:
                self.port = int(match.group(1))
                admin = re.search(r"admin API on http://127\.0\.0\.1:(\d+)/", match.group(2))
                self.admin_port = int(admin.group(1)) if admin else 0
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"smtpsvc exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise AssertionError(f"smtpsvc did not start:\n{self.stderr()[offset:]}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of `pattern` in what this run wrote to stderr."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.stderr()[self.offset :])
            if match:
                return match
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in the service's stderr:\n{self.stderr()}")

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                raise AssertionError("smtpsvc did not stop within 60 s of SIGTERM") from None
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def services(small_disks: list[Path]) -> Iterator[list[Smtpsvc]]:
    """Every service a test starts, killed at its end if still running (before its disks are unmounted)."""
    started: list[Smtpsvc] = []
    yield started
    for service in started:
        service.kill()


def wait(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Poll `predicate()` until truthy; returns the seconds it took. Bounded, never a fixed sleep."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def drop_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "drop").iterdir() if p.suffix == ".eml" and not p.name.startswith("."))


def queued(root: Path) -> list[Path]:
    return sorted((root / "queue").glob("*.env"))


def assert_clean(service: Smtpsvc) -> None:
    """No traceback, nor any line that is not an event, in what the service wrote to stderr."""
    text = service.stderr()
    assert "Traceback" not in text, text
    stray = [
        line for line in text.splitlines() if not re.match(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00 \w+ \d+ ", line)
    ]
    assert not stray, text


# -- SMTP --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_smtp_clients_get_452_4_3_1_while_the_queue_disk_is_full(
    tmp_path: Path, small_disks: list[Path], services: list[Smtpsvc], workers: int
) -> None:
    root = small_disk(small_disks, tmp_path / "mailroot")
    sections = base_sections(root, server={"workers": workers}, delivery={"retry": ["10m"]})
    config = write_config(tmp_path / "smtpsvc.toml", sections)
    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    ballast = fill(root)

    big = MESSAGE + b"x" * 998 + b"\r\n" * 400  # past the 256 KiB kept in memory: streamed to queue/tmp
    with smtplib.SMTP("127.0.0.1", service.port, timeout=30) as smtp:
        for message in (MESSAGE, big):
            with pytest.raises(smtplib.SMTPDataError) as refused:
                smtp.sendmail("a@sender.test", ["b@local.test"], message)
            assert (refused.value.smtp_code, refused.value.smtp_error[:5]) == (452, b"4.3.1")
    client = await RawClient.connect(service.port)
    try:
        assert (await client.reply()).startswith("220")
        assert (await client.command("EHLO client.test")).startswith("250")
        assert (await client.command("MAIL FROM:<a@sender.test>")).startswith("250")
        assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
        await client.send(f"BDAT {len(MESSAGE)} LAST\r\n".encode() + MESSAGE)
        assert (await client.reply()).startswith("452 4.3.1")
    finally:
        await client.command("QUIT")
    service.wait_for(r" 9010 The disk is full: the queue cannot be written in ")
    # Nothing half-written left behind, and nothing queued.
    assert not list((root / "queue" / "tmp").iterdir())
    assert not list((root / "queue" / "incoming").iterdir())
    assert not queued(root)

    ballast.unlink()
    service.wait_for(r" 9011 Disk space is available again in ")
    with smtplib.SMTP("127.0.0.1", service.port, timeout=30) as smtp:
        smtp.sendmail("a@sender.test", ["b@local.test"], MESSAGE)
    wait(lambda: len(drop_files(root)) == 1, 30, "the message accepted after space returned")
    assert service.stop() == 0
    assert_clean(service)


# -- start, stop -------------------------------------------------------------------------------------------


def test_the_service_starts_and_stops_on_a_full_disk(
    tmp_path: Path, small_disks: list[Path], services: list[Smtpsvc]
) -> None:
    root = small_disk(small_disks, tmp_path / "mailroot")
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(root, admin={"listen": "127.0.0.1:0"}))
    first = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(first)
    assert first.stop() == 0
    token = (root / "admin.token").read_text()
    fill(root)

    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    # The admin token cannot be renewed: the previous run's stays in force (the CLI reads that file).
    service.wait_for(r" 9010 The admin token cannot be renewed in .*the previous run's token")
    assert (root / "admin.token").read_text() == token
    service.wait_for(r" 9010 The admin API's address cannot be written to .*admin\.address")
    with urllib.request.urlopen(f"http://127.0.0.1:{service.admin_port}/healthz", timeout=30) as reply:
        assert json.loads(reply.read())["status"] == "ok"
    with smtplib.SMTP("127.0.0.1", service.port, timeout=30) as smtp:  # answers, and says why it refuses
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("a@sender.test", ["b@local.test"], MESSAGE)
        assert refused.value.smtp_code == 452
    assert service.stop() == 0
    assert " 9003 smtpsvc stopped" in service.stderr()
    assert_clean(service)


def test_the_service_starts_when_no_file_can_be_made(
    tmp_path: Path, small_disks: list[Path], services: list[Smtpsvc]
) -> None:
    root = small_disk(small_disks, tmp_path / "mailroot", "nr_inodes=256")
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(root, admin={"listen": "127.0.0.1:0"}))
    first = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(first)
    assert first.stop() == 0
    with contextlib.suppress(OSError):  # use up the inodes: not even an empty file can be made
        for n in range(1000):
            (root / f"inode{n}").touch()

    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    service.wait_for(r" 9010 The disk is full: the start's write test cannot be written in .*starts anyway")
    service.wait_for(r" 9010 The admin token cannot be renewed in ")
    with smtplib.SMTP("127.0.0.1", service.port, timeout=30) as smtp:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            smtp.sendmail("a@sender.test", ["b@local.test"], MESSAGE)
        assert refused.value.smtp_code == 452
    (root / "inode0").unlink()
    for n in range(1, 40):  # room for a message: its files, and the temporary ones
        (root / f"inode{n}").unlink()
    service.wait_for(r" 9011 Disk space is available again in ")
    with smtplib.SMTP("127.0.0.1", service.port, timeout=30) as smtp:
        smtp.sendmail("a@sender.test", ["b@local.test"], MESSAGE)
    wait(lambda: len(drop_files(root)) == 1, SOON, "the message delivered")
    assert service.stop() == 0
    assert_clean(service)


# -- delivery ----------------------------------------------------------------------------------------------


def test_results_that_could_not_be_saved_are_delivered_within_seconds_of_space_returning(
    tmp_path: Path, small_disks: list[Path], services: list[Smtpsvc], sink: Sink
) -> None:
    root = small_disk(small_disks, tmp_path / "mailroot")
    # First run: no local domain, and the smart host defers everything: the messages stay queued.
    sink.handler.defer_everything = True
    waiting = write_config(
        tmp_path / "waiting.toml",
        base_sections(
            root,
            domains={"local": []},
            delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["1s"]},
        ),
    )
    first = Smtpsvc(waiting, tmp_path / "stderr.txt").start()
    services.append(first)
    count = 5
    with smtplib.SMTP("127.0.0.1", first.port, timeout=30) as smtp:
        for _ in range(count):
            smtp.sendmail("a@sender.test", ["b@local.test"], MESSAGE)
    wait(lambda: len(sink.handler.rcpt_attempts) >= count, 30, "a first, deferred attempt of each")
    assert first.stop() == 0
    assert len(queued(root)) == count

    # Then local.test is local (Drop, on the same disk), the disk is full, and the retry schedule long.
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(root, delivery={"retry": ["10m"]}))
    ballast = fill(root)
    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    service.wait_for(r" 9010 The disk is full: the Drop folder cannot be written in ")
    assert not drop_files(root)
    assert not [p for p in (root / "queue" / "tmp").iterdir()], "a failed save left a file in queue/tmp"

    # A stop and a start on the full disk lose nothing: the messages are still queued, and tried again.
    assert service.stop() == 0
    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    service.wait_for(r" 9010 The disk is full: the Drop folder cannot be written in ")
    assert len(queued(root)) == count

    ballast.unlink()
    took = wait(lambda: len(drop_files(root)) == count, SOON, "every message in the Drop folder")
    wait(lambda: not queued(root), SOON, "an empty queue")
    assert took < SOON
    service.wait_for(r" 9011 Disk space is available again in ")
    assert service.stop() == 0
    assert_clean(service)
    assert "internal-error" not in service.stderr()


def test_a_full_drop_folder_is_retried_within_seconds_of_space_returning(
    tmp_path: Path, small_disks: list[Path], services: list[Smtpsvc]
) -> None:
    root = tmp_path / "mailroot"
    drop = small_disk(small_disks, root / "drop")  # the Drop folder alone is full; the queue has room
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(root, delivery={"retry": ["10m"]}))
    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    ballast = fill(drop)
    count = 3
    with smtplib.SMTP("127.0.0.1", service.port, timeout=30) as smtp:
        for _ in range(count):
            smtp.sendmail("a@sender.test", ["b@local.test"], MESSAGE)
    service.wait_for(r" 9010 The disk is full: the Drop folder cannot be written in ")
    wait(lambda: len(queued(root)) == count, 30, "the deferred messages saved")
    assert not drop_files(root)

    ballast.unlink()
    took = wait(lambda: len(drop_files(root)) == count, SOON, "every message in the Drop folder")
    assert took < SOON
    wait(lambda: not queued(root), SOON, "an empty queue")
    assert service.stop() == 0
    assert_clean(service)


# -- Pickup ------------------------------------------------------------------------------------------------


def test_a_pickup_file_waits_in_pickup_while_the_disk_is_full(
    tmp_path: Path, small_disks: list[Path], services: list[Smtpsvc]
) -> None:
    root = small_disk(small_disks, tmp_path / "mailroot")
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(root, delivery={"retry": ["10m"]}))
    first = Smtpsvc(config, tmp_path / "stderr.txt").start()  # the mailroot is made while there is room
    services.append(first)
    assert first.stop() == 0
    names = ("one.eml", "two.eml", "three.eml")
    for name in names:
        (root / "pickup" / name).write_bytes(
            b"X-Sender: a@sender.test\r\nX-Receiver: b@local.test\r\n" + MESSAGE
        )
    ballast = fill(root)
    service = Smtpsvc(config, tmp_path / "stderr.txt").start()
    services.append(service)
    service.wait_for(r" 9004 Pickup file one\.eml: cannot queue it: .*; will retry")
    first = root / "pickup" / "one.eml"

    def ctime() -> int | None:  # each try claims the file and renames it back: a new ctime
        try:
            return first.stat().st_ctime_ns
        except FileNotFoundError:
            return None  # claimed at this moment

    for _ in range(2):  # two more tries while the disk is full
        wait(lambda: ctime() is not None, SOON, "one.eml back in pickup/")
        before = ctime()
        wait(lambda before=before: ctime() not in (None, before), SOON, "one.eml tried again")  # type: ignore[misc]
    assert not queued(root)
    # One event for the episode, and the other files were not tried each second (one file per scan).
    assert len(re.findall(r" 9004 Pickup file .*cannot queue it", service.stderr()[service.offset :])) == 1

    ballast.unlink()
    wait(lambda: len(drop_files(root)) == len(names), SOON, "the Pickup files delivered")
    assert not any((root / "pickup" / name).exists() for name in names)
    assert service.stop() == 0
    assert_clean(service)


# -- the parts, on a real full disk ------------------------------------------------------------------------


def test_the_event_log_counts_what_a_full_disk_refused_and_says_so_once_there_is_room(
    tmp_path: Path, small_disks: list[Path]
) -> None:
    disk = small_disk(small_disks, tmp_path / "disk")
    path = disk / "log" / "events.jsonl"
    log = EventLog(path, stream=None)
    log.emit(events.Event(events.SERVICE_STARTED, "before"))
    log.flush()
    ballast = fill(disk)
    lost = 3000  # more than the last page of the file can take
    for n in range(lost):
        log.emit(events.Event(events.MESSAGE_QUEUED, f"while full {n:05d}" + "x" * 100))
    log.flush()  # refused; nothing raised
    ballast.unlink()
    log.emit(events.Event(events.SERVICE_STOPPED, "after"))
    log.close()

    records = read_events(path)
    texts = [r["text"] for r in records]
    assert texts[0] == "before" and texts[-1] == "after"
    [notice] = [r for r in records if r.get("cause") == "events-not-written"]
    written = sum(1 for t in texts if t.startswith("while full"))
    assert notice["id"] == events.DISK_SPACE_AVAILABLE
    assert notice["text"].startswith(f"{lost - written} event(s) could not be written to {path}")
    assert "No space left on device" in notice["text"]
    # A line the full disk cut is alone on its line: it never swallows the next event.
    lines = path.read_bytes().split(b"\n")
    assert sum(1 for line in lines if line and not line.endswith(b"}")) <= 1


def test_the_event_log_starts_without_its_file_when_no_file_can_be_made(
    tmp_path: Path, small_disks: list[Path]
) -> None:
    disk = small_disk(small_disks, tmp_path / "disk", "nr_inodes=64")
    (disk / "log").mkdir()
    made = []
    with contextlib.suppress(OSError):  # use up the inodes: a new events.jsonl cannot be made
        for n in range(1000):
            (disk / f"inode{n}").touch()
            made.append(disk / f"inode{n}")
    path = disk / "log" / "events.jsonl"
    log = EventLog(path, stream=None)  # starts anyway
    log.emit(events.Event(events.SERVICE_STARTED, "started on a full disk"))
    log.emit(events.Event(events.MESSAGE_QUEUED, "queued on a full disk"))
    log.flush()  # nothing raised
    assert not path.exists()
    made[-1].unlink()
    log.emit(events.Event(events.SERVICE_STOPPED, "after"))
    log.close()
    texts = [r["text"] for r in read_events(path)]
    assert texts[0].startswith(f"2 event(s) could not be written to {path}")
    assert texts[1:] == ["after"]


async def test_a_save_that_finds_the_disk_full_leaves_no_file_and_says_full(
    tmp_path: Path, small_disks: list[Path]
) -> None:
    disk = small_disk(small_disks, tmp_path / "disk")
    spool = LocalSpool(disk / "queue")
    spool.open()
    try:
        writer = spool.create_writer()
        writer.write(MESSAGE)
        envelope = Envelope(writer.id, "a@sender.test", [Recipient("b@local.test")], time.time())
        await spool.put(writer, envelope)
        [leased] = spool.lease(time.time() + 1, 1)
        leased.recipients[0].last_reply = "y" * 100_000  # an envelope larger than any page left
        ballast = fill(disk)
        with pytest.raises(QueueError) as refused:
            await spool.save(leased)
        assert refused.value.full
        assert not list(spool.tmp_dir.iterdir())
        assert spool.unsaved == 1
        ballast.unlink()
        assert spool.space.check()  # room again: the held envelope is written
        await asyncio.wait_for(_written(spool), 30)
        assert json.loads((spool.dir / f"{envelope.id}.env").read_bytes())["recipients"][0]["last_reply"]
    finally:
        await spool.drain()
        spool.close()


async def _written(spool: LocalSpool) -> None:
    while spool.unsaved:  # noqa: ASYNC110 - the spool has no event to wait on for this; bounded by the caller
        await asyncio.sleep(0.05)
