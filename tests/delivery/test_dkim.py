"""DKIM signing by the running service: what a loopback peer receives verifies with dkimpy against the TXT
record the test DNS serves, and with our own verifier (tests/dkimcheck.py), also after the 7-bit
conversion; dual signing, the default signer, and a key that cannot be used."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import dkim as dkimpy
import pytest

from smtpsvc.config import load_config, render_effective
from smtpsvc.delivery import dkim
from tests.conftest import StartService, events_of, wait_until
from tests.dkimcheck import dkimpy_dnsfunc, verify_all
from tests.dnsserver import DnsServer
from tests.sink import Sink
from tests.test_delivery import EIGHT_BIT, ScriptedServer
from tests.test_relay import send

MESSAGE = (
    b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: quarterly   figures\r\n"
    b"Date: Fri, 4 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\n"
    b"first line  \r\n.leading dot\r\n\r\nlast line\r\n\r\n"
)


def make_key(tmp_path: Path, dns_server: DnsServer, domain: str, selector: str, algorithm: str) -> str:
    """A key file written as `smtpsvc dkim keygen` writes it, its record published; the [[dkim]] table."""
    pem = dkim.generate(algorithm)
    path = tmp_path / f"{domain}.{selector}.pem"
    path.write_bytes(pem)
    path.chmod(0o600)
    key = dkim.load_key(dkim.KeyRef(domain, selector, str(path), algorithm), pem, domain)
    dns_server.add_txt(f"{selector}._domainkey.{domain}", *dkim.txt_strings(dkim.record_value(key)))
    table = f'domain = "{domain}"\nselector = "{selector}"\nkey_file = "{path}"\nalgorithm = "{algorithm}"\n'
    return "[[dkim]]\n" + table


def dkimpy_verifies(message: bytes, dns_server: DnsServer) -> int:
    """How many of the message's signatures dkimpy verifies (each by its index)."""
    checker = dkimpy.DKIM(message)
    count = message.count(b"\r\nDKIM-Signature:") + message.startswith(b"DKIM-Signature:")
    for index in range(count):
        assert checker.verify(idx=index, dnsfunc=dkimpy_dnsfunc(dns_server)), f"signature {index}"
    return count


@pytest.fixture
async def peer_without_8bitmime() -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(ehlo=b"250-old.test\r\n250 PIPELINING\r\n")
    await server.start()
    yield server
    await server.stop()


def unstuffed(wire: bytes) -> bytes:
    """The message the peer got: the final dot line off, dot-stuffing undone."""
    body = wire[: -len(b".\r\n")]
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n"))


async def test_dual_signing_rsa_and_ed25519_verifies_with_dkimpy_and_independently(
    start_service: StartService, sink: Sink, dns_server: DnsServer, tmp_path: Path
) -> None:
    tables = make_key(tmp_path, dns_server, "example.test", "rsa1", "rsa-sha256")
    tables += make_key(tmp_path, dns_server, "example.test", "ed1", "ed25519-sha256")
    service = await start_service(tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@example.test", ["bob@remote.test"], MESSAGE)
    [received] = await wait_until(lambda: sink.handler.messages, what="delivery")
    wire = received.content
    assert dkimpy_verifies(wire, dns_server) == 2
    assert verify_all(wire, dns_server) == [
        "example.test/rsa1/rsa-sha256",
        "example.test/ed1/ed25519-sha256",
    ]
    first = wire.split(b"\r\n\r\n", 1)[0]
    assert b"h=from : from : to : to : subject : subject : date : date : message-id" in first.replace(
        b"\r\n", b""
    ).replace(b"\t", b" ").replace(b"  ", b" ")


async def test_an_8bit_message_converted_to_7bit_for_the_peer_still_verifies(
    start_service: StartService, peer_without_8bitmime: ScriptedServer, dns_server: DnsServer, tmp_path: Path
) -> None:
    tables = make_key(tmp_path, dns_server, "local.test", "s1", "rsa-sha256")
    tables += make_key(tmp_path, dns_server, "local.test", "s2", "ed25519-sha256")
    service = await start_service(
        tables, delivery={"smart_host": f"[127.0.0.1]:{peer_without_8bitmime.port}"}
    )
    await send(service, "a@local.test", ["x@remote.test"], EIGHT_BIT, mail_options=["BODY=8BITMIME"])
    [raw] = await wait_until(lambda: peer_without_8bitmime.messages, what="delivery")
    wire = unstuffed(raw)
    assert max(wire) < 128  # it was converted
    assert dkimpy_verifies(wire, dns_server) == 2
    assert verify_all(wire, dns_server) == ["local.test/s1/rsa-sha256", "local.test/s2/ed25519-sha256"]


async def test_the_default_signer_signs_for_a_from_domain_without_a_key_of_its_own(
    start_service: StartService, sink: Sink, dns_server: DnsServer, tmp_path: Path
) -> None:
    # The default key's record is published under the From: domain (d= is the From: domain: aligned).
    tables = make_key(tmp_path, dns_server, "example.test", "any", "rsa-sha256").replace(
        'domain = "example.test"', 'domain = "*"'
    )
    service = await start_service(tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@example.test", ["bob@remote.test"], MESSAGE)
    [received] = await wait_until(lambda: sink.handler.messages, what="delivery")
    assert verify_all(received.content, dns_server) == ["example.test/any/rsa-sha256"]
    assert dkimpy_verifies(received.content, dns_server) == 1


async def test_mail_from_a_domain_without_a_key_goes_unsigned(
    start_service: StartService, sink: Sink, dns_server: DnsServer, tmp_path: Path
) -> None:
    tables = make_key(tmp_path, dns_server, "other.test", "s1", "rsa-sha256")
    service = await start_service(tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@example.test", ["bob@remote.test"], MESSAGE)
    [received] = await wait_until(lambda: sink.handler.messages, what="delivery")
    assert b"DKIM-Signature" not in received.content


async def test_a_missing_key_file_defers_the_message_with_dkim_key_unusable(
    start_service: StartService, sink: Sink, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.pem"
    tables = f'[[dkim]]\ndomain = "example.test"\nselector = "s1"\nkey_file = "{missing}"\n'
    service = await start_service(tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@example.test", ["bob@remote.test"], MESSAGE)
    [event] = await wait_until(lambda: events_of(service, 4000), what="event 4000")
    assert event["cause"] == "dkim-key-unusable"
    assert str(missing) in event["text"] and "No such file" in event["text"]
    assert event["level"] == "warning"
    assert sink.handler.messages == []


async def test_send_unsigned_delivers_with_a_warning_when_the_key_is_not_a_key(
    start_service: StartService, sink: Sink, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LW5vdC1hLWtleQ==\n-----END PRIVATE KEY-----\n")
    tables = f'[[dkim]]\ndomain = "example.test"\nselector = "s1"\nkey_file = "{bad}"\n'
    service = await start_service(
        tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "dkim_on_error": "send-unsigned"}
    )
    await send(service, "alice@example.test", ["bob@remote.test"], MESSAGE)
    [received] = await wait_until(lambda: sink.handler.messages, what="delivery")
    assert b"DKIM-Signature" not in received.content
    [event] = events_of(service, 4000)
    assert event["cause"] == "dkim-key-unusable" and event["level"] == "warning"
    assert (
        "not a readable PEM private key" in event["text"] and "sent without a DKIM signature" in event["text"]
    )
    assert "c2VjcmV0" not in json.dumps(event)


async def test_an_ed25519_key_configured_as_rsa_is_named(tmp_path: Path) -> None:
    pem = dkim.generate("ed25519-sha256")
    with pytest.raises(dkim.KeyUnusable, match='is an Ed25519 key, but algorithm = "rsa-sha256"'):
        dkim.load_key(dkim.KeyRef("example.test", "s1", "k.pem", "rsa-sha256"), pem, "example.test")


async def test_the_private_key_is_never_in_events_logs_or_config_show(
    start_service: StartService, sink: Sink, dns_server: DnsServer, tmp_path: Path
) -> None:
    tables = make_key(tmp_path, dns_server, "example.test", "s1", "rsa-sha256")
    service = await start_service(tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@example.test", ["bob@remote.test"], MESSAGE)
    await wait_until(lambda: sink.handler.messages, what="delivery")
    pem = (tmp_path / "example.test.s1.pem").read_text()
    secret = "".join(pem.splitlines()[1:-1])[:40]
    service.events.flush()
    for path in service.folders["log"].rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace")
    shown = render_effective(load_config(service.config_path, env={}))
    assert "[[dkim]]" in shown and "key_file" in shown and secret not in shown


async def test_an_8bit_message_to_an_8bitmime_peer_is_signed_as_is_and_verifies(
    start_service: StartService, sink: Sink, dns_server: DnsServer, tmp_path: Path
) -> None:
    tables = make_key(tmp_path, dns_server, "local.test", "s1", "rsa-sha256")
    service = await start_service(tables, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "a@local.test", ["x@remote.test"], EIGHT_BIT, mail_options=["BODY=8BITMIME"])
    [received] = await wait_until(lambda: sink.handler.messages, what="delivery")
    assert max(received.content) >= 128  # not converted: the peer offers 8BITMIME
    assert verify_all(received.content, dns_server) == ["local.test/s1/rsa-sha256"]
    assert dkimpy_verifies(received.content, dns_server) == 1


def test_keys_are_chosen_by_the_from_domain_then_its_parents_then_the_default() -> None:
    keys = [
        dkim.KeyRef("example.test", "r", "r.pem", "rsa-sha256"),
        dkim.KeyRef("example.test", "e", "e.pem", "ed25519-sha256"),
        dkim.KeyRef("eu.example.test", "eu", "eu.pem", "rsa-sha256"),
        dkim.KeyRef("*", "any", "any.pem", "rsa-sha256"),
    ]
    assert [k.selector for k in dkim.keys_for("example.test", keys)] == ["r", "e"]
    assert [k.selector for k in dkim.keys_for("news.example.test", keys)] == ["r", "e"]
    assert [k.selector for k in dkim.keys_for("shop.eu.example.test", keys)] == ["eu"]
    assert [k.selector for k in dkim.keys_for("other.test", keys)] == ["any"]
    assert dkim.keys_for("other.test", keys[:3]) == []


def test_from_domain_reads_the_first_from_field_unfolded() -> None:
    headers = b'Received: from x\r\nFROM: "Doe, Jane"\r\n <Jane@Example.TEST>\r\nSubject: s\r\n'
    assert dkim.from_domain(headers) == "example.test"
    assert dkim.from_domain(b"Subject: none\r\n") is None


def test_signed_headers_over_sign_from_to_subject_date_and_list_the_rest_as_they_occur() -> None:
    headers = b"From: a@x\r\nTo: b@y\r\nCc: c@z\r\nReceived: r\r\nTo: d@y\r\nX-Other: o\r\n"
    assert dkim.signed_headers(headers) == [
        b"from", b"from", b"to", b"to", b"to", b"cc", b"subject", b"date",
    ]  # fmt: skip
