"""Trace headers cannot be forged through the session: what the client says in HELO is cleaned before it goes
into our Received header, so it cannot add a fake "by" clause or a header line of its own."""

from __future__ import annotations

import pytest

from tests.conftest import StartService, wait_until
from tests.security.helpers import connect, drops


@pytest.mark.parametrize(
    "helo",
    ["evil.test) by mx.trusted.test (", "evil.test;\x7fby mx.trusted.test", "(mx.trusted.test)"],
    ids=["parentheses", "del", "comment"],
)
async def test_a_forged_helo_cannot_add_a_by_clause_to_received(
    start_service: StartService, helo: str
) -> None:
    service = await start_service()
    client = await connect(service)
    ehlo = await client.command(f"EHLO {helo}")
    if not ehlo.startswith("250"):
        assert ehlo.startswith("500 5.5.2")  # refused outright is fine too
        await client.close()
        return
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: trace\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    [drop] = await wait_until(lambda: drops(service), what="delivery")
    header = drop.read_bytes().split(b"\r\nReceived: ", 1)[1].split(b"\r\nSubject:", 1)[0]
    unfolded = header.replace(b"\r\n\t", b" ")
    assert unfolded.count(b" by ") == 1
    assert b"by relay.test with ESMTP" in unfolded
    assert b"by mx.trusted.test" not in unfolded
    assert b"(mx.trusted.test)" not in unfolded
    await client.close()
