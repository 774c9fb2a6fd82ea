"""An independent client, swaks, doing what a real mail client does: STARTTLS against our trustme
certificate (verified), AUTH PLAIN, and relaying a message for a client that is not in relay.allow."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.conftest import StartService, smtp_port, wait_until
from tests.security.conftest import Tls
from tests.security.helpers import PASSWORD, USER
from tests.sink import Sink

SWAKS = shutil.which("swaks")
pytestmark = pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")


async def test_swaks_with_starttls_and_auth_plain_relays_a_message(
    sink: Sink, start_service: StartService, tls: Tls, users_file: Path
) -> None:
    assert SWAKS is not None
    service = await start_service(
        tls=tls.section,
        auth={"users_file": str(users_file)},
        relay={"allow": []},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
    )
    proc = await asyncio.create_subprocess_exec(
        SWAKS,
        "--server", f"127.0.0.1:{smtp_port(service)}",
        "--ehlo", "client.test",
        "--tls", "--tls-verify", "--tls-ca-path", str(tls.ca_pem), "--tls-sni", "relay.test",
        "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
        "--from", "a@local.test", "--to", "x@remote.test",
        "--header", "Subject: swaks",
        "--body", "sent by swaks",
        "--timeout", "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    transcript = out.decode(errors="replace")
    assert proc.returncode == 0, transcript
    assert "235 2.7.0" in transcript
    await wait_until(lambda: sink.messages, what="relay to the sink")
    [message] = sink.messages
    assert message.rcpt_tos == ["x@remote.test"]
    assert b"sent by swaks" in message.content
