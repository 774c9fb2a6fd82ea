"""Outbound XEXCH50 (SPEC 2.5, KB818222): the blob goes to internal peers that offer it, never to external
ones, and a peer that stalls after the blob gets the message without it on the next attempt."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from smtpsvc.app import Service
from smtpsvc.auth.users import UserStore
from tests.conftest import StartService, events_of, smtp_port, wait_until
from tests.peers import LoopbackPeer
from tests.rawclient import RawClient

BLOB = bytes(range(256)) * 4 + b"\r\n.\r\nnot a command\r\n"


class ExchangePeer(LoopbackPeer):
    """A next hop that offers XEXCH50 and records the blob; optionally it goes silent after the blob, like
    the firewall of KB818222."""

    def __init__(self) -> None:
        super().__init__()
        self.stall_after_blob = False
        self.blobs: list[bytes] = []
        self.hold_data: asyncio.Event | None = None  # set: a message's 250 waits for it

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 exchange.test ready\r\n")
        try:
            while line := await reader.readline():
                parts = line.decode().split()
                verb = parts[0].upper() if parts else ""
                self.commands.append(verb)
                if verb == "EHLO":
                    writer.write(b"250-exchange.test\r\n250-PIPELINING\r\n250 XEXCH50\r\n")
                elif verb == "XEXCH50":
                    writer.write(b"354 Send binary data\r\n")
                    await writer.drain()
                    self.blobs.append(await reader.readexactly(int(parts[1])))
                    if self.stall_after_blob:
                        await asyncio.sleep(3600)  # never answers (the test's delivery timeout cuts it)
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == "DATA":
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                    if self.hold_data is not None:
                        await self.hold_data.wait()
                    writer.write(b"250 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                    break
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()


@pytest.fixture
async def exchange() -> AsyncIterator[ExchangePeer]:
    peer = ExchangePeer()
    await peer.start()
    yield peer
    await peer.stop()


def users_file(tmp_path: Path) -> str:
    store = UserStore()
    store.add("exchange", "secret")
    path = tmp_path / "users.toml"
    store.save(path)
    return str(path)


async def relay_with_blob(service: Service, rcpt: str, blob: bool = True) -> None:
    """Submit over loopback with AUTH and (unless `blob` is False) an XEXCH50 blob, as an Exchange server
    would."""
    client = await RawClient.connect(smtp_port(service))
    await client.reply()
    await client.command("EHLO exchange-a.test")
    token = base64.b64encode(b"\0exchange\0secret").decode()
    assert (await client.command(f"AUTH PLAIN {token}")).startswith("235")
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250")
    if blob:
        assert (await client.command(f"XEXCH50 {len(BLOB)} 2")).startswith("354")
        await client.send(BLOB)
        assert (await client.reply()).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    await client.close()


def connector(port: int) -> str:
    return (
        f'[[connector]]\nname = "org"\naddress_spaces = ["*"]\ncost = 1\n'
        f'smart_hosts = ["[127.0.0.1]:{port}"]\nxexch50 = true\n'
    )


def sections(tmp_path: Path) -> dict[str, dict[str, object]]:
    return {
        "extensions": {"xexch50": True},
        "auth": {"users_file": users_file(tmp_path), "require_tls": False},
        "domains": {"local": ["local.test"], "remote": [{"name": "internal.test"}]},
    }


async def test_the_blob_arrives_intact_at_an_internal_peer_that_offers_it(
    start_service: StartService, exchange: ExchangePeer, tmp_path: Path
) -> None:
    service = await start_service(_extra=connector(exchange.port), **sections(tmp_path))
    await relay_with_blob(service, "user@internal.test")
    await wait_until(lambda: exchange.messages, what="delivery")
    assert exchange.blobs == [BLOB]
    assert exchange.commands.index("XEXCH50") < exchange.commands.index("DATA")


async def test_the_blob_never_goes_to_an_external_domain(
    start_service: StartService, exchange: ExchangePeer, tmp_path: Path
) -> None:
    service = await start_service(_extra=connector(exchange.port), **sections(tmp_path))
    await relay_with_blob(service, "user@external.test")
    await wait_until(lambda: exchange.messages, what="delivery")
    assert exchange.blobs == [] and "XEXCH50" not in exchange.commands


async def test_a_peer_that_stalls_after_the_blob_gets_the_message_without_it_next_time(
    start_service: StartService, exchange: ExchangePeer, tmp_path: Path
) -> None:
    exchange.stall_after_blob = True
    overrides = sections(tmp_path)
    overrides["delivery"] = {"timeout": "1s", "retry": ["300ms"]}
    service = await start_service(_extra=connector(exchange.port), **overrides)
    await relay_with_blob(service, "user@internal.test")
    await wait_until(lambda: exchange.messages, timeout=30, what="delivery without the blob")
    assert len(exchange.blobs) == 1  # sent once, then never again to this host
    service.events.flush()
    events = [json.loads(line) for line in (service.folders["log"] / "events.jsonl").read_text().splitlines()]
    assert any(e["id"] == 3010 and e.get("cause") == "xexch50-blocked" for e in events)


async def test_the_blob_reaches_an_smtpsvc_peer_that_offers_xexch50_after_auth(
    start_service: StartService, tmp_path: Path
) -> None:
    receiver = await start_service(
        extensions={"xexch50": True},
        auth={"users_file": users_file(tmp_path), "require_tls": False},
        domains={"local": ["receiver.test"]},
        delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]},  # keeps what it receives queued
    )
    secret = tmp_path / "secret"
    secret.write_text("secret\n")
    text = (
        f'[[connector]]\nname = "org"\naddress_spaces = ["*"]\ncost = 1\n'
        f'smart_hosts = ["[127.0.0.1]:{smtp_port(receiver)}"]\nxexch50 = true\n'
        f'auth = {{ user = "exchange", password_file = "{secret}" }}\n'
    )
    relay = await start_service(_extra=text, **sections(tmp_path))
    await relay_with_blob(relay, "user@internal.test")
    [envelope] = await wait_until(receiver.queue.list, what="the message at the receiver")
    assert envelope.xexch50 == len(BLOB)
    assert receiver.queue.xexch50_blob(envelope.id) == BLOB


async def test_a_stall_after_the_blob_on_a_reused_connection_is_waited_out_once(
    start_service: StartService, exchange: ExchangePeer, tmp_path: Path
) -> None:
    """The KB818222 firewall met on a connection handed over from the previous message: one stall (the
    test settings' delivery.timeout, 10s) is enough to learn it; the fresh connection that follows in the
    same attempt carries no blob, and the event says it was a timeout."""
    exchange.stall_after_blob = True
    exchange.hold_data = asyncio.Event()  # the first message holds the one connection...
    overrides = sections(tmp_path)
    overrides["delivery"] = {"max_connections_per_domain": 1}
    service = await start_service(_extra=connector(exchange.port), **overrides)
    await relay_with_blob(service, "first@internal.test", blob=False)
    await wait_until(lambda: exchange.messages, what="the first message")
    await relay_with_blob(service, "second@internal.test")  # ...so the second one gets it after the first
    exchange.hold_data.set()
    await wait_until(lambda: len(exchange.messages) == 2, timeout=60, what="the second message, without blob")
    assert exchange.blobs == [BLOB]  # one stall, not one per connection
    assert exchange.commands.count("XEXCH50") == 1
    [healed] = events_of(service, 3010)
    assert healed["cause"] == "xexch50-blocked"
    assert "no reply to the XEXCH50 blob within 10s" in healed["text"]  # the transcript's words
    assert "dropped" not in healed["text"]
