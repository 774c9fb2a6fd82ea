"""Self-healing against misbehaving peers (SPEC 2.9): a peer that chokes on EHLO gets HELO, a peer that
drops 8-bit data gets 7-bit MIME, on the next attempt, with event 3010 naming the cause."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from smtpsvc.delivery.healing import PEER_LACKS_8BITMIME, PeerMemory
from tests.conftest import StartService, events_of, wait_until
from tests.peers import LoopbackPeer
from tests.test_relay import send


class Misbehaving(LoopbackPeer):
    """A peer that drops the connection on EHLO, or advertises 8BITMIME but drops on 8-bit data."""

    def __init__(self, drop_on_ehlo: bool = False, drop_on_8bit: bool = False) -> None:
        super().__init__()
        self.drop_on_ehlo = drop_on_ehlo
        self.reject_ehlo = False  # an old server: "500 unrecognized command", then HELO works
        self.connections = 0
        self.drop_on_8bit = drop_on_8bit
        self.drop_on_body_param = False  # an Exchange 5.5 IMS that closes on "MAIL FROM:<...> BODY=8BITMIME"

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 picky.test ready\r\n")
        self.connections += 1
        while line := await reader.readline():
            verb = line.decode(errors="replace").split(" ", 1)[0].strip().upper()
            self.commands.append(verb)
            if verb == "MAIL" and self.drop_on_body_param and b"BODY=8BITMIME" in line.upper():
                break
            if verb == "EHLO" and self.reject_ehlo:
                writer.write(b"500 5.5.1 Command unrecognized\r\n")
            elif verb == "EHLO":
                if self.drop_on_ehlo:
                    break  # like a firewall that does not know EHLO
                writer.write(b"250-picky.test\r\n250 8BITMIME\r\n")
            elif verb == "DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                data = await reader.readuntil(b"\r\n.\r\n")
                if self.drop_on_8bit and max(data) > 127:
                    break  # the KB286673 failure: Exchange 5.5 dropped the connection
                self.messages.append(data)
                writer.write(b"250 ok\r\n")
            elif verb == "QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def peer() -> AsyncIterator[Misbehaving]:
    server = Misbehaving()
    await server.start()
    yield server
    await server.stop()


async def test_a_peer_that_drops_on_ehlo_gets_helo_on_the_next_attempt_and_the_event_says_so(
    peer: Misbehaving, start_service: StartService
) -> None:
    peer.drop_on_ehlo = True
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{peer.port}", "retry": ["300ms"]})
    await send(service, "a@local.test", ["x@remote.test"], b"Subject: s\r\n\r\nx\r\n")
    await wait_until(lambda: peer.messages, what="delivery after healing")
    assert peer.commands[:2] == ["EHLO", "HELO"]  # first attempt EHLO (dropped), then HELO
    [event] = events_of(service, 3010)
    assert event["cause"] == "peer-rejects-ehlo"
    assert event["text"].endswith(
        "(peer-rejects-ehlo): the remote server dropped the connection after EHLO; "
        "the message is tried again over a new connection"
    )


async def test_a_peer_that_drops_8bit_data_gets_7bit_on_the_next_attempt(
    peer: Misbehaving, start_service: StartService
) -> None:
    peer.drop_on_8bit = True
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{peer.port}", "retry": ["300ms"]})
    message = "Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\u00efve\r\n".encode()
    await send(service, "a@local.test", ["x@remote.test"], message, mail_options=["BODY=8BITMIME"])
    [data] = await wait_until(lambda: peer.messages, what="delivery after healing")
    assert max(data) < 128
    [event] = events_of(service, 3010)
    assert event["cause"] == "peer-lacks-8bitmime"
    drops = [e for e in events_of(service, 4006) if e.get("cause") == "peer-lacks-8bitmime"]
    assert drops


async def test_a_peer_that_refuses_ehlo_gets_helo_on_the_same_connection_and_the_event_says_so(
    peer: Misbehaving, start_service: StartService
) -> None:
    peer.reject_ehlo = True
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{peer.port}"})
    await send(service, "a@local.test", ["x@remote.test"], b"Subject: s\r\n\r\nx\r\n")
    await wait_until(lambda: peer.messages, what="delivery with HELO")
    assert peer.commands[:3] == ["EHLO", "HELO", "MAIL"] and peer.connections == 1
    [event] = events_of(service, 3010)
    assert event["cause"] == "peer-rejects-ehlo"
    assert event["text"] == (
        f"Self-healing for host 127.0.0.1:{peer.port}: send HELO instead of EHLO from now on "
        "(peer-rejects-ehlo): it refused EHLO; the message went on over the same connection with HELO"
    )


def test_memory_forgets_after_its_ttl() -> None:
    memory = PeerMemory(ttl=10)
    assert memory.learn("h:25", PEER_LACKS_8BITMIME, now=100) is True
    assert memory.learn("h:25", PEER_LACKS_8BITMIME, now=101) is False
    assert memory.knows("h:25", PEER_LACKS_8BITMIME, now=109)
    assert not memory.knows("h:25", PEER_LACKS_8BITMIME, now=112)


async def test_a_peer_that_drops_on_body_8bitmime_gets_7bit_on_the_next_attempt(
    peer: Misbehaving, start_service: StartService
) -> None:
    peer.drop_on_body_param = True
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{peer.port}", "retry": ["300ms"]})
    message = "Subject: s\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nna\u00efve\r\n".encode()
    await send(service, "a@local.test", ["x@remote.test"], message, mail_options=["BODY=8BITMIME"])
    [data] = await wait_until(lambda: peer.messages, what="delivery after healing")
    assert max(data) < 128
    assert [e["cause"] for e in events_of(service, 3010)] == ["peer-lacks-8bitmime"]
