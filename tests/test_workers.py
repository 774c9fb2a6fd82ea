"""server.workers = 2: two worker processes accept SMTP on the same port (SO_REUSEPORT) and commit into the
shared queue; the main process, bound to the port but not listening, delivers; a SIGHUP to it reloads
every worker. Real processes, real sockets, a real sink."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from smtpsvc.cli import main
from smtpsvc.config import load_config, worker_count
from tests.conftest import base_sections, write_config
from tests.process import ServiceProcess
from tests.sink import Sink

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="SO_REUSEPORT: Linux")


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll until truthy (bounded; these tests drive real processes from plain threads)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[ServiceProcess]]:
    procs: list[ServiceProcess] = []
    yield procs
    for proc in procs:
        proc.kill()  # a worker whose main process is gone stops by itself (its socket pair closes)


def start(
    tmp_path: Path,
    procs: list[ServiceProcess],
    smart_host: str,
    server: dict[str, Any] | None = None,
    **delivery: Any,
) -> ServiceProcess:
    root = tmp_path / "mailroot"
    sections = base_sections(
        root,
        server={"workers": 2, **(server or {})},
        delivery={"smart_host": smart_host, **delivery},
        admin={"listen": "127.0.0.1:0"},
    )
    proc = ServiceProcess(write_config(tmp_path / "smtpsvc.toml", sections), root).start()
    procs.append(proc)
    return proc


def health(proc: ServiceProcess) -> dict[str, Any]:
    address = (proc.root / "admin.address").read_text().strip()
    with urllib.request.urlopen(f"http://{address}/healthz", timeout=10) as reply:
        data: dict[str, Any] = json.loads(reply.read())
        return data


def ready_workers(proc: ServiceProcess) -> list[dict[str, Any]]:
    return [w for w in health(proc)["workers"] if w["ready"]]


def send_one(port: int, seq: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail("load@local.test", ["r@remote.test"], f"Subject: m{seq}\r\nX-Seq: {seq}\r\n\r\nx\r\n")


def seqs(sink: Sink) -> list[str]:
    return sorted(m.content.split(b"X-Seq: ", 1)[1].split(b"\r\n", 1)[0].decode() for m in sink.messages)


def test_the_workers_accept_and_every_message_is_delivered_once(
    tmp_path: Path, sink: Sink, started: list[ServiceProcess]
) -> None:
    proc = start(tmp_path, started, f"[127.0.0.1]:{sink.port}")
    assert len(ready_workers(proc)) == 2  # the start is announced once both listen
    with ThreadPoolExecutor(6) as pool:  # one connection per message: the kernel spreads them
        list(pool.map(lambda seq: send_one(proc.port, seq), range(60)))
    wait_for(lambda: len(sink.messages) >= 60, "60 deliveries")
    assert seqs(sink) == sorted(str(n) for n in range(60))  # each exactly once
    workers = health(proc)["workers"]
    # The workers took all of them (the main process only holds the port), each a share (all 60 on one
    # listener: p = 2**-59).
    assert sum(w["messages"] for w in workers) == 60
    assert all(w["messages"] > 0 for w in workers)
    # server.delivery_nice is 0 by default: delivering keeps the workers' priority
    assert {nice_of(proc.pid), *(nice_of(w["pid"]) for w in workers)} == {nice_of(os.getpid())}
    assert proc.terminate() == 0
    pids = [w["pid"] for w in workers]
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), "the workers to stop with it")


def test_a_killed_worker_is_restarted_and_loses_nothing_acknowledged(
    tmp_path: Path, sink: Sink, started: list[ServiceProcess]
) -> None:
    proc = start(tmp_path, started, f"[127.0.0.1]:{sink.port}")
    worker, _ = ready_workers(proc)
    acked: list[int] = []
    with ThreadPoolExecutor(4) as pool:

        def attempt(seq: int) -> None:
            if seq == 20:
                os.kill(worker["pid"], signal.SIGKILL)  # mid-load
            try:
                send_one(proc.port, seq)
            except (smtplib.SMTPException, OSError):
                return  # cut by the kill: never acknowledged, the client would retry
            acked.append(seq)

        list(pool.map(attempt, range(60)))
    wait_for(lambda: set(map(str, acked)) <= set(seqs(sink)), "every acknowledged message delivered")
    wait_for(
        lambda: [w for w in ready_workers(proc) if w["slot"] == worker["slot"] and w["pid"] != worker["pid"]],
        "a new worker listening in the killed one's slot",
    )
    log = (proc.root / "log" / "events.jsonl").read_text()
    assert '"cause":"worker-exit"' in log
    send_one(proc.port, 1000)  # and the service goes on taking mail
    wait_for(lambda: "1000" in seqs(sink), "delivery after the restart")


def test_etrn_is_answered_the_same_by_either_process(tmp_path: Path, started: list[ServiceProcess]) -> None:
    proc = start(tmp_path, started, "[127.0.0.1]:9", retry=["1h"])  # nothing listens: the mail waits
    assert len(ready_workers(proc)) == 2
    send_one(proc.port, 1)
    wait_for(lambda: health(proc)["queue"] == 1, "the message queued")
    answers = set()
    for _ in range(12):  # separate connections, so both workers answer some
        with smtplib.SMTP("127.0.0.1", proc.port, timeout=30) as smtp:
            smtp.ehlo("client.test")
            answers.add(smtp.docmd("ETRN", "remote.test")[0])
            answers.add(smtp.docmd("ETRN", "nothing-here.test")[0])
    assert answers == {250, 251}


def nice_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[16])  # field 19 of proc(5), "nice"


def test_delivery_runs_below_the_workers_priority_and_a_restarted_worker_keeps_the_workers(
    tmp_path: Path, sink: Sink, started: list[ServiceProcess]
) -> None:
    proc = start(tmp_path, started, f"[127.0.0.1]:{sink.port}", server={"delivery_nice": 10})
    main_pid = proc.pid
    workers = ready_workers(proc)
    assert nice_of(main_pid) == min(19, nice_of(os.getpid()) + 10)
    assert [nice_of(w["pid"]) for w in workers] == [nice_of(os.getpid())] * 2
    # A worker started after the main process lowered its own priority still gets the workers' one:
    # it is forked from a thread that kept it.
    os.kill(workers[0]["pid"], signal.SIGKILL)
    [restarted] = wait_for(
        lambda: [
            w
            for w in ready_workers(proc)
            if w["slot"] == workers[0]["slot"] and w["pid"] != workers[0]["pid"]
        ],
        "a new worker in the killed one's slot",
    )
    assert nice_of(restarted["pid"]) == nice_of(os.getpid())
    send_one(proc.port, 1)
    wait_for(lambda: seqs(sink) == ["1"], "the delivery")
    assert proc.terminate() == 0


def reconfigure(
    proc: ServiceProcess, smart_host: str, server: dict[str, Any] | None = None, **more: Any
) -> None:
    """Rewrite the configuration `start` wrote, with `server` keys and more sections (then SIGHUP)."""
    sections = base_sections(
        proc.root,
        server={"workers": 2, **(server or {})},
        delivery={"smart_host": smart_host},
        admin={"listen": "127.0.0.1:0"},
        **more,
    )
    write_config(proc.config_file, sections)


def workers_that_logged(proc: ServiceProcess, cause: str) -> set[int]:
    """The pids of the workers that logged event 9002 with this cause ("SMTP worker <pid>: ...")."""
    pids = set()
    for line in (proc.root / "log" / "events.jsonl").read_text().splitlines():
        record = json.loads(line)
        if (
            record["id"] == 9002
            and record.get("cause") == cause
            and record["text"].startswith("SMTP worker ")
        ):
            pids.add(int(record["text"].split()[2].rstrip(":")))
    return pids


def reload_workers(proc: ServiceProcess, cause: str) -> list[dict[str, Any]]:
    """SIGHUP to the main process; returns once every worker has logged its reload (or its failure)."""
    workers = ready_workers(proc)
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(
        lambda: {w["pid"] for w in workers} <= workers_that_logged(proc, cause), f"every worker's {cause}"
    )
    return workers


def second_recipient_reply(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.mail("alice@local.test")
        assert smtp.rcpt("a@local.test")[0] == 250
        return smtp.rcpt("b@local.test")[0]


def test_a_reload_reaches_the_sessions_of_every_worker(tmp_path: Path, started: list[ServiceProcess]) -> None:
    proc = start(tmp_path, started, "[127.0.0.1]:9", retry=["1h"])
    assert second_recipient_reply(proc.port) == 250
    reconfigure(proc, "[127.0.0.1]:9", server={"max_recipients": 1})
    reload_workers(proc, "config-reload")
    assert [second_recipient_reply(proc.port) for _ in range(8)] == [452] * 8


def greeting_code(port: int) -> int:
    """The banner's code: 220, or the 554 of connection control (smtplib raises it at connect)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            return smtp.noop()[0] and 220
    except smtplib.SMTPConnectError as refused:
        return refused.smtp_code


def test_a_reload_reaches_the_connection_control_of_every_worker(
    tmp_path: Path, started: list[ServiceProcess]
) -> None:
    proc = start(tmp_path, started, "[127.0.0.1]:9", retry=["1h"])
    assert greeting_code(proc.port) == 220
    reconfigure(proc, "[127.0.0.1]:9", connection={"deny": ["127.0.0.1"]})
    reload_workers(proc, "config-reload")
    assert [greeting_code(proc.port) for _ in range(8)] == [554] * 8


def test_a_reload_reaches_the_ingest_of_every_worker(tmp_path: Path, started: list[ServiceProcess]) -> None:
    proc = start(tmp_path, started, "")  # no smart host: mail to remote.test goes by MX
    for link in ("remote.test", "smarthost"):  # nothing is delivered: each keeps the route its ingest chose
        freeze = CliRunner().invoke(main, ["queue", "freeze", "--link", link, "-c", str(proc.config_file)])
        assert freeze.exit_code == 0, freeze.output
    reconfigure(proc, "[127.0.0.1]:9")
    reload_workers(proc, "config-reload")
    for seq in range(40):  # until each worker has taken a message
        send_one(proc.port, seq)
        if all(w["messages"] for w in health(proc)["workers"]):
            break
    assert all(w["messages"] for w in health(proc)["workers"])
    envelopes = wait_for(
        lambda: [json.loads(p.read_text()) for p in (proc.root / "queue").glob("*.env")], "the queued mail"
    )
    assert {r["route"] for e in envelopes for r in e["recipients"]} == {"smarthost"}


def test_a_worker_whose_reload_fails_keeps_its_configuration(
    tmp_path: Path, started: list[ServiceProcess]
) -> None:
    proc = start(tmp_path, started, "[127.0.0.1]:9", retry=["1h"])
    users = tmp_path / "users.toml"
    users.write_text("not an accounts file\n")
    reconfigure(proc, "[127.0.0.1]:9", server={"max_recipients": 1}, auth={"users_file": str(users)})
    reload_workers(proc, "config-reload-failed")
    assert [second_recipient_reply(proc.port) for _ in range(8)] == [250] * 8

    def failures() -> list[dict[str, Any]]:
        log = (proc.root / "log" / "events.jsonl").read_text().splitlines()
        return [e for e in map(json.loads, log) if e.get("cause") == "config-reload-failed"]

    wait_for(lambda: len(failures()) == 3, "the main process's failure too (its log is flushed every second)")
    assert {e["level"] for e in failures()} == {"error"}


def test_auto_starts_one_worker_per_usable_core(
    tmp_path: Path, sink: Sink, started: list[ServiceProcess]
) -> None:
    """`server.workers = "auto"`: as many SMTP processes as `worker_count` decides for this machine (one per
    core it may use); on a one-core machine that is the main process alone."""
    root = tmp_path / "mailroot"
    sections = base_sections(
        root,
        server={"workers": "auto"},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
        admin={"listen": "127.0.0.1:0"},
    )
    config_file = write_config(tmp_path / "smtpsvc.toml", sections)
    expected = worker_count(load_config(config_file))
    assert expected == min(len(os.sched_getaffinity(0)), 64)
    proc = ServiceProcess(config_file, root).start()
    started.append(proc)
    assert len(ready_workers(proc)) == (expected if expected > 1 else 0)
    send_one(proc.port, 1)
    wait_for(lambda: len(sink.messages) == 1, "the delivery")
    assert proc.terminate() == 0
