"""Connection floods: many simultaneous clients are all served a banner; past `max_connections` the next
client is turned away with 421 4.7.0 (and the ones already in keep working)."""

from __future__ import annotations

import asyncio

from tests.conftest import StartService, smtp_port, wait_events
from tests.rawclient import RawClient
from tests.security.helpers import session_gone


async def banner(port: int) -> tuple[RawClient, str]:
    client = await RawClient.connect(port)
    return client, await client.reply(timeout=30)


async def test_500_concurrent_connections_all_get_the_220_banner(start_service: StartService) -> None:
    service = await start_service()
    port = smtp_port(service)
    results = await asyncio.wait_for(asyncio.gather(*(banner(port) for _ in range(500))), 45)
    try:
        assert [reply for _, reply in results] == ["220 relay.test smtpsvc ESMTP ready"] * 500
        assert service.smtp.active_sessions == 500
        # Still answering commands while all of them are open.
        client = results[-1][0]
        assert (await client.command("EHLO flood.test")).startswith("250-relay.test")
    finally:
        await asyncio.gather(*(client.close() for client, _ in results))
    await session_gone(service)


async def test_the_connection_past_max_connections_gets_421_and_the_others_keep_working(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_connections": 50})
    port = smtp_port(service)
    results = await asyncio.wait_for(asyncio.gather(*(banner(port) for _ in range(50))), 30)
    try:
        assert all(reply.startswith("220 ") for _, reply in results)
        extra, reply = await banner(port)
        assert reply.startswith("421 4.7.0")
        assert await extra.closed()
        assert (await results[0][0].command("NOOP")) == "250 2.0.0 OK"
        assert len(await wait_events(service, 402)) == 1
    finally:
        await asyncio.gather(*(client.close() for client, _ in results))
    await session_gone(service)
    again, reply = await banner(port)  # the limit frees up when the sessions end
    assert reply.startswith("220 ")
    await again.close()


async def test_a_pipelined_flood_of_commands_is_answered_in_order_without_loss(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_errors": 10_000})
    client = await RawClient.connect(smtp_port(service))
    assert (await client.reply()).startswith("220")
    count = 5000

    async def write() -> None:
        await client.send(b"EHLO flood.test\r\n" + b"NOOP\r\nXYZZY\r\n" * (count // 2))

    writer = asyncio.ensure_future(write())  # the server must read while the client is not reading
    try:
        assert (await client.reply()).startswith("250-relay.test")
        replies = [await client.reply() for _ in range(count)]
        assert replies == ["250 2.0.0 OK", "500 5.5.1 Unrecognized command"] * (count // 2)
        await asyncio.wait_for(writer, 10)
    finally:
        writer.cancel()
    assert await client.command("QUIT") == "221 2.0.0 relay.test Service closing transmission channel"
    await client.close()
