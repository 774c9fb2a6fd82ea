"""End to end through real sockets on 127.0.0.1: receive, queue, route, deliver, report."""

from __future__ import annotations

import asyncio
import email
import email.policy
import smtplib
from pathlib import Path

import aiosmtplib
import pytest

from smtpsvc.app import Service
from tests.conftest import StartService, smtp_port, wait_until
from tests.dnsserver import DnsServer
from tests.sink import Sink

MESSAGE = (
    b"From: Alice <alice@local.test>\r\nTo: bob@local.test\r\nSubject: hello\r\n\r\n"
    b"first line\r\n.leading dot\r\n\r\nlast line\r\n"
)


async def send(
    service: Service,
    sender: str,
    recipients: list[str],
    message: bytes = MESSAGE,
    *,
    mail_options: list[str] | None = None,
    rcpt_options: list[str] | None = None,
) -> str:
    """Send with aiosmtplib (an independent client); returns the 250 reply text of the end of DATA."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(service), timeout=30)
    await client.connect()
    try:
        errors, reply = await client.sendmail(
            sender, recipients, message, mail_options=mail_options or [], rcpt_options=rcpt_options or []
        )
    finally:
        await client.quit()
    assert not errors, errors
    return reply


def drop_files(service: Service) -> list[Path]:
    return sorted(p for p in service.folders["drop"].iterdir() if p.suffix == ".eml")


def queue_is_empty(service: Service) -> bool:
    return not service.queue.list() and not list(service.folders["queue"].glob("*.env"))


async def test_message_to_local_domain_lands_in_drop_with_envelope_lines_and_exact_body(
    start_service: StartService,
) -> None:
    service = await start_service()
    reply = await send(service, "alice@local.test", ["bob@local.test", "carol@LOCAL.test"])
    assert "Queued mail for delivery" in reply
    files = await wait_until(lambda: drop_files(service), what="a drop file")
    data = files[0].read_bytes()
    assert data.startswith(
        b"X-Sender: <alice@local.test>\r\nX-Receiver: <bob@local.test>\r\n"
        b"X-Receiver: <carol@LOCAL.test>\r\nReceived: from "
    )
    assert data.endswith(MESSAGE)  # the client's bytes, unstuffed, exactly
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_message_to_remote_domain_reaches_smart_host(start_service: StartService, sink: Sink) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@local.test", ["dave@remote.test"])
    await wait_until(lambda: sink.messages, what="delivery to the smart host")
    got = sink.messages[0]
    assert got.mail_from == "alice@local.test"
    assert got.rcpt_tos == ["dave@remote.test"]
    assert got.content.endswith(MESSAGE)
    assert got.content.startswith(b"Received: from ")
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_message_to_remote_domain_reaches_mx_found_in_dns(
    start_service: StartService, sink: Sink, dns_server: DnsServer
) -> None:
    dns_server.add_mx("remote.test", 10, "mx1.remote.test")
    dns_server.add_a("mx1.remote.test", "127.0.0.1")
    service = await start_service(
        resolver={"nameservers": [dns_server.nameserver]}, delivery={"remote_port": sink.port}
    )
    await send(service, "alice@local.test", ["erin@remote.test"])
    await wait_until(lambda: sink.messages, what="delivery by MX")
    assert sink.messages[0].rcpt_tos == ["erin@remote.test"]
    assert ("remote.test", "MX") in dns_server.queries


async def test_pickup_file_with_envelope_lines_is_delivered_and_removed(start_service: StartService) -> None:
    service = await start_service()
    body = b"From: app@local.test\r\nSubject: report\r\n\r\nnightly report\r\n"
    pickup_file = service.folders["pickup"] / "job1.eml"
    pickup_file.write_bytes(
        b"X-Sender: app@local.test\r\nX-Receiver: <ops@local.test>\r\nx-receiver: dba@local.test\r\n" + body
    )
    files = await wait_until(lambda: drop_files(service), what="the picked-up message in drop/")
    data = files[0].read_bytes()
    assert data.startswith(
        b"X-Sender: <app@local.test>\r\nX-Receiver: <ops@local.test>\r\nX-Receiver: <dba@local.test>\r\n"
    )
    assert data.endswith(body)
    assert (
        b"x-receiver" not in data.lower().split(b"\r\nreceived:", 1)[1]
    )  # envelope lines not in the message
    await wait_until(lambda: not pickup_file.exists(), what="the pickup file to be removed")


async def test_drop_file_copied_into_pickup_is_replayed_to_the_same_recipients(
    start_service: StartService,
) -> None:
    service = await start_service()
    await send(service, "alice@local.test", ["bob@local.test", "carol@local.test"])
    first = (await wait_until(lambda: drop_files(service), what="the first drop file"))[0]
    original = first.read_bytes()
    first.rename(service.folders["pickup"] / "replay.eml")
    replayed = (await wait_until(lambda: drop_files(service), what="the replayed drop file"))[0]
    data = replayed.read_bytes()
    assert data.startswith(
        b"X-Sender: <alice@local.test>\r\nX-Receiver: <bob@local.test>\r\n"
        b"X-Receiver: <carol@local.test>\r\nReceived: from pickup"
    )
    assert data.endswith(original.split(b"\r\n", 3)[3])  # the whole original message follows


async def test_permanent_failure_from_remote_produces_ndr_in_senders_drop_folder(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@local.test", ["reject-me@remote.test"])
    files = await wait_until(lambda: drop_files(service), what="an NDR in drop/")
    data = files[0].read_bytes()
    assert data.startswith(b"X-Sender: <>\r\nX-Receiver: <alice@local.test>\r\n")
    report = email.message_from_bytes(data.split(b"\r\n", 2)[2], policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    status = next(p for p in report.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Action: failed" in text
    assert "Status: 5.1.1" in text
    assert "User unknown" in text  # the remote's diagnostic
    assert "Final-Recipient: rfc822; reject-me@remote.test" in text
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_transient_failure_is_retried_on_schedule_then_expires_into_ndr(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["500ms"], "expiration": "3s"}
    )
    await send(service, "alice@local.test", ["defer-me@remote.test"])
    files = await wait_until(lambda: drop_files(service), timeout=30, what="the expiry NDR")
    attempts = sink.handler.rcpt_attempts.count("defer-me@remote.test")
    assert attempts >= 3  # retried on the 0.5 s schedule within the 3 s lifetime
    data = files[0].read_bytes()
    assert b"Status: 4.4.7" in data
    assert b"Action: failed" in data
    assert b"Mailbox busy" in data  # the last error is reported too


async def test_client_outside_relay_allow_cannot_relay_and_nothing_is_queued(
    start_service: StartService,
) -> None:
    service = await start_service(relay={"allow": ["192.0.2.0/24"]})

    def attempt() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", smtp_port(service), timeout=30) as client:
            client.ehlo("client.test")
            client.mail("alice@local.test")
            return client.rcpt("victim@remote.test")

    code, text = await asyncio.to_thread(attempt)
    assert code == 550
    assert text.startswith(b"5.7.1 Unable to relay for <victim@remote.test>")
    assert service.queue.list() == []
    assert not list(service.folders["queue"].glob("*.eml"))


@pytest.mark.parametrize(
    "rcpt",
    [
        "user%remote.test@local.test",
        '"user@remote.test"@local.test',
        "remote.test!user@local.test",
        "@local.test:user@remote.test",
    ],
)
async def test_relay_tricks_in_local_part_are_refused(start_service: StartService, rcpt: str) -> None:
    service = await start_service(relay={"allow": []})

    def attempt() -> int:
        with smtplib.SMTP("127.0.0.1", smtp_port(service), timeout=30) as client:
            client.ehlo("client.test")
            client.mail("alice@local.test")
            return client.docmd("RCPT", f"TO:<{rcpt}>")[0]  # verbatim: smtplib would rewrite the route

    assert await asyncio.to_thread(attempt) == 550


async def test_mixed_results_bounce_only_the_refused_recipient(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@local.test", ["ok@remote.test", "reject-me@remote.test"])
    await wait_until(lambda: sink.messages, what="delivery of the accepted recipient")
    assert sink.messages[0].rcpt_tos == ["ok@remote.test"]
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    data = ndr.read_bytes()
    assert b"Final-Recipient: rfc822; reject-me@remote.test" in data
    assert b"ok@remote.test" not in data.split(b"message/delivery-status", 1)[1].split(b"rfc822-headers")[0]
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_a_recipient_given_twice_gets_one_copy(start_service: StartService) -> None:
    service = await start_service()
    await send(service, "alice@local.test", ["bob@local.test", "BOB@local.test"])
    [file] = await wait_until(lambda: drop_files(service), what="delivery")
    assert file.read_bytes().count(b"X-Receiver:") == 1
