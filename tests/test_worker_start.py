"""An SMTP worker starts cheaply: `python -m smtpsvc serve --worker-fd N` goes to the worker's own entry
(`workers.worker_main`), not to the command line, and loads only what receiving needs. The main process
starts one worker per core at each start of the service (and the tests start hundreds of services)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtpsvc.workers import WorkerArgs, parse_worker_args, worker_command
from tests.conftest import StartService, events_of, smtp_port, wait_until
from tests.dnsserver import DnsServer
from tests.rawclient import RawClient
from tests.test_reload import reconfigure, workers_reloaded
from tests.test_session import send_after_ehlo, transact

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="SO_REUSEPORT: Linux")

TWO = {"workers": 2}

# What the command line's imports brought into every worker before it had its own entry (measured: about
# 0.3 s of CPU each): the command line and click; the admin, delivery, DSN, Pickup/Badmail, import and
# token layers; httpx and cryptography (admin and delivery); dnspython and idna (routing.mx, which a
# worker needs only for `server.reverse_dns`). And the admin web stack, which nothing in a worker may load.
NOT_IN_A_WORKER = (
    "smtpsvc.cli",
    "smtpsvc.app",
    "smtpsvc.admin",
    "smtpsvc.delivery",
    "smtpsvc.dsn",
    "smtpsvc.folders",
    "smtpsvc.migrate",
    "smtpsvc.tokens",
    "smtpsvc.oauth",
    "smtpsvc.routing.mx",
    "click",
    "httpx",
    "cryptography",
    "dns",
    "idna",
    "uvicorn",
    "starlette",
    "jinja2",
    "dkim",
)


def imported(stderr: str) -> set[str]:
    """The modules named by `-X importtime` lines (PYTHONPROFILEIMPORTTIME) in a process's stderr."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in NOT_IN_A_WORKER))


async def test_a_worker_loads_neither_the_command_line_nor_the_admin_delivery_or_dns_libraries(
    start_service: StartService, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The workers inherit the environment and this test's stderr: each writes what it imports, from its
    # start through a whole SMTP session (a module a session imports late is seen too).
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    service = await start_service(server=TWO)
    pool = service.workers
    assert pool is not None
    await wait_until(lambda: len([w for w in pool.status() if w["ready"]]) == 2, what="both workers ready")
    for _ in range(4):  # the kernel spreads connections over both workers
        client = await RawClient.connect(smtp_port(service))
        await client.reply()
        await client.command("EHLO client.test")
        assert (
            await transact(client, "a@local.test", "b@local.test", b"Subject: s\r\n\r\nx\r\n")
        ).startswith("250")
        await client.command("QUIT")
        await client.close()
    names = imported(capfd.readouterr().err)
    # The check itself works: the workers' imports were seen, through their own entry.
    assert {"smtpsvc.workers", "smtpsvc.server.session", "smtpsvc.cmdconfig"} <= names
    assert forbidden(names) == []


def test_the_worker_reads_back_the_command_the_main_process_starts_it_with(tmp_path: Path) -> None:
    args = worker_command(7, tmp_path, "conf/smtpsvc.toml", [("127.0.0.1", 2525), ("::1", 25)])
    assert args[:5] == [sys.executable, "-m", "smtpsvc", "serve", "--worker-fd"]
    assert parse_worker_args(args[4:]) == WorkerArgs(
        7, str(tmp_path), "conf/smtpsvc.toml", ("127.0.0.1:2525", "[::1]:25")
    )
    assert parse_worker_args(worker_command(3, tmp_path, None, [])[4:]) == WorkerArgs(3, str(tmp_path))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--worker-fd=5", "--config=a.toml", "--root=/m"], WorkerArgs(5, "/m", "a.toml")),
        (["--worker-fd", "5", "-c", "a.toml", "-c", "b.toml"], WorkerArgs(5, None, "b.toml")),  # the last
        (
            ["--listen", "0.0.0.0:25", "--worker-fd", "9", "--listen=[::]:25"],
            WorkerArgs(9, None, None, ("0.0.0.0:25", "[::]:25")),
        ),
    ],
)
def test_the_workers_options_are_read_as_the_command_line_reads_them(
    args: list[str], expected: WorkerArgs
) -> None:
    assert parse_worker_args(args) == expected


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--worker-fd", "5", "--verbose"], "no such option for an SMTP worker: --verbose"),
        (["--worker-fd", "5", "--root"], "option --root requires a value"),
        (["--root", "/m"], "--worker-fd requires a number"),
        (["--worker-fd", "five"], "--worker-fd requires a number"),
    ],
)
def test_a_worker_command_that_cannot_be_read_names_the_problem(args: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_worker_args(args)


def run_worker_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpsvc", "serve", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_a_worker_whose_configuration_is_broken_exits_2_with_the_message_as_serve_would(
    tmp_path: Path,
) -> None:
    broken = tmp_path / "smtpsvc.toml"
    broken.write_text("[server]\nmax_recipients = -1\n")
    worker = run_worker_command(["--worker-fd", "99", "-c", str(broken)], tmp_path)
    serve = run_worker_command(["-c", str(broken)], tmp_path)  # the command line, before it serves
    assert (worker.returncode, serve.returncode) == (2, 2)
    assert "server.max_recipients" in worker.stderr and worker.stderr == serve.stderr
    assert "Traceback" not in worker.stderr


def test_a_worker_started_with_an_unknown_option_exits_2_and_says_which(tmp_path: Path) -> None:
    worker = run_worker_command(["--worker-fd", "99", "--verbose"], tmp_path)
    assert worker.returncode == 2
    assert worker.stderr == "smtpsvc serve: no such option for an SMTP worker: --verbose\n"


async def test_reverse_dns_turned_on_by_a_reload_works_in_a_worker_that_started_without_dns(
    start_service: StartService, dns_server: DnsServer
) -> None:
    dns_server.add_ptr("127.0.0.1", "client.test")
    nameservers = {"nameservers": [dns_server.nameserver]}
    service = await start_service(server=TWO, resolver=nameservers)
    reconfigure(service, server={**TWO, "reverse_dns": True}, resolver=nameservers)
    service.reload()
    await workers_reloaded(service)
    # On whichever worker takes each connection, its resolver made at its first question: the PTR confirms
    # one name (so the lookup was made) and not the other (so the check is on).
    expected = {
        "client.test": b"Received: from client.test ([127.0.0.1])\r\n",
        "liar.test": b"Received: from liar.test ([127.0.0.1] unverified)\r\n",
    }
    for helo in [*expected] * 3:
        assert (await send_after_ehlo(service, helo, b"Subject: r\r\n\r\nx\r\n")).startswith("250")

    def received() -> list[bytes]:
        files = [p.read_bytes() for p in service.folders["drop"].glob("*.eml")]
        return sorted(line for line in expected.values() for f in files if line in f)

    await wait_until(lambda: len(received()) == 6, what="the six messages in drop/")
    assert received() == sorted([*expected.values()] * 3)
    assert not [e for e in events_of(service, 9002) if e.get("cause") == "config-reload-failed"]
