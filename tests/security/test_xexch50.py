"""XEXCH50 (Exchange peer mode): refused without AUTH (504 5.7.4, event 7010), and with AUTH the blob is read
as exactly the announced octets, never as commands, and kept byte for byte as queue/<id>.x50."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartService, wait_events, wait_until
from tests.security.helpers import (
    events_of,
    greeted,
    keywords,
    nothing_queued,
    plain,
    queue_id_of,
)

# Binary, with an end of data, commands and bare line ends inside: all of it is opaque payload.
BLOB = bytes(range(256)) + b"\r\n.\r\nQUIT\r\nMAIL FROM:<evil@x.test>\r\n\n.\n\x00\xff"


def peer_mode(users_file: Path | None = None) -> dict[str, dict[str, object]]:
    sections: dict[str, dict[str, object]] = {
        "extensions": {"xexch50": True},
        "delivery": {"smart_host": "[127.0.0.1]:9", "retry": ["10m"]},  # nothing listens: stays queued
    }
    if users_file is not None:
        sections["auth"] = {"users_file": str(users_file), "require_tls": False}
    return sections


async def test_xexch50_without_auth_gets_504_and_event_7010(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**peer_mode(users_file))
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    assert await client.command(f"XEXCH50 {len(BLOB)} 2") == "504 5.7.4 Need to authenticate first"
    assert await client.command("NOOP") == "250 2.0.0 OK"
    [event] = await wait_events(service, 7010)
    assert event["cause"] == "xexch50-unauthenticated"
    assert event["status"] == "5.7.4"
    assert nothing_queued(service)
    await client.close()


async def test_xexch50_is_advertised_before_and_after_auth(
    start_service: StartService, users_file: Path
) -> None:
    # Exchange 2000/2003 lists XEXCH50 to anonymous clients too (KB279616's telnet check); use needs AUTH
    service = await start_service(**peer_mode(users_file))
    client = await greeted(service)
    assert "XEXCH50" in keywords(await client.command("EHLO client.test"))
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
    assert "XEXCH50" in keywords(await client.command("EHLO client.test"))
    await client.close()


async def test_xexch50_blob_with_auth_is_read_exactly_and_stored_byte_for_byte(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**peer_mode(users_file))
    client = await greeted(service)
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    assert await client.command(f"XEXCH50 {len(BLOB)} 2") == "354 Send binary data"
    await client.send(BLOB)
    assert await client.reply() == "250 2.0.0 OK"  # one reply: nothing inside the blob ran as a command
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: peer\r\n\r\nx\r\n.\r\n")
    queue_id = queue_id_of(await client.reply())
    assert (service.folders["queue"] / f"{queue_id}.x50").read_bytes() == BLOB
    # A worker's message reaches the main process's index by its notice, a moment after the 250.
    await wait_until(lambda: [e.id for e in service.queue.list()] == [queue_id], what="the message queued")
    await client.close()


async def test_xexch50_over_the_size_cap_is_refused_with_501(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**peer_mode(users_file))
    client = await greeted(service)
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    assert (await client.command("XEXCH50 1048577 2")).startswith("501")
    assert (await client.command("XEXCH50 0 2")).startswith("501")
    assert (await client.command("XEXCH50 -5 2")).startswith("501")
    assert await client.command("NOOP") == "250 2.0.0 OK"
    await client.close()


async def test_xexch50_is_unknown_when_peer_mode_is_off(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    assert (await client.command("XEXCH50 10 2")).startswith("500 5.5.1")
    await client.close()


def exchange_peer_mode(users_file: Path) -> dict[str, dict[str, object]]:
    sections = peer_mode(users_file)
    sections["extensions"] = {"xexch50": True, "x_link2state": True}
    return sections


async def test_x_link2state_without_auth_gets_504_and_event_7010(
    start_service: StartService, users_file: Path
) -> None:
    # What Exchange answers a peer outside its routing group; never a 500 to a verb we advertise
    service = await start_service(**exchange_peer_mode(users_file))
    client = await greeted(service)
    assert {"XEXCH50", "X-LINK2STATE"} <= keywords(await client.command("EHLO client.test"))
    assert await client.command("X-LINK2STATE FIRST CHUNK=abc") == "504 5.7.4 Need to authenticate first"
    assert await client.command("NOOP") == "250 2.0.0 OK"
    [event] = await wait_events(service, 7010)
    assert event["cause"] == "x-link2state-unauthenticated"
    assert event["status"] == "5.7.4"
    assert event["text"] == (
        'The client at "127.0.0.1" sent a "X-LINK2STATE" command, and the SMTP server responded with '
        '"504 5.7.4 Need to authenticate first".'
    )
    await client.close()


async def test_x_link2state_with_auth_is_acknowledged_and_mail_goes_on(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**exchange_peer_mode(users_file))
    client = await greeted(service)
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
    assert {"XEXCH50", "X-LINK2STATE"} <= keywords(await client.command("EHLO client.test"))
    for chunk in ("FIRST CHUNK=abc", "LAST CHUNK=def", "DONE"):
        reply = await client.command(f"X-LINK2STATE {chunk}")
        assert reply.startswith("250 2.0.0 X-LINK2STATE ignored"), reply
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: peer\r\n\r\nx\r\n.\r\n")
    queue_id = queue_id_of(await client.reply())
    # A worker's message reaches the main process's index by its notice, a moment after the 250.
    await wait_until(lambda: [e.id for e in service.queue.list()] == [queue_id], what="the message queued")
    assert events_of(service, 7010) == []
    await client.close()
