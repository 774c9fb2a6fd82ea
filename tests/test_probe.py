"""`smtpsvc probe`: against our own service (with a trustme certificate) and a minimal old server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import trustme

from smtpsvc.admin.probe import probe
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
