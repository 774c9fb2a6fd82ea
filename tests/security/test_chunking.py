"""CHUNKING (RFC 3030): BDAT content is taken as exact octet counts, so binary content with an end-of-data
sequence or commands inside is delivered byte for byte; a refused BDAT still has its octets consumed, so
they are never run as commands."""

from __future__ import annotations

from tests.conftest import StartService, wait_until
from tests.security.helpers import drops, greeted, nothing_queued
from tests.sink import Sink

HEADER = b"Subject: binary\r\nContent-Type: application/octet-stream\r\n\r\n"
BINARY = bytes(range(256)) * 4 + b"\r\n.\r\nQUIT\r\nRSET\r\n\n.\n\r.\r\x00" + bytes(range(255, -1, -1))


async def test_bdat_binarymime_content_is_delivered_byte_for_byte(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    message = HEADER + BINARY
    assert (await client.command("MAIL FROM:<a@local.test> BODY=BINARYMIME")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    await client.send(f"BDAT {len(message)} LAST\r\n".encode() + message)
    assert (await client.reply()).startswith("250 2.6.0")
    assert await client.command("NOOP") == "250 2.0.0 OK"  # nothing in the content ran as a command
    [drop] = await wait_until(lambda: drops(service), what="delivery")
    assert drop.read_bytes().endswith(b"\r\n" + message)
    await client.close()


async def test_pipelined_bdat_chunks_are_answered_in_order_and_joined_exactly(
    start_service: StartService,
) -> None:
    service = await start_service()
    client = await greeted(service)
    chunks = [HEADER, BINARY[:100], BINARY[100:1030], BINARY[1030:]]  # one split inside the "\r\n.\r\n"
    wire = b"MAIL FROM:<a@local.test> BODY=BINARYMIME\r\nRCPT TO:<b@local.test>\r\n"
    for n, chunk in enumerate(chunks):
        last = " LAST" if n == len(chunks) - 1 else ""
        wire += f"BDAT {len(chunk)}{last}\r\n".encode() + chunk
    await client.send(wire + b"QUIT\r\n")  # all in one write
    assert (await client.reply()).startswith("250 2.1.0")
    assert (await client.reply()).startswith("250 2.1.5")
    for chunk in chunks[:-1]:
        assert await client.reply() == f"250 2.0.0 {len(chunk)} octets received"
    assert (await client.reply()).startswith("250 2.6.0")
    assert (await client.reply()).startswith("221 2.0.0")
    [drop] = await wait_until(lambda: drops(service), what="delivery")
    assert drop.read_bytes().endswith(b"\r\n" + b"".join(chunks))


async def test_bdat_without_a_transaction_gets_503_and_its_octets_are_consumed(
    start_service: StartService,
) -> None:
    service = await start_service()
    client = await greeted(service)
    payload = b"QUIT\r\nMAIL FROM:<evil@x.test>\r\n"  # looks like commands: must be swallowed as data
    await client.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload + b"NOOP\r\n")
    assert (await client.reply()).startswith("503 5.5.1")
    assert await client.reply() == "250 2.0.0 OK"  # the NOOP after the octets, not a 221 or a 250 2.1.0
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250 2.1.0")  # no MAIL was open
    assert nothing_queued(service)
    await client.close()


async def test_bdat_after_refused_recipients_is_refused_and_drained(start_service: StartService) -> None:
    service = await start_service(relay={"allow": []})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    payload = b"RCPT TO:<y@remote.test>\r\n"
    await client.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload + b"NOOP\r\n")
    assert (await client.reply()).startswith("554 5.5.1")
    assert await client.reply() == "250 2.0.0 OK"
    assert nothing_queued(service)
    await client.close()


async def test_data_with_body_binarymime_is_refused(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test> BODY=BINARYMIME")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("503 5.5.1")
    await client.close()


async def test_binary_content_relayed_to_a_peer_without_chunking_smuggles_nothing(
    sink: Sink, start_service: StartService
) -> None:
    # The sink (aiosmtpd) offers neither CHUNKING nor BINARYMIME: the message must be converted, dot-stuffed
    # or bounced, but never let the "\r\n.\r\n" inside end the DATA at the next hop.
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    client = await greeted(service)
    smuggle = b"\r\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@remote.test>\r\nDATA\r\nforged\r\n"
    message = HEADER + BINARY + smuggle
    assert (await client.command("MAIL FROM:<a@local.test> BODY=BINARYMIME")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    await client.send(f"BDAT {len(message)} LAST\r\n".encode() + message)
    assert (await client.reply()).startswith("250 2.6.0")
    await wait_until(
        lambda: not service.queue.list() and (sink.messages or drops(service)), what="relay or bounce"
    )
    assert "victim@remote.test" not in sink.handler.rcpt_attempts
    assert len(sink.messages) <= 1
    await client.close()
