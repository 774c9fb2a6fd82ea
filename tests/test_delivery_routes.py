"""Outbound routes: connectors by address space and cost, after_direct smart host, TLS and AUTH to peers.
The peers are real: our own service (with a trustme certificate and an account) and aiosmtpd."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from smtpsvc.app import Service
from smtpsvc.auth.users import UserStore
from smtpsvc.delivery.smtp_session import client_tls_context
from tests.conftest import StartService, smtp_port, wait_until
from tests.dnsserver import DnsServer
from tests.sink import Sink
from tests.test_relay import MESSAGE, drop_files, queue_is_empty, send


class Tls:
    def __init__(self, tmp_path: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("relay.test", "127.0.0.1")
        self.pem = tmp_path / "server.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.pem))
        self.ca_pem = tmp_path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem))

    @property
    def section(self) -> dict[str, object]:
        return {"cert": str(self.pem), "key": str(self.pem)}


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tls]:
    material = Tls(tmp_path)
    monkeypatch.setenv(
        "SSL_CERT_FILE", str(material.ca_pem)
    )  # our client trusts the test CA, as a system would
    yield material


def users_file(tmp_path: Path, name: str, password: str) -> str:
    store = UserStore()
    store.add(name, password)
    path = tmp_path / f"users-{name}.toml"
    store.save(path)
    return str(path)


def connector(name: str, spaces: list[str], cost: int, hosts: str, **extra: object) -> str:
    spaces_toml = ", ".join(f'"{s}"' for s in spaces)
    lines = [f'[[connector]]\nname = "{name}"\naddress_spaces = [{spaces_toml}]\ncost = {cost}']
    lines.append(f'smart_hosts = ["{hosts}"]' if hosts else "smart_hosts = []")
    for key, value in extra.items():
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


async def test_connector_with_the_most_specific_address_space_wins(start_service: StartService) -> None:
    partner = Sink().start()
    other = Sink().start()
    try:
        text = connector("partners", ["*.partner.test"], 5, f"[127.0.0.1]:{partner.port}") + connector(
            "everything", ["*"], 1, f"[127.0.0.1]:{other.port}"
        )
        service = await start_service(_extra=text)
        await send(service, "alice@local.test", ["a@eu.partner.test", "b@elsewhere.test"])
        await wait_until(lambda: partner.messages and other.messages, what="both connectors used")
        assert partner.messages[0].rcpt_tos == ["a@eu.partner.test"]
        assert other.messages[0].rcpt_tos == ["b@elsewhere.test"]
    finally:
        partner.stop()
        other.stop()


async def test_when_a_connectors_smart_hosts_fail_the_next_cost_takes_over(
    start_service: StartService, sink: Sink
) -> None:
    text = connector("primary", ["remote.test"], 1, "[127.0.0.1]:9") + connector(
        "backup", ["remote.test"], 2, f"[127.0.0.1]:{sink.port}"
    )
    service = await start_service(_extra=text, delivery={"retry": ["1h"]})  # no retry within the test
    await send(service, "alice@local.test", ["x@remote.test"])
    await wait_until(lambda: sink.messages, what="delivery through the backup connector, in the same attempt")
    assert any("[127.0.0.1]:9" in str(e["text"]) for e in _events(service, 4006))  # the failed host is logged
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")


async def test_after_direct_uses_the_smart_host_when_dns_cannot_find_the_domain(
    start_service: StartService, sink: Sink, dns_server: DnsServer
) -> None:
    service = await start_service(
        resolver={"nameservers": [dns_server.nameserver]},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "smart_host_type": "after_direct"},
    )
    await send(service, "alice@local.test", ["x@unknown-to-dns.test"])
    await wait_until(lambda: sink.messages, what="delivery through the smart host")
    assert ("unknown-to-dns.test", "MX") in dns_server.queries  # DNS was tried first


async def test_opportunistic_tls_upgrades_and_the_peer_sees_esmtps(
    start_service: StartService, tls: Tls
) -> None:
    receiver = await start_service(domains={"local": ["remote.test"]}, tls=tls.section)
    relay = await start_service(delivery={"smart_host": f"[127.0.0.1]:{smtp_port(receiver)}"})
    await send(relay, "alice@local.test", ["x@remote.test"])
    [file] = await wait_until(lambda: drop_files(receiver), what="delivery over TLS")
    assert b"with ESMTPS id" in file.read_bytes()


async def test_required_tls_refuses_a_peer_without_starttls_and_retries(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "tls": "required", "retry": ["300ms"]}
    )
    await send(service, "alice@local.test", ["x@remote.test"])
    await wait_until(lambda: _events(service, 4006), what="a refused attempt")
    assert not sink.messages  # never sent in plaintext
    assert any("STARTTLS" in str(e["text"]) for e in _events(service, 4006))
    [envelope] = service.queue.list()
    assert envelope.recipients[0].pending


async def test_required_tls_verifies_the_certificate_and_delivers(
    start_service: StartService, tls: Tls
) -> None:
    receiver = await start_service(domains={"local": ["remote.test"]}, tls=tls.section)
    relay = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{smtp_port(receiver)}", "tls": "required"}
    )
    await send(relay, "alice@local.test", ["x@remote.test"])
    await wait_until(lambda: drop_files(receiver), what="delivery over verified TLS")


async def test_smart_host_auth_over_tls(start_service: StartService, tls: Tls, tmp_path: Path) -> None:
    receiver = await start_service(
        domains={"local": ["remote.test"]},
        tls=tls.section,
        auth={"users_file": users_file(tmp_path, "relayuser", "pa55word")},
    )
    secret = tmp_path / "relay.secret"
    secret.write_text("pa55word\n")
    text = connector(
        "isp",
        ["*"],
        1,
        f"[127.0.0.1]:{smtp_port(receiver)}",
        auth=f'{{ user = "relayuser", password_file = "{secret}" }}',
    )
    relay = await start_service(_extra=text)
    await send(relay, "alice@local.test", ["x@remote.test"])
    [file] = await wait_until(lambda: drop_files(receiver), what="authenticated delivery")
    data = file.read_bytes()
    assert b"(Authenticated sender: relayuser)" in data and b"with ESMTPSA" in data
    relay.events.flush()
    log = (relay.folders["log"] / "events.jsonl").read_text()
    assert "pa55word" not in log and "pa55word" not in "\n".join(
        line for t in relay.scheduler.transcripts.values() for line in t
    )


def _events(service: Service, event_id: int) -> list[dict[str, object]]:
    service.events.flush()
    path = service.folders["log"] / "events.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["id"] == event_id]


def test_client_tls_context_policies() -> None:
    assert client_tls_context("required").verify_mode == ssl.CERT_REQUIRED
    assert client_tls_context("opportunistic").verify_mode == ssl.CERT_NONE


async def test_25_messages_to_one_host_use_two_connections_of_20_and_5(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(
        delivery={
            "smart_host": f"[127.0.0.1]:{sink.port}",
            "max_messages_per_connection": 20,
            "max_connections_per_domain": 1,
        }
    )
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(service), timeout=30)
    await client.connect()
    for n in range(25):
        await client.sendmail("alice@local.test", [f"r{n}@remote.test"], MESSAGE)
    await client.quit()
    await wait_until(lambda: len(sink.messages) == 25, timeout=60, what="25 deliveries")
    assert service.smtp_transport.connections_opened == 2
    assert sink.connections == 2


async def test_smart_host_auth_login_when_the_peer_offers_only_login(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    receiver = await start_service(
        domains={"local": ["remote.test"]},
        tls=tls.section,
        auth={"users_file": users_file(tmp_path, "relayuser", "pa+5/w=rd"), "mechanisms": ["LOGIN"]},
    )
    secret = tmp_path / "relay.secret"
    secret.write_text("pa+5/w=rd\n")
    text = connector(
        "isp",
        ["*"],
        1,
        f"[127.0.0.1]:{smtp_port(receiver)}",
        auth=f'{{ user = "relayuser", password_file = "{secret}" }}',
    )
    relay = await start_service(_extra=text, delivery={"retry": ["1h"]})
    await send(relay, "alice@local.test", ["x@remote.test"])
    [file] = await wait_until(lambda: drop_files(receiver), what="delivery after AUTH LOGIN")
    assert b"(Authenticated sender: relayuser)" in file.read_bytes()
    # the finished message's transcript lives on in the pooled connection for a few seconds
    idle = relay.smtp_transport.idle_sessions()
    transcript = "\n".join(line for session in idle for line in session.transcript)
    assert "AUTH LOGIN" in transcript and "<AUTH response redacted>" in transcript
    assert "cGErNS93PXJk" not in transcript and "cmVsYXl1c2Vy" not in transcript  # base64 password and user
