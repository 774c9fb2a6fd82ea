"""STARTTLS (RFC 3207): plaintext injected behind the command is discarded, the session restarts at EHLO, the
EHLO list changes with TLS, and `tls.require` refuses mail in plaintext."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from tests.conftest import StartService
from tests.security.conftest import Tls
from tests.security.helpers import (
    greeted,
    greeted_tls,
    keywords,
    nothing_queued,
    plain,
    session_gone,
    upgrade,
)


async def test_commands_injected_behind_starttls_are_never_answered(
    start_service: StartService, tls: Tls
) -> None:
    service = await start_service(tls=tls.section)
    client = await greeted(service)
    await client.send(b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@local.test>\r\n")  # one packet
    assert (await client.reply()).startswith("220 2.0.0")
    await client.writer.start_tls(tls.client_context(), server_hostname="relay.test")
    # The first reply inside TLS must be the one to our EHLO, not to the injected MAIL.
    assert (await client.command("EHLO client.test")).startswith("250-relay.test Hello [127.0.0.1]")
    assert await client.command("NOOP") == "250 2.0.0 OK"  # and no reply to the injection is pending
    # The injected MAIL did not open a transaction: RCPT needs a MAIL first.
    assert (await client.command("RCPT TO:<victim@local.test>")).startswith("503 5.5.1")
    assert nothing_queued(service)
    await client.close()


async def test_plaintext_injected_after_the_220_is_never_taken_as_a_tls_command(
    start_service: StartService, tls: Tls
) -> None:
    # A man in the middle adds a command after the 220, before the ClientHello. Either the server feeds it to
    # the handshake, which then fails (the connection ends), or it discards it; it must never run it.
    service = await start_service(tls=tls.section)
    client = await greeted(service)
    assert (await client.command("STARTTLS")).startswith("220 2.0.0")
    await client.send(b"MAIL FROM:<evil@x.test>\r\n")
    try:
        await asyncio.wait_for(
            client.writer.start_tls(tls.client_context(), server_hostname="relay.test"), 10
        )
    except (ssl.SSLError, ConnectionError, OSError):
        await session_gone(service)
    else:
        assert (await client.command("EHLO client.test")).startswith("250-relay.test Hello")
        assert await client.command("NOOP") == "250 2.0.0 OK"
        assert (await client.command("RCPT TO:<victim@local.test>")).startswith("503 5.5.1")
        await client.close()
    assert nothing_queued(service)


async def test_mail_after_starttls_without_a_new_ehlo_gets_503(start_service: StartService, tls: Tls) -> None:
    service = await start_service(tls=tls.section)
    client = await greeted(service)
    await upgrade(client, tls.client_context())
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("503 5.5.1")
    await client.close()


async def test_ehlo_inside_tls_drops_starttls_and_now_offers_auth(
    start_service: StartService, tls: Tls, users_file: Path
) -> None:
    service = await start_service(tls=tls.section, auth={"users_file": str(users_file)})
    client = await greeted(service)
    before = keywords(await client.command("EHLO client.test"))
    assert "STARTTLS" in before
    assert not any(k.startswith("AUTH") for k in before)
    await upgrade(client, tls.client_context())
    after = keywords(await client.command("EHLO client.test"))
    assert "STARTTLS" not in after
    assert "AUTH PLAIN LOGIN" in after
    assert (await client.command("STARTTLS")).startswith("503 5.5.1")  # no second handshake
    await client.close()


async def test_tls_require_refuses_mail_before_starttls_with_530(
    start_service: StartService, tls: Tls
) -> None:
    service = await start_service(tls={**tls.section, "require": True})
    client = await greeted(service)
    assert await client.command("MAIL FROM:<a@local.test>") == "530 5.7.0 Must issue a STARTTLS command first"
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("530 5.7.0")
    assert (await client.command("DATA")).startswith("530 5.7.0")
    assert nothing_queued(service)
    await client.close()


async def test_tls_require_accepts_mail_once_tls_is_active(start_service: StartService, tls: Tls) -> None:
    service = await start_service(tls={**tls.section, "require": True})
    client = await greeted_tls(service, tls.client_context())
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250 2.1.0")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250 2.1.5")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: tls\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    await client.close()


async def test_ehlo_sent_right_after_the_handshake_is_answered(start_service: StartService, tls: Tls) -> None:
    # Regression: the session used to discard its read buffer *after* the handshake, which threw away a
    # command a client sent over TLS at once (in-process, the client's EHLO deterministically arrives with
    # its TLS Finished message, before the server's start_tls() returns).
    service = await start_service(tls=tls.section)
    client = await greeted(service)
    await upgrade(client, tls.client_context())  # no waiting for the server: a real client does not wait
    assert (await client.command("EHLO client.test", timeout=3)).startswith("250-relay.test Hello")
    await client.close()


async def test_starttls_forgets_a_plaintext_auth_so_it_no_longer_grants_relay(
    start_service: StartService, tls: Tls, users_file: Path
) -> None:
    service = await start_service(
        tls=tls.section, auth={"users_file": str(users_file), "require_tls": False}, relay={"allow": []}
    )
    client = await greeted(service)
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
    await upgrade(client, tls.client_context())
    assert (await client.command("EHLO client.test")).startswith("250-relay.test")
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    await client.close()
