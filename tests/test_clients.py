"""Independent SMTP clients against our server: smtplib, aiosmtplib (in test_relay) and swaks, pipelined."""

from __future__ import annotations

import asyncio
import os
import shutil
import smtplib

import pytest

from tests.conftest import StartService, smtp_port, wait_until


def require_swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("swaks is missing: .ci/run installs it (apt-get install swaks)")
        pytest.skip("swaks is not installed here; .ci/run installs it")
    return path


async def test_swaks_with_pipelining_delivers_to_drop(start_service: StartService) -> None:
    swaks = require_swaks()
    service = await start_service()
    proc = await asyncio.create_subprocess_exec(
        swaks,
        "--server",
        "127.0.0.1",
        "--port",
        str(smtp_port(service)),
        "--pipeline",
        "--from",
        "scanner@local.test",
        "--to",
        "ops@local.test,dba@local.test",
        "--header",
        "Subject: scan",
        "--body",
        "page 1\n.dot line\n",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, output.decode()
    assert b"250 2.6.0" in output
    [drop] = await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="delivery")
    data = drop.read_bytes()
    assert data.startswith(
        b"X-Sender: <scanner@local.test>\r\nX-Receiver: <ops@local.test>\r\nX-Receiver: <dba@local.test>\r\n"
    )
    assert b"\r\n.dot line\r\n" in data


async def test_smtplib_send_message_with_8bit_body(start_service: StartService) -> None:
    service = await start_service()
    body = (
        "Subject: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\u00efve r\u00e9sum\u00e9\r\n"
    )

    def submit() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", smtp_port(service), timeout=30) as client:
            return client.sendmail(
                "a@local.test", ["b@local.test"], body.encode("utf-8"), mail_options=["BODY=8BITMIME"]
            )

    assert await asyncio.to_thread(submit) == {}
    [drop] = await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="delivery")
    assert drop.read_bytes().endswith(body.encode("utf-8"))
