"""Connection control (`[connection]`, IIS's IPSecurity) against the real service on 127.0.0.1: a refused
client gets `554 5.7.1` instead of the banner, may only QUIT and never reaches MAIL or AUTH; an allowed one
sends; a reload changes who may connect for new connections. Linux routes all of 127.0.0.0/8 to loopback,
so a client bound to 127.0.0.2 is a second, distinct client address on the same listener."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import pytest

from smtpsvc.app import Service
from smtpsvc.config import worker_count
from smtpsvc.server import session
from tests.conftest import StartService, base_sections, events_of, smtp_port, wait_until, write_config
from tests.rawclient import RawClient
from tests.test_relay import drop_files, queue_is_empty
from tests.test_reload import workers_reloaded

OTHER = "127.0.0.2"  # the second client address
REFUSED = f"554 5.7.1 relay.test Access denied: {OTHER} may not connect (connection control)"
MESSAGE = b"From: alice@local.test\r\nTo: bob@local.test\r\nSubject: hi\r\n\r\nhello\r\n"


async def raw_from(service: Service, source: str) -> RawClient:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", smtp_port(service), local_addr=(source, 0)), 10
    )
    return RawClient(reader, writer)


def smtplib_send(port: int, source: str) -> None:
    """smtplib as an application would use it, from `source`: raises what smtplib raises."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30, source_address=(source, 0)) as client:
        client.sendmail("alice@local.test", ["bob@local.test"], MESSAGE)


async def send_from(service: Service, source: str) -> None:
    await asyncio.to_thread(smtplib_send, smtp_port(service), source)


async def refused_with_smtplib(service: Service, source: str) -> smtplib.SMTPConnectError:
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        await send_from(service, source)
    return refused.value


def denials(service: Service) -> list[dict[str, Any]]:
    return [e for e in events_of(service, 7010) if e.get("cause") == "connection-denied"]


async def test_a_denied_client_gets_554_at_connect_and_cannot_send_while_others_can(
    start_service: StartService,
) -> None:
    service = await start_service(connection={"deny": [f"{OTHER}/32"]})
    refused = await refused_with_smtplib(service, OTHER)
    assert refused.smtp_code == 554
    assert refused.smtp_error.decode() == REFUSED[4:]
    await send_from(service, "127.0.0.1")  # not in the deny list: everyone else may connect
    await wait_until(lambda: len(drop_files(service)) == 1, what="the allowed client's message in Drop")
    await wait_until(lambda: queue_is_empty(service), what="the allowed client's message delivered")
    # RFC 5321 §3.1: after the 554 banner the server waits for QUIT and refuses every other command.
    client = await raw_from(service, OTHER)
    assert await client.reply() == REFUSED
    for command in ("EHLO client.test", "AUTH PLAIN AGFsaWNlAHNlY3JldA==", "MAIL FROM:<a@local.test>"):
        assert (await client.command(command)).startswith("503 5.5.1 ")
    assert (await client.command("QUIT")).startswith("221 ")
    assert await client.closed()
    assert len(drop_files(service)) == 1 and queue_is_empty(service)  # nothing from the refused client
    # Two refused connections, one event per SMTP process at most (at most one a minute per address in
    # each; with the default workers each writes its own, within a second).
    await wait_until(lambda: denials(service) or None, what="the connection-denied event")
    assert len(denials(service)) <= worker_count(service.config)
    event = denials(service)[0]
    assert event["host"] == OTHER and event["status"] == "5.7.1"
    assert f'The client at "{OTHER}" was refused at connect by connection control' in event["text"]


async def test_the_allow_list_admits_only_its_networks_and_loopback_is_not_exempt(
    start_service: StartService,
) -> None:
    service = await start_service(connection={"allow": ["127.0.0.1"]})
    await send_from(service, "127.0.0.1")
    await wait_until(lambda: len(drop_files(service)) == 1, what="the listed client's message in Drop")
    assert (await refused_with_smtplib(service, OTHER)).smtp_code == 554


async def test_deny_wins_over_allow(start_service: StartService) -> None:
    service = await start_service(connection={"allow": ["127.0.0.0/8"], "deny": [OTHER]})
    assert (await refused_with_smtplib(service, OTHER)).smtp_code == 554
    await send_from(service, "127.0.0.1")
    await wait_until(lambda: len(drop_files(service)) == 1, what="the allowed client's message in Drop")


async def test_a_refused_client_that_never_quits_is_cut_off_after_five_commands(
    start_service: StartService,
) -> None:
    service = await start_service(connection={"deny": [OTHER]})
    client = await raw_from(service, OTHER)
    assert await client.reply() == REFUSED
    for _ in range(session.REFUSED_COMMANDS - 1):
        assert (await client.command("NOOP")).startswith("503 5.5.1 ")
    assert (await client.command("NOOP")).startswith("421 4.7.1 relay.test Access denied")
    assert await client.closed()


async def test_a_refused_client_that_says_nothing_is_cut_off_after_a_short_time(
    start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound is REFUSED_SECONDS in all, whatever server.connection_timeout (30 s here) says; shortened
    # here so the test does not wait 10 s. A trickle of commands does not extend it.
    monkeypatch.setattr(session, "REFUSED_SECONDS", 1.0)
    service = await start_service(connection={"deny": [OTHER]})
    client = await raw_from(service, OTHER)
    assert await client.reply() == REFUSED
    assert (await client.command("NOOP")).startswith("503 5.5.1 ")
    assert (await client.reply(timeout=20)).startswith("421 4.4.2 ")
    assert await client.closed()


async def test_a_reload_changes_who_may_connect_for_new_connections(start_service: StartService) -> None:
    service = await start_service()
    await send_from(service, OTHER)  # the default: everyone may connect
    open_before = await raw_from(service, OTHER)
    assert (await open_before.reply()).startswith("220 ")

    config = Path(str(service.config_path))
    write_config(config, base_sections(service.root, connection={"deny": [OTHER]}))
    service.reload()
    await workers_reloaded(service)  # the SMTP workers take it on SIGHUP, within milliseconds
    assert (await refused_with_smtplib(service, OTHER)).smtp_code == 554
    # A session that started before the reload keeps its configuration (like relay rules): it may go on.
    assert (await open_before.command("EHLO client.test")).startswith("250-")
    assert (await open_before.command("QUIT")).startswith("221 ")

    write_config(config, base_sections(service.root))
    service.reload()
    await workers_reloaded(service, reloads=2)
    await send_from(service, OTHER)
    await wait_until(lambda: len(drop_files(service)) == 2, what="both messages from 127.0.0.2 in Drop")
