"""A client that vanishes in the middle of a message (FIN or RST) leaves nothing queued and nothing behind in
queue/tmp: only a completed end of data is ever acknowledged."""

from __future__ import annotations

import pytest

from tests.conftest import StartService
from tests.rawclient import RawClient
from tests.security.helpers import greeted, nothing_queued, session_gone

PARTIAL = [
    b"Subject: half\r\n\r\nhalf a message",
    b"Subject: almost\r\n\r\nall but the last two octets\r\n.",  # the end of data cut short
    b"Subject: almost\r\n\r\nall but the CR LF\r\n",
]


async def hang_up(client: RawClient, how: str) -> None:
    if how == "reset":
        client.writer.transport.abort()  # RST: no orderly close
    else:
        await client.close()


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("partial", PARTIAL, ids=["mid-body", "before-LF", "before-dot"])
async def test_a_connection_dropped_mid_data_queues_nothing(
    start_service: StartService, how: str, partial: bytes
) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(partial)
    await hang_up(client, how)
    await session_gone(service)
    assert nothing_queued(service)


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_connection_dropped_mid_bdat_queues_nothing(start_service: StartService, how: str) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    await client.send(b"BDAT 20\r\nSubject: bdat\r\n\r\nx\r\n")
    assert (await client.reply()).startswith("250 2.0.0 20 octets")
    await client.send(b"BDAT 1000 LAST\r\n" + b"y" * 500)  # half of the last chunk
    await hang_up(client, how)
    await session_gone(service)
    assert nothing_queued(service)
