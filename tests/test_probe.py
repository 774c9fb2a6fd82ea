"""`smtpsvc probe`: against our own service (with a trustme certificate) and a minimal old server."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from smtpsvc.admin.probe import TargetError, probe, split_target
from tests.conftest import StartService, smtp_port
from tests.test_delivery import ScriptedServer


async def test_probe_lists_keywords_and_checks_starttls(start_service: StartService, tmp_path: Path) -> None:
    ca = trustme.CA()
    pem = tmp_path / "cert.pem"
    ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    service = await start_service(tls={"cert": str(pem), "key": str(pem)})
    report = await probe("127.0.0.1", smtp_port(service), hostname="probe.test", starttls=True)
    text = "\n".join(report.lines)
    assert "220 relay.test smtpsvc ESMTP ready" in text
    assert "PIPELINING" in text and "STARTTLS" in text and "TLS:      TLSv1." in text
    # the test CA is not a system CA: a required-TLS route would refuse this certificate, and says why
    assert any("would not pass" in p for p in report.problems)


async def test_probe_names_what_an_old_server_lacks() -> None:
    old = ScriptedServer(ehlo=b"250-old.test\r\n250 SIZE 1000\r\n")
    await old.start()
    try:
        report = await probe("127.0.0.1", old.port, hostname="probe.test", xexch50_expected=True)
    finally:
        await old.stop()
    problems = "\n".join(report.problems)
    assert "8BITMIME missing" in problems and "KB286673" in problems
    assert "XEXCH50 missing" in problems and "PIPELINING missing" in problems


async def test_probe_of_a_server_refusing_ehlo_says_so() -> None:
    old = ScriptedServer(ehlo=None)
    await old.start()
    try:
        report = await asyncio.wait_for(probe("127.0.0.1", old.port, hostname="probe.test"), 30)
    finally:
        await old.stop()
    assert any("EHLO is refused" in p for p in report.problems)


async def test_probe_exchange_finds_no_problem_with_smtpsvc_as_an_exchange_peer(
    start_service: StartService, tmp_path: Path
) -> None:
    # KB279616's telnet check, anonymous as the administrator's telnet is: both verbs must be listed
    service = await start_service(extensions={"xexch50": True, "x_link2state": True})
    config = tmp_path / "probe.toml"
    config.write_text('[server]\nhostname = "probe.test"\n')
    argv = [sys.executable, "-m", "smtpsvc", "probe", "-c", str(config)]
    argv += [f"127.0.0.1:{smtp_port(service)}", "--exchange"]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "          XEXCH50\n" in done.stdout and "          X-LINK2STATE\n" in done.stdout
    assert done.stdout.rstrip().endswith("no problems found"), done.stdout
    assert "problem:" not in done.stdout and done.stderr == ""


async def test_probe_exchange_names_each_missing_exchange_verb(start_service: StartService) -> None:
    service = await start_service(extensions={"xexch50": True})  # X-LINK2STATE off
    report = await probe("127.0.0.1", smtp_port(service), hostname="probe.test", xexch50_expected=True)
    assert [p for p in report.problems if "missing" in p] == [
        "X-LINK2STATE missing: this is not an Exchange 2000/2003 transport, or it offers X-LINK2STATE only "
        "after AUTH (KB279616's telnet check)"
    ]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("mail.contoso.test", ("mail.contoso.test", None)),
        ("mail.contoso.test:25", ("mail.contoso.test", 25)),
        ("192.0.2.1:2525", ("192.0.2.1", 2525)),
        ("[::1]:2525", ("::1", 2525)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("2001:db8::25", ("2001:db8::25", None)),
        ("[2001:db8::25]:587", ("2001:db8::25", 587)),
        ("[192.0.2.1]:25", ("192.0.2.1", 25)),
        ("host:1", ("host", 1)),
        ("host:65535", ("host", 65535)),
        (" host:25 ", ("host", 25)),
    ],
)
def test_split_target_reads_host_and_port(target: str, expected: tuple[str, int | None]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("127.0.0.1:99999", "the port must be a number from 1 to 65535, not 99999"),
        ("host:0", "the port must be a number from 1 to 65535, not 0"),
        ("host:smtp", "the port must be a number from 1 to 65535"),
        ("host:", "the port must be a number from 1 to 65535"),
        ("host:-1", "the port must be a number from 1 to 65535"),
        ("host:\u0662\u0665", "the port must be a number from 1 to 65535"),  # Arabic-Indic digits
        ("[::1]:99999", "the port must be a number from 1 to 65535, not 99999"),
        ("[::1]:", "the port must be a number from 1 to 65535"),
        ("[::1", "an IPv6 address with a port is written [ADDRESS]:PORT"),
        ("[::1]2525", "an IPv6 address with a port is written [ADDRESS]:PORT"),
        (":25", "no host name or address"),
        ("[]:25", "no host name or address"),
        ("", "no host name or address"),
    ],
)
def test_split_target_refuses_what_cannot_be_used(target: str, message: str) -> None:
    with pytest.raises(TargetError) as caught:
        split_target(target)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def run_probe_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "probe.toml"
    config.write_text('[server]\nhostname = "probe.test"\n')
    argv = [sys.executable, "-m", "smtpsvc", "probe", "-c", str(config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_probe_with_a_port_out_of_range_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    done = run_probe_cli(tmp_path, "127.0.0.1:99999")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "smtpsvc probe: '127.0.0.1:99999': the port must be a number from 1 to 65535, not 99999\n"
    )


def test_probe_of_a_bracketed_ipv6_address_connects_to_it(tmp_path: Path) -> None:
    # Port 1 on ::1: nothing listens (or there is no IPv6 here); either way the address and port were parsed
    done = run_probe_cli(tmp_path, "[::1]:1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.startswith("smtpsvc probe: cannot connect to [::1]:1: ")
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
