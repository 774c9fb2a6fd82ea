"""Cross-protocol and garbage input: an HTTP request at the SMTP prompt closes the connection (a browser
cannot be used to drive the relay), and NUL or 8-bit bytes in a command get 500 without breaking the
session."""

from __future__ import annotations

import pytest

from tests.conftest import StartService
from tests.security.helpers import connect, greeted, nothing_queued

HTTP = [
    b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n",
    b"POST / HTTP/1.0\r\nContent-Length: 40\r\n\r\nMAIL FROM:<a@local.test>\r\nRCPT TO:<x>\r\n",
    b"CONNECT relay.test:25 HTTP/1.1\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", HTTP, ids=["GET", "POST", "CONNECT", "OPTIONS"])
async def test_an_http_request_at_the_prompt_closes_the_connection(
    start_service: StartService, request_bytes: bytes
) -> None:
    service = await start_service()
    client = await connect(service)
    await client.send(request_bytes)
    assert (await client.reply()).startswith("421")
    assert await client.closed()  # nothing after the request line was answered
    assert nothing_queued(service)


async def test_an_http_request_after_ehlo_closes_the_connection_too(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("POST /cgi-bin/x HTTP/1.0")).startswith("421")
    assert await client.closed()


BAD_LINES = [
    b"NOOP\x00",
    b"MAIL FROM:<a\x00b@local.test>",
    b"\x00\x00\x00\x00",
    b"EHLO caf\xc3\xa9.test",
    b"HELO \xff\xfe\xfd",
    b"\xde\xad\xbe\xef",
    b"MAIL FROM:<a@local.test>\rRCPT TO:<x@remote.test>",  # bare CR inside a line
    b"RSET\x1b[2J",
]


@pytest.mark.parametrize("line", BAD_LINES, ids=lambda b: b.hex()[:24])
async def test_nul_control_and_8bit_bytes_in_a_command_get_500_and_the_session_goes_on(
    start_service: StartService, line: bytes
) -> None:
    service = await start_service()
    client = await greeted(service)
    await client.send(line + b"\r\n")
    assert (await client.reply()).startswith("500 5.5")
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250 2.1.0")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250 2.1.5")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: still fine\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    await client.close()


async def test_a_stream_of_garbage_ends_in_421_after_max_errors(start_service: StartService) -> None:
    service = await start_service(server={"max_errors": 5})
    client = await greeted(service)
    await client.send(b"".join(b"\x00garbage %d\xff\r\n" % n for n in range(50)))
    replies = [await client.reply() for _ in range(5)]
    assert all(r.startswith("500") for r in replies[:4])
    assert replies[4].startswith("421 4.7.0")
    assert await client.closed()
