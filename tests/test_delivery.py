"""Outbound delivery against real peers: our own server, a HELO-only server, MX fallback, DNS failures,
and what happens to reports that cannot be delivered (Badmail)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from collections.abc import AsyncIterator

import pytest

from smtpsvc.app import Service
from smtpsvc.queue.base import QueueError
from tests.conftest import StartService, events_of, smtp_port, wait_until
from tests.dnsserver import DnsServer
from tests.peers import LoopbackPeer
from tests.sink import Sink
from tests.test_relay import MESSAGE, drop_files, queue_is_empty, send


def parsed_status(drop_file: bytes) -> list[tuple[str, str]]:
    """(Final-Recipient address, Action) of each block of a report, parsed by the stdlib email package."""
    report = email.message_from_bytes(drop_file.split(b"\r\n", 2)[2])  # after X-Sender and one X-Receiver
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    [status] = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()[1:]  # the first block is the per-message one
    return [(str(b["Final-Recipient"]).split(";", 1)[1].strip(), str(b["Action"])) for b in blocks]


def badmail(service: Service, suffix: str) -> list[object]:
    return sorted(service.folders["badmail"].glob(f"*{suffix}"))


class ScriptedServer(LoopbackPeer):
    """A minimal SMTP peer that is not our code. `ehlo` is its EHLO reply, or None to refuse EHLO with 502
    like an old server (KB818222 method 2). It records each TCP read, so a test can see what was pipelined."""

    def __init__(self, ehlo: bytes | None, rcpt_reply: bytes = b"250 ok\r\n") -> None:
        super().__init__()
        self.ehlo = ehlo
        self.rcpt_reply = rcpt_reply
        self.lines: list[str] = []
        self.reads: list[bytes] = []
        self.empty_data = 0  # data phases ended at once (".") after a 354

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test SMTP ready\r\n")
        buffer = b""
        while chunk := await reader.read(65536):
            self.reads.append(chunk)
            buffer += chunk
            while b"\r\n" in buffer:
                line, buffer = buffer.split(b"\r\n", 1)
                verb = line.decode().split(" ", 1)[0].upper()
                self.commands.append(verb)
                self.lines.append(line.decode())
                if verb == "EHLO":
                    writer.write(self.ehlo or b"502 5.5.1 Command not implemented\r\n")
                elif verb == "RCPT":
                    writer.write(self.rcpt_reply)
                elif verb == "DATA":
                    # 354 whatever the recipients got, as RFC 2920 section 3.1 allows a server to
                    writer.write(b"354 go ahead\r\n")
                    while not buffer.startswith(b".\r\n") and b"\r\n.\r\n" not in buffer:
                        buffer += await reader.read(65536)
                    if buffer.startswith(b".\r\n"):
                        buffer = buffer[3:]
                        self.empty_data += 1
                        writer.write(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    message, buffer = buffer.split(b"\r\n.\r\n", 1)
                    self.messages.append(message + b"\r\n.\r\n")
                    writer.write(b"250 queued\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 bye\r\n")
                else:
                    writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def helo_only() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(ehlo=None)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def pipelining_peer() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(ehlo=b"250-old.test\r\n250 PIPELINING\r\n")
    await server.start()
    yield server
    await server.stop()


async def test_mail_and_rcpts_are_pipelined_when_the_peer_offers_it(
    start_service: StartService, pipelining_peer: ScriptedServer
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{pipelining_peer.port}"})
    await send(service, "alice@local.test", ["x@remote.test", "y@remote.test"])
    await wait_until(lambda: pipelining_peer.messages, what="delivery")
    [batch] = [r for r in pipelining_peer.reads if b"MAIL FROM" in r]
    assert batch.count(b"RCPT TO") == 2  # MAIL, both RCPTs and DATA in one write (RFC 2920)
    assert batch.endswith(b"DATA\r\n")
    assert pipelining_peer.messages[0].endswith(b"last line\r\n.\r\n")


async def test_a_pipelined_data_that_gets_354_with_no_recipient_is_closed_empty(
    start_service: StartService,
) -> None:
    peer = ScriptedServer(
        ehlo=b"250-picky.test\r\n250 PIPELINING\r\n", rcpt_reply=b"550 5.1.1 no such user\r\n"
    )
    await peer.start()
    try:
        service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{peer.port}"})
        await send(service, "alice@local.test", ["x@remote.test"])
        [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
        assert parsed_status(ndr.read_bytes()) == [("x@remote.test", "failed")]
        assert peer.empty_data == 1 and not peer.messages  # the void data phase carried nothing
        assert peer.commands[:5] == ["EHLO", "MAIL", "RCPT", "DATA", "RSET"]  # and the session was reset
    finally:
        await peer.stop()


async def test_without_pipelining_each_rcpt_waits_for_its_reply(
    start_service: StartService, helo_only: ScriptedServer
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{helo_only.port}"})
    await send(service, "alice@local.test", ["x@remote.test", "y@remote.test"])
    await wait_until(lambda: helo_only.messages, what="delivery")
    assert not any(b"MAIL FROM" in r and b"RCPT TO" in r for r in helo_only.reads)


async def test_relay_to_our_own_server_uses_pipelining_and_arrives_intact(
    start_service: StartService,
) -> None:
    receiver = await start_service(domains={"local": ["remote.test"]})
    relay = await start_service(delivery={"smart_host": f"[127.0.0.1]:{smtp_port(receiver)}"})
    await send(relay, "alice@local.test", ["x@remote.test", "y@remote.test"])
    [file] = await wait_until(lambda: drop_files(receiver), what="delivery to the second server")
    data = file.read_bytes()
    assert data.startswith(
        b"X-Sender: <alice@local.test>\r\nX-Receiver: <x@remote.test>\r\nX-Receiver: <y@remote.test>\r\n"
    )
    assert data.endswith(MESSAGE)
    assert data.count(b"Received: from ") == 2  # one per hop


async def test_peer_refusing_ehlo_gets_helo(start_service: StartService, helo_only: ScriptedServer) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{helo_only.port}"})
    await send(service, "alice@local.test", ["z@remote.test"])
    await wait_until(lambda: helo_only.messages, what="delivery over HELO")
    assert helo_only.commands[:3] == ["EHLO", "HELO", "MAIL"]
    assert helo_only.messages[0].endswith(b"last line\r\n.\r\n")
    assert b"\r\n..leading dot\r\n" in helo_only.messages[0]  # dot-stuffed on the wire


async def test_next_mx_is_tried_when_the_first_cannot_be_reached(
    start_service: StartService, sink: Sink, dns_server: DnsServer
) -> None:
    dns_server.add_mx("remote.test", 10, "mx1.remote.test")
    dns_server.add_mx("remote.test", 20, "mx2.remote.test")
    dns_server.add_a("mx1.remote.test", "127.0.0.2")  # nothing listens there on the sink's port
    dns_server.add_a("mx2.remote.test", "127.0.0.1")
    service = await start_service(
        resolver={"nameservers": [dns_server.nameserver]}, delivery={"remote_port": sink.port}
    )
    await send(service, "alice@local.test", ["erin@remote.test"])
    await wait_until(lambda: sink.messages, what="delivery through the second MX")
    [event] = events_of(service, 4006)
    assert "127.0.0.2" in str(event["text"]) and "remote.test" in str(event["text"])


async def test_domain_that_does_not_exist_is_returned_at_once_with_5_4_4(
    start_service: StartService, dns_server: DnsServer
) -> None:
    service = await start_service(resolver={"nameservers": [dns_server.nameserver]})
    await send(service, "alice@local.test", ["nobody@no-such-domain.test"])
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    assert b"Status: 5.4.4" in ndr.read_bytes()
    [event] = events_of(service, 4000)
    assert event["cause"] == "dns-nxdomain"
    assert str(event["text"]).startswith("Message delivery to the remote domain 'no-such-domain.test' failed")


async def test_dns_server_failure_is_retried_not_returned(
    start_service: StartService, dns_server: DnsServer
) -> None:
    dns_server.set_servfail("broken.test")
    service = await start_service(
        resolver={"nameservers": [dns_server.nameserver]}, delivery={"retry": ["300ms"]}
    )
    await send(service, "alice@local.test", ["x@broken.test"])
    await wait_until(lambda: len(events_of(service, 4000)) >= 2, what="two failed attempts")
    assert {e["cause"] for e in events_of(service, 4000)} == {"dns-servfail"}
    assert drop_files(service) == []  # no NDR: transient
    [envelope] = service.queue.list()
    assert envelope.recipients[0].attempts >= 2


async def test_a_smart_host_dns_cannot_find_is_named_in_the_event_not_the_recipient_domain(
    start_service: StartService, dns_server: DnsServer
) -> None:
    dns_server.add_mx("internet.test", 10, "mx.internet.test")  # the recipient domain itself is fine
    dns_server.add_a("mx.internet.test", "127.0.0.1")
    service = await start_service(
        resolver={"nameservers": [dns_server.nameserver]},
        delivery={"smart_host": "relay.isp.test", "retry": ["1h"]},
    )
    await send(service, "alice@local.test", ["bob@internet.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the failed attempt")
    assert event["cause"] == "dns-nxdomain" and event["host"] == "relay.isp.test"
    assert event["domain"] == "internet.test" and event["status"] == "4.4.9"  # retried, not returned
    assert "smart host 'relay.isp.test'" in str(event["text"])
    assert drop_files(service) == []
    [envelope] = service.queue.list()
    assert "smart host 'relay.isp.test'" in envelope.recipients[0].last_reply


async def test_a_domain_dns_cannot_find_has_no_host_in_its_event(
    start_service: StartService, dns_server: DnsServer
) -> None:
    service = await start_service(resolver={"nameservers": [dns_server.nameserver]})
    await send(service, "alice@local.test", ["nobody@no-such-domain.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the failed attempt")
    assert "host" not in event and "smart host" not in str(event["text"])


async def test_null_sender_message_that_fails_goes_to_badmail_not_back_to_sender(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "", ["reject-me@remote.test"])
    await wait_until(lambda: badmail(service, ".bad"), what="a Badmail item")
    [bdr] = badmail(service, ".bdr")
    assert "5.1.1" in bdr.read_text()  # type: ignore[attr-defined]
    [bdp] = badmail(service, ".bdp")
    assert json.loads(bdp.read_text())["recipients"][0]["address"] == "reject-me@remote.test"  # type: ignore[attr-defined]
    assert drop_files(service) == [] and len(sink.messages) == 0
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_ndr_that_cannot_be_delivered_goes_to_badmail(start_service: StartService, sink: Sink) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "reject-sender@remote.test", ["reject-me@remote.test"])
    [bad] = await wait_until(lambda: badmail(service, ".bad"), what="the undeliverable NDR in Badmail")
    content = bad.read_bytes()  # type: ignore[attr-defined]
    assert b"multipart/report" in content and b"reject-me@remote.test" in content
    assert events_of(service, 3005)
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_invalid_pickup_file_goes_to_badmail_with_the_reason(start_service: StartService) -> None:
    service = await start_service()
    (service.folders["pickup"] / "broken.eml").write_bytes(b"To: b@local.test\r\n\r\nno sender\r\n")
    # The item is whole once both files are there (the .bad may be published after the .bdr).
    await wait_until(lambda: badmail(service, ".bdr") and badmail(service, ".bad"), what="the Badmail item")
    [bdr] = badmail(service, ".bdr")
    text = bdr.read_text()  # type: ignore[attr-defined]
    assert "0xC00402CE" in text and "no From header" in text
    [bad] = badmail(service, ".bad")
    assert bad.read_bytes() == b"To: b@local.test\r\n\r\nno sender\r\n"  # type: ignore[attr-defined]
    assert not (service.folders["pickup"] / "broken.eml").exists()


async def test_an_ndr_that_cannot_be_queued_is_retried_and_the_message_kept(
    start_service: StartService, sink: Sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["300ms"]})
    real_submit = service.ingest.submit_bytes
    calls: list[int] = []

    async def disk_full_once(message: bytes, fields: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise QueueError("cannot commit queue file: No space left on device")  # the one thing we fake
        return await real_submit(message, fields)  # type: ignore[arg-type]

    monkeypatch.setattr(service.ingest, "submit_bytes", disk_full_once)
    await send(service, "alice@local.test", ["reject-me@remote.test"])
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR on the second try")
    assert b"Status: 5.1.1" in ndr.read_bytes()
    assert len(calls) == 2
    assert any(e.get("cause") == "report-deferred" for e in events_of(service, 3004))
    assert sink.handler.rcpt_attempts.count("reject-me@remote.test") == 1  # the failure is not re-delivered
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_delay_notification_is_sent_once_while_the_message_stays_queued(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["10s"], "delay_notification": "1s"}
    )
    await send(service, "alice@local.test", ["defer-me@remote.test"])
    [report] = await wait_until(lambda: drop_files(service), what="the delay DSN")
    data = report.read_bytes()
    assert b"Action: delayed" in data and b"Will-Retry-Until:" in data
    assert parsed_status(data) == [("defer-me@remote.test", "delayed")]
    assert b"Delivery Status Notification (Delay)" in data
    assert events_of(service, 3003)
    [envelope] = [e for e in service.queue.list() if e.sender == "alice@local.test"]
    assert envelope.delay_notified and envelope.recipients[0].pending


async def test_notify_never_suppresses_the_delay_notification(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["10s"], "delay_notification": "1s"}
    )
    await send(service, "alice@local.test", ["defer-me@remote.test"], MESSAGE, rcpt_options=["NOTIFY=NEVER"])
    await wait_until(
        lambda: any(e.delay_notified for e in service.queue.list()),
        timeout=20,
        what="the delay point to pass",
    )
    assert drop_files(service) == []
    assert not events_of(service, 3003)


EIGHT_BIT = (
    "From: a@local.test\r\nTo: x@remote.test\r\nSubject: caf\u00e9\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 na\u00efve r\u00e9sum\u00e9\r\n"
).encode()


async def test_a_peer_without_8bitmime_receives_a_7bit_body_that_decodes_to_the_original(
    start_service: StartService, pipelining_peer: ScriptedServer
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{pipelining_peer.port}"})
    await send(service, "a@local.test", ["x@remote.test"], EIGHT_BIT, mail_options=["BODY=8BITMIME"])
    [wire] = await wait_until(lambda: pipelining_peer.messages, what="delivery")
    body = wire[: -len(b".\r\n")]  # the message ends with its own CRLF, then the dot line
    assert max(body) < 128  # nothing 8-bit on the wire
    received = email.message_from_bytes(body.split(b"\r\n", 3)[3], policy=email.policy.default)
    assert received["Subject"] == "caf\u00e9"
    assert received.get_content() == "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 na\u00efve r\u00e9sum\u00e9\r\n"
    assert all(c != "MAIL FROM:<a@local.test> BODY=8BITMIME" for c in pipelining_peer.lines)


async def test_a_peer_with_8bitmime_gets_the_message_untouched(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "a@local.test", ["x@remote.test"], EIGHT_BIT, mail_options=["BODY=8BITMIME"])
    await wait_until(lambda: sink.messages, what="delivery")
    assert sink.messages[0].content.endswith(EIGHT_BIT)


async def test_an_smtputf8_message_to_a_peer_without_smtputf8_is_returned_with_5_6_7(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(
        service,
        "a@local.test",
        ["j\u00f6rg@remote.test"],
        EIGHT_BIT,
        mail_options=["SMTPUTF8", "BODY=8BITMIME"],
    )
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    assert b"Status: 5.6.7" in ndr.read_bytes()
    assert not sink.messages


async def test_a_refused_recipient_is_logged_as_event_7004_in_iis_wording(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@local.test", ["reject-me@remote.test"])
    [event] = await wait_until(lambda: events_of(service, 7004), what="event 7004")
    assert str(event["text"]).startswith(
        f'The remote host "[127.0.0.1]:{sink.port}" responded to the SMTP command "RCPT" with "550 5.1.1'
    )
    assert str(event["text"]).endswith('The full command sent was "RCPT TO:<reject-me@remote.test>".')
    assert event["status"] == "5.1.1"


async def test_send_ndr_copy_to_gets_a_copy_of_every_ndr(start_service: StartService, sink: Sink) -> None:
    service = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "send_ndr_copy_to": "postmaster@local.test"}
    )
    await send(service, "alice@local.test", ["reject-me@remote.test"])
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    assert ndr.read_bytes().startswith(
        b"X-Sender: <>\r\nX-Receiver: <alice@local.test>\r\nX-Receiver: <postmaster@local.test>\r\n"
    )


async def test_notify_success_gets_a_relayed_report_from_a_peer_without_dsn(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@local.test", ["x@remote.test"], MESSAGE, rcpt_options=["NOTIFY=SUCCESS"])
    [report] = await wait_until(lambda: drop_files(service), what="the success DSN")
    data = report.read_bytes()
    assert b"Action: relayed" in data and b"Delivery Status Notification (Success)" in data
    assert parsed_status(data) == [("x@remote.test", "relayed")]


async def test_notify_success_passed_on_to_a_peer_with_dsn_gets_no_report_from_us(
    start_service: StartService,
) -> None:
    receiver = await start_service(domains={"local": ["remote.test"]})
    relay = await start_service(delivery={"smart_host": f"[127.0.0.1]:{smtp_port(receiver)}"})
    await send(relay, "alice@local.test", ["x@remote.test"], MESSAGE, rcpt_options=["NOTIFY=SUCCESS"])
    await wait_until(lambda: drop_files(receiver), what="delivery")
    await wait_until(lambda: queue_is_empty(relay), what="the relay to finish")
    assert drop_files(relay) == []  # the receiver took the request over (it advertises DSN)


BINARY_MESSAGE = (
    b"From: a@local.test\r\nTo: x@remote.test\r\nSubject: bin\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
    + bytes(range(256)) * 8
    + b"\r\n.\r\nno smuggling\n\r\x00\r\n"
)


async def bdat_submit(service: Service, message: bytes) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", smtp_port(service))
    for line in (b"EHLO c.test", b"MAIL FROM:<a@local.test> BODY=BINARYMIME", b"RCPT TO:<x@remote.test>"):
        writer.write(line + b"\r\n")
    writer.write(f"BDAT {len(message)} LAST\r\n".encode() + message + b"QUIT\r\n")
    replies = (await asyncio.wait_for(reader.read(), 30)).decode()
    assert "250 2.6.0" in replies, replies
    writer.close()


async def test_binarymime_goes_on_with_bdat_byte_for_byte_to_a_peer_that_takes_it(
    start_service: StartService,
) -> None:
    receiver = await start_service(domains={"local": ["remote.test"]})
    relay = await start_service(delivery={"smart_host": f"[127.0.0.1]:{smtp_port(receiver)}"})
    await bdat_submit(relay, BINARY_MESSAGE)
    [file] = await wait_until(lambda: drop_files(receiver), what="delivery with BDAT")
    assert file.read_bytes().endswith(BINARY_MESSAGE)


async def test_binarymime_to_a_peer_without_it_is_returned_with_5_6_3(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await bdat_submit(service, BINARY_MESSAGE)
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    assert b"Status: 5.6.3" in ndr.read_bytes()
    assert not sink.messages


async def test_a_destination_that_just_failed_is_not_hammered_by_the_next_message(
    start_service: StartService,
) -> None:
    service = await start_service(
        delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]}
    )  # nothing listens
    await send(service, "alice@local.test", ["x@remote.test"])
    await wait_until(lambda: events_of(service, 4006), what="the first failed connection")
    await send(service, "alice@local.test", ["y@remote.test"])
    second = await wait_until(
        lambda: [
            e
            for e in service.queue.list()
            if e.recipients[0].address == "y@remote.test"
            and e.recipients[0].next_attempt > e.received_at + 60
        ],
        what="the second message deferred with the destination",
    )
    assert second[0].recipients[0].attempts == 0  # no connection was tried for it
    assert len(events_of(service, 4006)) == 1
    [first] = [e for e in service.queue.list() if e.recipients[0].address == "x@remote.test"]
    assert first.transcripts and "connect failed" in "\n".join(first.transcripts[-1])  # kept with the message


async def test_etrn_makes_a_deferred_message_due_and_lifts_its_destination_s_backoff(
    start_service: StartService,
) -> None:
    service = await start_service(
        delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]}
    )  # nothing listens
    await send(service, "alice@local.test", ["x@remote.test"])
    [queue_id] = await wait_until(
        lambda: [e.id for e in service.queue.list() if e.recipients[0].attempts and not service.queue.leased],
        what="the first failed attempt",
    )
    assert await service.scheduler.etrn("Remote.Test.") == 1
    await wait_until(lambda: service.queue.get(queue_id).recipients[0].attempts == 2, what="the next attempt")
    assert len(events_of(service, 4006)) == 2  # the link was down for an hour: ETRN lifted that too


async def test_null_mx_is_returned_at_once_with_5_1_10(
    start_service: StartService, dns_server: DnsServer
) -> None:
    dns_server.add_mx("nomail.test", 0, ".")
    service = await start_service(resolver={"nameservers": [dns_server.nameserver]})
    await send(service, "alice@local.test", ["x@nomail.test"])
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    assert b"Status: 5.1.10" in ndr.read_bytes()
    assert [e["cause"] for e in events_of(service, 4000)] == ["null-mx"]


async def test_a_4xx_greeting_passes_the_message_to_the_next_mx(
    start_service: StartService, sink: Sink, dns_server: DnsServer
) -> None:
    async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.3.2 busy, try another MX\r\n")
        await writer.drain()
        writer.close()

    busy_server = await asyncio.start_server(busy, "127.0.0.2", sink.port)  # same port, another loopback IP
    try:
        dns_server.add_mx("remote.test", 10, "mx1.remote.test")
        dns_server.add_mx("remote.test", 20, "mx2.remote.test")
        dns_server.add_a("mx1.remote.test", "127.0.0.2")
        dns_server.add_a("mx2.remote.test", "127.0.0.1")
        service = await start_service(
            resolver={"nameservers": [dns_server.nameserver]}, delivery={"remote_port": sink.port}
        )
        await send(service, "alice@local.test", ["x@remote.test"])
        await wait_until(lambda: sink.messages, what="delivery through the second MX")
        [event] = events_of(service, 4006)
        assert "421 4.3.2 busy" in str(event["text"])
    finally:
        busy_server.close()


async def test_a_remote_reply_with_a_percent_sign_is_logged_and_reported(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    (service.folders["pickup"] / "pct.eml").write_bytes(
        b"X-Sender: <alice@local.test>\r\nX-Receiver: <reject%s%d@remote.test>\r\nSubject: p\r\n\r\nx\r\n"
    )
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR")
    assert b"reject%s%d@remote.test" in ndr.read_bytes()
    assert any("status=bounced" in str(e.get("track")) for e in events_of(service, 3004))


async def test_a_smart_host_failure_logs_event_4000_per_remote_domain(start_service: StartService) -> None:
    service = await start_service(delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]})
    await send(service, "alice@local.test", ["x@remote.test", "y@partner.test"])
    found = await wait_until(lambda: events_of(service, 4000), what="the failed attempt")
    assert sorted(e["domain"] for e in found) == ["partner.test", "remote.test"]
    assert {e["cause"] for e in found} == {"connection-failed"}
