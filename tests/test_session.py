"""The inbound service on real sockets: banner, EHLO, pipelining, limits, timeouts, hostile input, events."""

from __future__ import annotations

import asyncio
import socket

from smtpsvc.app import Service
from tests.conftest import StartService, events_of, smtp_port, wait_events, wait_until
from tests.dnsserver import DnsServer
from tests.rawclient import RawClient


async def greeted(service: Service) -> RawClient:
    client = await RawClient.connect(smtp_port(service))
    assert (await client.reply()).startswith("220 relay.test smtpsvc ESMTP ready")
    assert (await client.command("EHLO client.test")).startswith("250-relay.test Hello [127.0.0.1]")
    return client


async def test_ehlo_advertises_the_enabled_extensions(start_service: StartService) -> None:
    service = await start_service()
    client = await RawClient.connect(smtp_port(service))
    await client.reply()
    lines = (await client.command("EHLO client.test")).split("\n")
    keywords = {line[4:] for line in lines[1:]}
    assert {"PIPELINING", "SIZE 2097152", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "DSN"} <= keywords
    await client.close()


async def test_verb_mask_without_8bitmime_stops_advertising_and_accepting_it(
    start_service: StartService,
) -> None:
    service = await start_service(server={"inbound_command_support_options": 3503297})
    client = await greeted(service)
    lines = (await client.command("EHLO client.test")).split("\n")
    assert not any("8BITMIME" in line for line in lines)
    assert (await client.command("MAIL FROM:<a@local.test> BODY=8BITMIME")).startswith("555 5.5.4")
    await client.close()


async def test_pipelined_transaction_gets_replies_in_order_and_is_queued(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    await client.send(
        b"MAIL FROM:<a@local.test>\r\nRCPT TO:<b@local.test>\r\nRCPT TO:<c@local.test>\r\nDATA\r\n"
    )
    assert (await client.reply()).startswith("250 2.1.0")
    assert (await client.reply()).startswith("250 2.1.5 <b@local.test>")
    assert (await client.reply()).startswith("250 2.1.5 <c@local.test>")
    assert (await client.reply()).startswith("354")
    await client.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    assert (await client.reply()).startswith("221 2.0.0")
    await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="delivery")


async def test_smuggled_end_of_data_with_bare_line_feeds_does_not_end_the_message(
    start_service: StartService,
) -> None:
    service = await start_service()
    client = await greeted(service)
    for line in ("MAIL FROM:<a@local.test>", "RCPT TO:<b@local.test>"):
        assert (await client.command(line)).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: s\r\n\r\nbefore\n.\nMAIL FROM:<evil@local.test>\r\nafter\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    [drop] = await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="delivery")
    data = drop.read_bytes()
    assert data.endswith(
        b"before\r\n.\r\nMAIL FROM:<evil@local.test>\r\nafter\r\n"
    )  # one message, all content
    await client.close()


async def test_too_many_recipients_get_452(start_service: StartService) -> None:
    service = await start_service(server={"max_recipients": 2})
    client = await greeted(service)
    await client.command("MAIL FROM:<a@local.test>")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<c@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<d@local.test>")).startswith("452 4.5.3")
    await client.close()


async def test_oversize_message_is_drained_then_refused_with_552_and_not_queued(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_message_size": 10_000})
    client = await greeted(service)
    await client.command("MAIL FROM:<a@local.test>")
    await client.command("RCPT TO:<b@local.test>")
    await client.command("DATA")
    await client.send(b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 30 + b".\r\n")
    assert (await client.reply()).startswith("552 5.3.4")
    assert (await client.command("NOOP")).startswith("250")  # the session goes on
    assert service.queue.list() == []
    assert list(service.queue.tmp_dir.iterdir()) == []
    await client.close()


async def test_declared_size_over_the_limit_is_refused_at_mail(start_service: StartService) -> None:
    service = await start_service(server={"max_message_size": 10_000})
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test> SIZE=20000")).startswith("552 5.3.4")
    await client.close()


async def test_commands_out_of_sequence_get_503(start_service: StartService) -> None:
    service = await start_service()
    client = await RawClient.connect(smtp_port(service))
    await client.reply()
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("503 5.5.1")
    await client.command("EHLO c")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("503 5.5.1")
    assert (await client.command("DATA")).startswith("503 5.5.1")
    assert (await client.command("BOGUS")).startswith("500 5.5.1")
    await client.close()


async def test_connection_limit_answers_421_and_logs_event_402(start_service: StartService) -> None:
    service = await start_service(server={"max_connections": 1})
    first = await greeted(service)
    second = await RawClient.connect(smtp_port(service))
    assert (await second.reply()).startswith("421 4.7.0")
    assert await second.closed()
    [event] = await wait_events(service, 402)
    assert event["text"] == "The maximum number of allowed inbound connections (1) has been reached."
    await first.close()


async def test_idle_session_is_closed_with_421_after_connection_timeout(start_service: StartService) -> None:
    service = await start_service(server={"connection_timeout": "500ms"})
    client = await greeted(service)
    assert (await client.reply(timeout=10)).startswith("421 4.4.2")
    assert await client.closed()


async def test_a_client_trickling_one_command_is_cut_at_the_deadline(start_service: StartService) -> None:
    service = await start_service(server={"connection_timeout": "1s"})
    client = await greeted(service)
    answer = asyncio.ensure_future(client.reply(timeout=10))
    for byte in b"MAIL FROM:<a@local.test":  # one byte every 100 ms, never completing the line
        if answer.done():
            break
        await client.send(bytes([byte]))
        await asyncio.sleep(0.1)  # the trickle itself, not a wait for a condition
    assert (await answer).startswith("421 4.4.2")


async def test_a_client_that_stops_reading_our_replies_is_cut_at_the_deadline(
    start_service: StartService,
) -> None:
    """A client pipelines NOOPs and never reads a reply: once our replies fill the socket and the
    transport's buffer, the session waits to write, and that wait ends at the deadline too (no session
    held forever by a client that only sends)."""
    service = await start_service(server={"connection_timeout": "1s"})
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: our replies back up soon
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", smtp_port(service)))
        await wait_until(lambda: service.smtp.active_sessions == 1, what="the session")
        flood = b"EHLO client.test\r\n" + b"NOOP\r\n" * 700_000  # 4.2 MB in, 9.8 MB of replies out
        sent, stop_at = 0, loop.time() + 10
        while sent < len(flood) and loop.time() < stop_at:  # bounded: what the server takes in 10 s
            try:
                sent += sock.send(flood[sent : sent + 65536])
            except BlockingIOError:
                await asyncio.sleep(0.01)  # the server's receive window is full: it is writing, not reading
        await wait_until(lambda: service.smtp.active_sessions == 0, timeout=30, what="the session to end")
    finally:
        sock.close()


async def test_too_many_bad_commands_end_the_session(start_service: StartService) -> None:
    service = await start_service(server={"max_errors": 3})
    client = await greeted(service)
    assert (await client.command("XYZZY")).startswith("500")
    assert (await client.command("XYZZY")).startswith("500")
    assert (await client.command("XYZZY")).startswith("421 4.7.0")
    assert await client.closed()


async def test_an_http_request_at_the_command_prompt_closes_the_connection(
    start_service: StartService,
) -> None:
    service = await start_service()
    client = await RawClient.connect(smtp_port(service))
    await client.reply()
    assert (await client.command("GET / HTTP/1.1")).startswith("421")
    assert await client.closed()


async def test_service_stop_tells_idle_clients_421(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    await service.stop()
    assert (await client.reply()).startswith("421 4.3.2")
    assert await client.closed()


async def test_queued_and_delivered_messages_are_logged_as_3001_and_3002(start_service: StartService) -> None:
    service = await start_service()
    client = await greeted(service)
    await client.command("MAIL FROM:<a@local.test>")
    await client.command("RCPT TO:<b@local.test>")
    await client.command("DATA")
    await client.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
    reply = await client.reply()
    queue_id = reply.split("<", 1)[1].split(">", 1)[0]
    await wait_until(lambda: events_of(service, 3002), what="event 3002")
    [queued] = [e for e in await wait_events(service, 3001) if e.get("queue_id") == queue_id]
    assert "from=<a@local.test>" in str(queued["track"])
    [delivered] = [e for e in events_of(service, 3002) if e.get("queue_id") == queue_id]
    assert "to=<b@local.test>, relay=drop" in str(delivered["track"])
    assert "status=sent" in str(delivered["track"])
    await client.close()


async def test_bare_postmaster_is_this_servers_postmaster(start_service: StartService) -> None:
    service = await start_service(relay={"allow": []})
    client = await greeted(service)
    await client.command("MAIL FROM:<someone@elsewhere.test>")
    assert (await client.command("RCPT TO:<Postmaster>")).startswith("250")
    await client.command("DATA")
    await client.send(b"Subject: help\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    [drop] = await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="delivery")
    assert b"X-Receiver: <Postmaster@local.test>\r\n" in drop.read_bytes()
    await client.close()


async def transact(client: RawClient, sender: str, rcpt: str, message: bytes) -> str:
    assert (await client.command(f"MAIL FROM:<{sender}>")).startswith("250")
    assert (await client.command(f"RCPT TO:<{rcpt}>")).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(message + b".\r\n")
    return await client.reply()


async def send_after_ehlo(service: Service, helo: str, message: bytes) -> str:
    """One message on a connection of its own after `EHLO helo`; the reply to its data."""
    client = await RawClient.connect(smtp_port(service))
    await client.reply()
    await client.command(f"EHLO {helo}")
    reply = await transact(client, "a@local.test", "b@local.test", message)
    await client.close()
    return reply


async def test_a_message_with_too_many_received_lines_is_refused_as_a_loop(
    start_service: StartService,
) -> None:
    service = await start_service(server={"max_hop_count": 3})
    client = await greeted(service)
    looped = b"Received: from a\r\n" * 4 + b"Subject: loop\r\n\r\nbody\r\n"
    assert (await transact(client, "a@local.test", "b@local.test", looped)).startswith("554 5.4.6")
    ok = b"Received: from a\r\n" * 3 + b"Subject: fine\r\n\r\nbody\r\n"
    assert (await transact(client, "a@local.test", "b@local.test", ok)).startswith("250 2.6.0")
    await client.close()


async def test_session_size_limit_refuses_the_message_that_crosses_it(start_service: StartService) -> None:
    service = await start_service(server={"max_session_size": 4500})
    client = await greeted(service)
    message = b"Subject: s\r\n\r\n" + (b"x" * 98 + b"\r\n") * 15
    assert (await transact(client, "a@local.test", "b@local.test", message)).startswith("250")
    assert (await transact(client, "a@local.test", "b@local.test", message)).startswith("250")
    assert (await transact(client, "a@local.test", "b@local.test", message)).startswith("552 5.3.4")
    assert list(service.queue.tmp_dir.iterdir()) == []
    fresh = await greeted(service)  # a new session starts a new allowance
    assert (await transact(fresh, "a@local.test", "b@local.test", message)).startswith("250")
    await client.close()
    await fresh.close()


async def test_masquerade_domain_replaces_a_local_sender_domain(start_service: StartService) -> None:
    service = await start_service(server={"masquerade_domain": "corp.example"})
    client = await greeted(service)
    assert (await transact(client, "app@local.test", "b@local.test", b"Subject: m\r\n\r\nx\r\n")).startswith(
        "250"
    )
    assert (await transact(client, "ext@other.test", "b@local.test", b"Subject: m\r\n\r\nx\r\n")).startswith(
        "250"
    )
    drops = await wait_until(
        lambda: (
            len(list(service.folders["drop"].glob("*.eml"))) == 2
            and sorted(service.folders["drop"].glob("*.eml"))
        ),
        what="two deliveries",
    )
    senders = sorted(p.read_bytes().split(b"\r\n", 1)[0] for p in drops)
    assert senders == [b"X-Sender: <app@corp.example>", b"X-Sender: <ext@other.test>"]
    await client.close()


async def test_dsn_parameters_are_kept_decoded_per_recipient(start_service: StartService) -> None:
    service = await start_service(delivery={"smart_host": "[127.0.0.1]:9"}, server={})  # nothing listens on 9
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<a@local.test> RET=HDRS ENVID=job+2B42")).startswith("250")
    assert (
        await client.command("RCPT TO:<x@remote.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x+40remote.test")
    ).startswith("250")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: d\r\n\r\nx\r\n.\r\n")
    assert (await client.reply()).startswith("250")
    [envelope] = await wait_until(service.queue.list, what="the queued message")
    assert (envelope.ret, envelope.envid) == ("HDRS", "job+42")
    assert envelope.recipients[0].notify == ("FAILURE", "DELAY")
    assert envelope.recipients[0].orcpt == "rfc822;x@remote.test"
    await client.close()


async def test_reverse_dns_marks_a_helo_that_the_ptr_does_not_confirm_as_unverified(
    start_service: StartService, dns_server: DnsServer
) -> None:
    dns_server.add_ptr("127.0.0.1", "client.test")
    service = await start_service(
        server={"reverse_dns": True}, resolver={"nameservers": [dns_server.nameserver]}
    )

    def drop_with(text: bytes) -> bool:
        return any(text in p.read_bytes() for p in service.folders["drop"].glob("*.eml"))

    for helo, expected in (
        ("client.test", b"Received: from client.test ([127.0.0.1])\r\n"),
        ("liar.test", b"Received: from liar.test ([127.0.0.1] unverified)\r\n"),
    ):
        assert (await send_after_ehlo(service, helo, b"Subject: r\r\n\r\nx\r\n")).startswith("250")
        await wait_until(
            lambda expected=expected: drop_with(expected), what=f"the Received header for {helo}"
        )


async def test_vrfy_is_252_when_enabled_and_502_otherwise(start_service: StartService) -> None:
    on = await start_service(extensions={"vrfy": True})
    client = await greeted(on)
    assert (await client.command("VRFY someone")).startswith("252 2.1.5")
    assert (await client.command("EXPN staff")).startswith("502")
    await client.close()
    off = await start_service()
    client = await greeted(off)
    assert (await client.command("VRFY someone")).startswith("502")
    await client.close()
