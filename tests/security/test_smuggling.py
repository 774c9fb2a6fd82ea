"""SMTP smuggling: a bare CR or LF around a "." never ends the data, so no second message can be smuggled in,
neither here nor at the next hop we relay to."""

from __future__ import annotations

import pytest

from tests.conftest import StartService, wait_until
from tests.security.helpers import drops, greeted
from tests.sink import Sink

VARIANTS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r\n.\n"]
IDS = ["LF.LF", "CR.CR", "LF.CRLF", "CRLF.CR", "CRLF.LF"]
SMUGGLED = (
    b"MAIL FROM:<x@local.test>\r\nRCPT TO:<y@local.test>\r\nDATA\r\n"
    b"Subject: smuggled\r\n\r\nsmuggled body\r\n"
)


def payload(variant: bytes) -> bytes:
    return b"Subject: s\r\n\r\nbefore" + variant + SMUGGLED + b".\r\n"


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
async def test_smuggled_end_of_data_does_not_queue_a_second_message(
    start_service: StartService, variant: bytes
) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(payload(variant))
    assert (await client.reply()).startswith("250 2.6.0")
    # A server that ended the data early would now owe replies to the smuggled MAIL/RCPT/DATA/end of data.
    assert await client.command("NOOP") == "250 2.0.0 OK"
    await wait_until(lambda: drops(service) and not service.queue.list(), what="delivery")
    [drop] = drops(service)
    data = drop.read_bytes()
    assert b"X-Receiver: <b@local.test>\r\n" in data
    assert b"<y@local.test>\r\nDATA" in data  # the smuggled commands are content of the one message
    assert b"X-Receiver: <y@local.test>" not in data
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body.replace(b"\r\n", b"").count(b"\r") == 0  # no bare CR left for a next hop to misread
    assert body.replace(b"\r\n", b"").count(b"\n") == 0  # nor a bare LF
    await client.close()


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
async def test_smuggled_end_of_data_relayed_onward_stays_one_message_at_the_next_hop(
    sink: Sink, start_service: StartService, variant: bytes
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@remote.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(payload(variant))
    assert (await client.reply()).startswith("250 2.6.0")
    await wait_until(lambda: sink.messages and not service.queue.list(), what="relay to the sink")
    [message] = sink.messages
    assert message.rcpt_tos == ["b@remote.test"]
    assert b"<y@local.test>\r\nDATA\r\nSubject: smuggled" in message.content
    assert sink.handler.rcpt_attempts == ["b@remote.test"]  # the sink never saw the smuggled RCPT
    await client.close()
