"""Resource limits: recipients, declared and actual size, command and text line length. Each limit gets its
reply, nothing over the limit is queued (queue and queue/tmp stay empty), and the session goes on."""

from __future__ import annotations

import pytest

from tests.conftest import StartService
from tests.rawclient import RawClient
from tests.security.helpers import greeted, nothing_queued


async def open_data(client: RawClient) -> None:
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")


async def test_recipients_past_max_recipients_get_452(start_service: StartService) -> None:
    service = await start_service(server={"max_recipients": 3})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    for n in range(3):
        assert (await client.command(f"RCPT TO:<r{n}@local.test>")).startswith("250 2.1.5")
    assert (await client.command("RCPT TO:<r3@local.test>")).startswith("452 4.5.3")
    assert (await client.command("RCPT TO:<r4@local.test>")).startswith("452 4.5.3")
    await client.close()


async def test_declared_size_over_the_limit_is_refused_at_mail_with_552(start_service: StartService) -> None:
    service = await start_service(server={"max_message_size": 10_000})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test> SIZE=10001")).startswith("552 5.3.4")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("503 5.5.1")  # no transaction
    assert (await client.command("MAIL FROM:<a@local.test> SIZE=10000")).startswith("250")
    assert nothing_queued(service)
    await client.close()


async def test_actual_size_over_the_limit_is_refused_after_data_with_552(start_service: StartService) -> None:
    service = await start_service(server={"max_message_size": 10_000})
    client = await greeted(service)
    await open_data(client)
    await client.send(b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 200 + b".\r\n")  # ~20 KB
    assert (await client.reply()).startswith("552 5.3.4")
    assert nothing_queued(service)
    assert await client.command("NOOP") == "250 2.0.0 OK"
    await client.close()


async def test_a_message_that_lied_about_its_size_is_still_refused(start_service: StartService) -> None:
    service = await start_service(server={"max_message_size": 10_000})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test> SIZE=100")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 200 + b".\r\n")
    assert (await client.reply()).startswith("552 5.3.4")
    assert nothing_queued(service)
    await client.close()


@pytest.mark.parametrize("octets", [513, 100_000], ids=["513", "100k"])
async def test_an_over_long_command_line_gets_500_and_the_session_continues(
    start_service: StartService, octets: int
) -> None:
    service = await start_service()
    client = await greeted(service)
    await client.send(b"NOOP " + b"x" * (octets - 7) + b"\r\n")  # `octets` including CRLF
    assert (await client.reply()).startswith("500 5.5.2")
    assert await client.command("NOOP") == "250 2.0.0 OK"
    await client.close()


async def test_a_command_line_of_exactly_512_octets_is_accepted(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    await client.send(b"NOOP " + b"x" * (512 - 7) + b"\r\n")
    assert await client.reply() == "250 2.0.0 OK"
    await client.close()


async def test_an_over_long_line_does_not_leak_into_the_next_command(start_service: StartService) -> None:
    # The tail of an over-long line must be drained, never parsed: here the tail is a QUIT.
    service = await start_service()
    client = await greeted(service)
    await client.send(b"NOOP " + b"x" * 600 + b" QUIT\r\nNOOP\r\n")
    assert (await client.reply()).startswith("500 5.5.2")
    assert await client.reply() == "250 2.0.0 OK"
    await client.close()


async def test_an_over_long_data_line_gets_500_after_the_end_of_data_and_nothing_is_queued(
    start_service: StartService,
) -> None:
    service = await start_service()
    client = await greeted(service)
    await open_data(client)
    await client.send(b"Subject: long\r\n\r\n" + b"y" * 999 + b"\r\nshort line\r\n")  # 1001 octets with CRLF
    await client.send(b".\r\n")
    assert (await client.reply()).startswith("500 5.5.2")
    assert nothing_queued(service)
    assert await client.command("NOOP") == "250 2.0.0 OK"
    await client.close()


async def test_a_data_line_of_exactly_1000_octets_is_accepted(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    await open_data(client)
    await client.send(b"Subject: long\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    await client.close()


async def test_four_megabytes_without_a_line_end_are_drained_then_refused(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_message_size": 50_000_000})
    client = await greeted(service)
    await open_data(client)
    for _ in range(64):
        await client.send(b"w" * 65536)
    await client.send(b"\r\n.\r\n")
    assert (await client.reply(timeout=20)).startswith("500 5.5.2")
    assert nothing_queued(service)
    await client.close()


async def test_a_looping_message_is_refused_with_554_in_session_and_not_queued(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_hop_count": 5})
    client = await greeted(service)
    await open_data(client)
    await client.send(b"Received: from hop\r\n" * 6 + b"Subject: loop\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("554 5.4.6")
    assert nothing_queued(service)
    await client.close()


async def test_bdat_chunks_over_the_size_limit_are_drained_and_refused_with_552(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_message_size": 10_000})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    await client.send(b"BDAT 6000\r\n" + b"a" * 6000 + b"BDAT 6000 LAST\r\n" + b"b" * 6000 + b"NOOP\r\n")
    assert (await client.reply()).startswith("250 2.0.0 6000 octets")
    assert (await client.reply()).startswith("552 5.3.4")
    assert await client.reply() == "250 2.0.0 OK"  # the octets were drained, not read as commands
    assert nothing_queued(service)
    await client.close()
