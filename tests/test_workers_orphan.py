"""server.workers = 2 and only the main process killed (kill -9): the workers notice, take no new
connections, finish the messages under way (each acknowledged), log one event each and exit 0 without a
traceback; the next start delivers every acknowledged message. Real processes, real sockets, a real sink.

The test process makes itself a child subreaper (prctl(2)) for the test's length, so the orphaned workers
become its children and their exit codes can be read."""

from __future__ import annotations

import ctypes
import json
import os
import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_sections, write_config
from tests.process import ServiceProcess
from tests.sink import Sink
from tests.test_workers import ready_workers, seqs, wait_for

PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


@pytest.fixture
def subreaper() -> Iterator[None]:
    set_subreaper(True)
    yield
    set_subreaper(False)


def exit_code(pid: int) -> int | None:
    """The exit code of an (adopted) child once it has exited, else None."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return os.waitstatus_to_exitcode(status) if done else None


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


def open_in_data(port: int, seq: int) -> smtplib.SMTP:
    """A client that has sent the message but not yet the final dot."""
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    smtp.ehlo("client.test")
    smtp.mail("load@local.test")
    smtp.rcpt("r@remote.test")
    assert smtp.docmd("DATA")[0] == 354
    smtp.send(f"Subject: m{seq}\r\nX-Seq: {seq}\r\n\r\nbody\r\n".encode())
    return smtp


def test_workers_whose_main_process_is_killed_finish_their_messages_and_exit_cleanly(
    tmp_path: Path, sink: Sink, subreaper: None
) -> None:
    root = tmp_path / "mailroot"
    sections = base_sections(
        root,
        server={"workers": 2},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
        admin={"listen": "127.0.0.1:0"},
    )
    config_file = write_config(tmp_path / "smtpsvc.toml", sections)
    proc = ServiceProcess(config_file, root).start()
    workers = [w["pid"] for w in ready_workers(proc)]
    assert len(workers) == 2
    clients = [open_in_data(proc.port, seq) for seq in range(8)]  # the kernel spreads them over both
    proc.kill()  # the main process only
    acknowledged = []
    for seq, smtp in enumerate(clients):
        smtp.send(b".\r\n")
        code, _ = smtp.getreply()
        if code == 250:
            acknowledged.append(str(seq))
        smtp.close()
    assert len(acknowledged) == 8  # what was under way is finished, not cut
    wait_for(lambda: refused(proc.port), "no new connections")
    codes: dict[int, int] = {}

    def exited() -> bool:
        for pid in workers:
            if pid not in codes and (code := exit_code(pid)) is not None:
                codes[pid] = code
        return len(codes) == len(workers)

    wait_for(exited, "both workers to exit")
    assert codes == dict.fromkeys(workers, 0)
    gone = [
        json.loads(line)
        for line in (root / "log" / "events.jsonl").read_text().splitlines()
        if '"main-process-gone"' in line
    ]
    assert sorted(int(e["text"].split()[2].rstrip(":")) for e in gone) == sorted(workers)  # one each
    assert all(e["id"] == 9003 and e["level"] == "warning" for e in gone)
    assert "Traceback" not in proc.stderr_text()
    # The next start finds and delivers every acknowledged message, once.
    again = ServiceProcess(config_file, root).start()
    try:
        wait_for(lambda: len(sink.messages) >= 8, "the acknowledged messages delivered after the restart")
        assert seqs(sink) == sorted(acknowledged)
        assert again.terminate() == 0
    finally:
        again.kill()
