"""Slow clients (slow-loris): an idle session is cut after `connection_timeout`, a DATA or BDAT transfer that
does not complete within `data_timeout` is cut too, however steadily the client trickles bytes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.conftest import StartService
from tests.rawclient import RawClient
from tests.security.helpers import greeted, nothing_queued, session_gone


async def trickle_until_answered(client: RawClient, data: bytes, limit: float) -> tuple[str, float]:
    """Send one byte every 100 ms (never finishing) until the server answers; (reply, seconds taken)."""
    start = time.monotonic()
    answer = asyncio.ensure_future(client.reply(timeout=limit))
    for byte in data:
        if answer.done() or time.monotonic() - start > limit:
            break
        try:
            await client.send(bytes([byte]))
        except (ConnectionError, OSError):
            break
        await asyncio.sleep(0.1)  # the trickle itself, not a wait for a condition
    reply = await answer
    return reply, time.monotonic() - start


async def test_an_idle_session_is_closed_with_421_after_connection_timeout(
    start_service: StartService,
) -> None:
    service = await start_service(server={"connection_timeout": "1s"})
    client = await greeted(service)
    start = time.monotonic()
    assert (await client.reply(timeout=10)).startswith("421 4.4.2")
    assert 0.8 <= time.monotonic() - start < 8
    assert await client.closed()


async def test_a_silent_client_after_connect_is_closed_too(start_service: StartService) -> None:
    service = await start_service(server={"connection_timeout": "1s"})
    client = await RawClient.connect(service.smtp.sockets[0][1])
    assert (await client.reply()).startswith("220")
    assert (await client.reply(timeout=10)).startswith("421 4.4.2")
    assert await client.closed()


@pytest.mark.parametrize("verb", ["DATA", "BDAT"])
async def test_a_transfer_trickled_slower_than_data_timeout_is_cut_with_421(
    start_service: StartService, verb: str
) -> None:
    service = await start_service(server={"connection_timeout": "30s", "data_timeout": "2s"})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    if verb == "DATA":
        assert (await client.command("DATA")).startswith("354")
    else:
        await client.send(b"BDAT 100000 LAST\r\n")
    reply, took = await trickle_until_answered(client, b"Subject: slow\r\n\r\n" + b"z" * 200, limit=15)
    assert reply.startswith("421 4.4.2")
    assert 1.5 <= took < 10
    assert await client.closed()
    await session_gone(service)
    assert nothing_queued(service)


async def test_a_client_stalling_inside_an_auth_exchange_is_cut_with_421(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(
        server={"connection_timeout": "1s"}, auth={"users_file": str(users_file), "require_tls": False}
    )
    client = await greeted(service)
    assert await client.command("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert (await client.reply(timeout=10)).startswith("421 4.4.2")  # never sends the user name
    assert await client.closed()
