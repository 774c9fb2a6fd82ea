"""Helpers shared by the hostile-input tests: greeting, STARTTLS upgrade, AUTH, events, queue checks."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

from smtpsvc.app import Service
from tests.conftest import smtp_port, wait_until
from tests.rawclient import RawClient

PASSWORD = "correct horse battery staple"  # the account's password in every test that has one
USER = "alice"


async def connect(service: Service) -> RawClient:
    client = await RawClient.connect(smtp_port(service))
    assert (await client.reply()).startswith("220 relay.test smtpsvc ESMTP ready")
    return client


async def greeted(service: Service, name: str = "client.test") -> RawClient:
    client = await connect(service)
    assert (await client.command(f"EHLO {name}")).startswith("250-relay.test Hello [127.0.0.1]")
    return client


def keywords(ehlo_reply: str) -> set[str]:
    """The EHLO keywords of a multi-line 250 reply (the first line is the greeting)."""
    return {line[4:] for line in ehlo_reply.split("\n")[1:]}


async def upgrade(client: RawClient, ctx: ssl.SSLContext) -> None:
    """STARTTLS and the client side of the handshake on the same stream. Like a real client, nothing waits
    for the server after the handshake: the next command goes out at once."""
    assert (await client.command("STARTTLS")).startswith("220 2.0.0")
    await client.writer.start_tls(ctx, server_hostname="relay.test")


async def greeted_tls(service: Service, ctx: ssl.SSLContext) -> RawClient:
    client = await greeted(service)
    await upgrade(client, ctx)
    assert (await client.command("EHLO client.test")).startswith("250-relay.test Hello [127.0.0.1]")
    return client


def plain(user: str = USER, password: str = PASSWORD) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def events_of(service: Service, event_id: int) -> list[dict[str, object]]:
    service.events.flush()
    path = service.folders["log"] / "events.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["id"] == event_id]


def nothing_queued(service: Service) -> bool:
    """No message in the queue and nothing left half-written in queue/tmp."""
    return service.queue.list() == [] and list(service.queue.tmp_dir.iterdir()) == []


def drops(service: Service) -> list[Path]:
    return sorted(service.folders["drop"].glob("*.eml"))


async def session_gone(service: Service) -> None:
    """Wait until the server has noticed every client is gone (sessions ended, their spool files removed)."""
    await wait_until(lambda: service.smtp.active_sessions == 0, timeout=15, what="sessions to end")


def queue_id_of(reply: str) -> str:
    """The id in `250 2.6.0 <id> Queued mail for delivery`."""
    assert reply.startswith("250 2.6.0 <"), reply
    return reply.split("<", 1)[1].split(">", 1)[0]
