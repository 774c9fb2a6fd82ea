"""Never an open relay: every relay trick is refused at RCPT (550 5.7.1, or 501 where the address is not even
valid syntax), nothing is queued, and the refusal is logged as event 7010 with a `relay-denied:` cause."""

from __future__ import annotations

import pytest

from smtpsvc.app import Service
from tests.conftest import StartService, wait_until
from tests.rawclient import RawClient
from tests.security.helpers import drops, events_of, greeted, nothing_queued

NO_RELAY = {"relay": {"allow": []}}  # the client, 127.0.0.1, may not relay

# (address, acceptable reply prefixes). 501 only where the address is not valid RFC 5321 syntax.
TRICKS = [
    ("user%remote.test@local.test", ("550 5.7.1",)),
    ('"user@remote.test"@local.test', ("550 5.7.1",)),
    ("@local.test:user@remote.test", ("550 5.7.1",)),
    ("@local.test,@remote.test:user@local.test", ("550 5.7.1",)),
    ("remote.test!user@local.test", ("550 5.7.1",)),
    ('"user%remote.test"@local.test', ("550 5.7.1",)),
    ("user@remote.test@local.test", ("550 5.7.1", "501 5.1.3")),
    ("user@[127.0.0.1]", ("550 5.7.1",)),
    ("user@[IPv6:::1]", ("550 5.7.1",)),
    ("user@[IPv6:::ffff:127.0.0.1]", ("550 5.7.1",)),
    ("user@remote.test.", ("550 5.7.1", "501 5.1.3")),
    ("USER@Remote.TEST", ("550 5.7.1",)),
    ("user@remote.test", ("550 5.7.1",)),
    ("postmaster@remote.test", ("550 5.7.1",)),
]


async def refused(client: RawClient, rcpt: str, accepted: tuple[str, ...]) -> str:
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    reply = await client.command(f"RCPT TO:<{rcpt}>")
    assert reply.startswith(accepted), reply
    # No accepted recipient: DATA has nothing to deliver to.
    assert (await client.command("DATA")).startswith("554 5.5.1")
    return reply


def relay_denials(service: Service) -> list[dict[str, object]]:
    return [e for e in events_of(service, 7010) if str(e.get("cause", "")).startswith("relay-denied:")]


async def one_relay_denial(service: Service) -> dict[str, object]:
    """The one relay denial (event 7010), once its SMTP worker has written it (within a second)."""
    await wait_until(lambda: relay_denials(service), what="the relay denial (event 7010)")
    [event] = relay_denials(service)
    return event


@pytest.mark.parametrize(("rcpt", "accepted"), TRICKS, ids=[t[0] for t in TRICKS])
async def test_relay_trick_is_refused_and_nothing_is_queued(
    start_service: StartService, rcpt: str, accepted: tuple[str, ...]
) -> None:
    service = await start_service(**NO_RELAY)
    client = await greeted(service)
    reply = await refused(client, rcpt, accepted)
    assert nothing_queued(service)
    if reply.startswith("550"):
        event = await one_relay_denial(service)
        assert event["status"] == "5.7.1"
        assert event["host"] == "127.0.0.1"
        assert "RCPT" in str(event["text"])
    await client.close()


async def test_relay_trick_is_refused_even_for_a_client_allowed_to_relay(start_service: StartService) -> None:
    service = await start_service()  # default relay.allow includes 127.0.0.1
    client = await greeted(service)
    await refused(client, "user%remote.test@local.test", ("550 5.7.1",))
    event = await one_relay_denial(service)
    assert event["cause"] == "relay-denied:relay-trick"
    await client.close()


async def test_a_local_sender_does_not_grant_relay(start_service: StartService) -> None:
    service = await start_service(**NO_RELAY)
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<postmaster@local.test>")).startswith("250")
    assert await client.command("RCPT TO:<x@remote.test>") == "550 5.7.1 Unable to relay for <x@remote.test>"
    event = await one_relay_denial(service)
    assert event["cause"] == "relay-denied:default-deny"
    await client.close()


async def test_a_null_sender_does_not_grant_relay(start_service: StartService) -> None:
    service = await start_service(**NO_RELAY)
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    await client.close()


async def test_a_helo_naming_this_server_does_not_grant_relay(start_service: StartService) -> None:
    service = await start_service(**NO_RELAY)
    client = await greeted(service, name="relay.test")
    assert (await client.command("MAIL FROM:<a@relay.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    await client.close()


async def test_a_refused_recipient_does_not_ride_along_with_an_accepted_one(
    start_service: StartService,
) -> None:
    service = await start_service(**NO_RELAY)
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    await wait_until(lambda: drops(service) and not service.queue.list(), what="delivery")
    [drop] = drops(service)
    receivers = [line for line in drop.read_bytes().split(b"\r\n") if line.startswith(b"X-Receiver:")]
    assert receivers == [b"X-Receiver: <b@local.test>"]
    await client.close()


async def test_relay_deny_list_beats_the_allow_list(start_service: StartService) -> None:
    service = await start_service(relay={"allow": ["127.0.0.0/8"], "deny": ["127.0.0.1/32"]})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    event = await one_relay_denial(service)
    assert event["cause"] == "relay-denied:deny-list:127.0.0.1/32"
    await client.close()


async def test_relay_probing_cannot_flood_the_event_log(start_service: StartService) -> None:
    service = await start_service(**NO_RELAY)
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    await client.send(b"".join(b"RCPT TO:<u%d@remote.test>\r\n" % n for n in range(500)))
    replies = []
    for _ in range(500):
        reply = await client.reply()
        replies.append(reply)
        if not reply or reply.startswith("421"):
            break
    cut = any(r.startswith("421") for r in replies) or replies[-1] == ""
    assert cut or len(relay_denials(service)) <= 100
    await client.close()
