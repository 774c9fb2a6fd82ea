"""ETRN (RFC 1985): it only reschedules what is queued, answers 250/251 truthfully, and is refused (459) to a
client that may not relay, so it cannot be used to probe or kick the queue from outside."""

from __future__ import annotations

from tests.conftest import StartService, wait_events, wait_until
from tests.rawclient import RawClient
from tests.security.helpers import greeted, queue_id_of

HELD = {"delivery": {"smart_host": "[127.0.0.1]:9", "retry": ["10m"]}}  # nothing listens: stays queued


async def queue_for_remote(client: RawClient) -> str:
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: held\r\n\r\nx\r\n.\r\n")
    return queue_id_of(await client.reply())


async def test_etrn_for_a_domain_with_queued_mail_gets_250(start_service: StartService) -> None:
    service = await start_service(**HELD)
    client = await greeted(service)
    queue_id = await queue_for_remote(client)

    def waiting() -> bool:  # the first attempt failed and it is not being delivered right now
        envelope = service.queue.get(queue_id)
        return bool(envelope and envelope.recipients[0].attempts and queue_id not in service.queue.leased)

    await wait_until(waiting, what="the first failed attempt")
    assert await client.command("ETRN remote.test") == "250 2.0.0 Queuing for node remote.test started"
    await client.close()


async def test_etrn_for_a_domain_without_queued_mail_gets_251(start_service: StartService) -> None:
    service = await start_service(**HELD)
    client = await greeted(service)
    await queue_for_remote(client)
    assert (await client.command("ETRN other.test")).startswith("251 2.0.0 OK, no messages waiting")
    await client.close()


async def test_etrn_from_a_client_not_allowed_to_relay_gets_459(start_service: StartService) -> None:
    service = await start_service(relay={"allow": []}, **HELD)
    client = await greeted(service)
    assert await client.command("ETRN remote.test") == "459 4.0.0 Node remote.test not allowed"
    assert (await client.command("ETRN @remote.test")).startswith("459")
    assert [e["cause"] for e in await wait_events(service, 7010, 2)] == ["etrn-not-allowed"] * 2
    await client.close()


async def test_etrn_with_a_garbage_argument_gets_501(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    assert (await client.command("ETRN ../../etc/passwd")).startswith("501")
    assert (await client.command("ETRN")).startswith("501")
    await client.close()
