"""The service as a real process: kill -9 under load loses nothing acknowledged; big messages stream."""

from __future__ import annotations

import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_sections, write_config
from tests.process import ServiceProcess
from tests.sink import Sink

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def body_for(seq: int) -> bytes:
    line = f"message {seq:06d} ".encode() + b"x" * 60 + b"\r\n"
    return (
        f"From: load@local.test\r\nTo: r@remote.test\r\nX-Seq: {seq}\r\nSubject: load {seq}\r\n\r\n".encode()
        + line * 300
        + b"end of message\r\n"
    )


@pytest.fixture
def service_process(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    yield started
    for proc in started:
        proc.kill()


@pytest.mark.parametrize("workers", [1, 2])
def test_kill_9_under_load_loses_no_acknowledged_message(
    tmp_path: Path, sink: Sink, service_process: list[ServiceProcess], workers: int
) -> None:
    # With workers, only the main process is killed: its SMTP workers notice and finish the transactions
    # under way (acknowledging them) while the next main process starts and recovers the same queue.
    root = tmp_path / "mailroot"
    sections = base_sections(
        root, server={"workers": workers}, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"}
    )
    config = write_config(tmp_path / "smtpsvc.toml", sections)
    first = ServiceProcess(config, root).start()
    service_process.append(first)
    acked: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(1_000_000))

    def client() -> None:
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", first.port, timeout=10) as smtp:
                    while not stop.is_set():
                        with lock:
                            seq = next(counter)
                        smtp.sendmail("load@local.test", ["r@remote.test"], body_for(seq))
                        with lock:
                            acked.add(seq)  # only after the 250
            except (OSError, smtplib.SMTPException):
                if stop.wait(0.05):
                    return

    threads = [threading.Thread(target=client, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 150 and time.monotonic() < deadline:
        time.sleep(0.01)
    first.kill()  # SIGKILL while 8 clients are mid-transaction
    if workers > 1:  # the next start while the old workers still take mail
        second = ServiceProcess(config, root).start()
        service_process.append(second)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 150, "the load never got going"
    if workers == 1:
        second = ServiceProcess(config, root).start()
        service_process.append(second)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        delivered = {int(m.content.split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0]) for m in list(sink.messages)}
        if acked <= delivered:
            break
        time.sleep(0.1)
    missing = acked - delivered
    assert not missing, f"{len(missing)} acknowledged messages were lost: {sorted(missing)[:10]}"
    for message in list(sink.messages):
        seq = int(message.content.split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0])
        assert message.content.endswith(body_for(seq)), f"message {seq} was delivered partially"
    # kill -9 keeps the page cache: a commit it cut off is settled at the start, never "corrupt"
    assert list((root / "queue" / "corrupt").iterdir()) == []
    assert list((root / "queue").glob("*.pending")) == []
    assert second.terminate() == 0


def test_ten_megabyte_message_streams_with_bounded_memory(
    tmp_path: Path, service_process: list[ServiceProcess]
) -> None:
    root = tmp_path / "mailroot"
    config = write_config(
        tmp_path / "smtpsvc.toml",
        base_sections(root, server={"max_message_size": "64MB", "max_session_size": "64MB"}),
    )
    proc = ServiceProcess(config, root).start()
    service_process.append(proc)
    small = b"From: a@local.test\r\nTo: b@local.test\r\n\r\nwarm up\r\n"
    big = b"From: a@local.test\r\nTo: b@local.test\r\n\r\n" + (b"y" * 998 + b"\r\n") * (
        10 * 1024 * 1024 // 1000
    )
    with smtplib.SMTP("127.0.0.1", proc.port, timeout=60) as smtp:
        smtp.sendmail("a@local.test", ["b@local.test"], small)
        _wait_for_drop(root, 1)
        before = proc.peak_rss_kib()
        smtp.sendmail("a@local.test", ["b@local.test"], big)
    drops = _wait_for_drop(root, 2)
    grown = proc.peak_rss_kib() - before
    assert grown < 8 * 1024, f"peak memory grew by {grown} KiB for a {len(big) // 1024} KiB message"
    assert max(p.stat().st_size for p in drops) > len(big)
    assert proc.terminate() == 0


def _wait_for_drop(root: Path, count: int, timeout: float = 60) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list((root / "drop").glob("*.eml"))
        if len(files) >= count:
            return files
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} drop files after {timeout}s")


def test_sigterm_with_an_idle_client_says_421_and_exits_cleanly(
    tmp_path: Path, service_process: list[ServiceProcess]
) -> None:
    root = tmp_path / "mailroot"
    config = write_config(tmp_path / "smtpsvc.toml", base_sections(root))
    proc = ServiceProcess(config, root).start()
    service_process.append(proc)
    with socket.create_connection(("127.0.0.1", proc.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        assert proc.terminate() == 0
        assert reader.readline().startswith(b"421 4.3.2")
    stderr = proc.stderr_text()
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr


def test_systemd_notify_ready_then_stopping(
    tmp_path: Path, service_process: list[ServiceProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.settimeout(30)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))  # as systemd sets it for Type=notify
    root = tmp_path / "mailroot"
    proc = ServiceProcess(write_config(tmp_path / "smtpsvc.toml", base_sections(root)), root).start()
    service_process.append(proc)
    try:
        ready = listener.recv(4096).decode()
        assert ready.startswith("READY=1") and f"127.0.0.1:{proc.port}" in ready
        assert proc.terminate() == 0
        assert listener.recv(4096).decode() == "STOPPING=1"
    finally:
        listener.close()
