"""MTA-STS enforcement and TLS reporting end to end, every part real: the test DNS server (MX, A and TXT
records), an HTTPS policy server (trustme CA, given as delivery.mta_sts_ca_file), and our own service as the
MX host, with a certificate that does or does not name it (the same CA, trusted as a system CA would be)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from smtpsvc.app import Service
from smtpsvc.cli import main
from tests.conftest import StartService, events_of, smtp_port, wait_until
from tests.delivery.policyserver import PolicyServer
from tests.dnsserver import DnsServer
from tests.sink import Sink
from tests.test_relay import drop_files, send


def policy(mode: str, *mx: str) -> str:
    return "\r\n".join(["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400", ""])


@dataclass
class World:
    tmp_path: Path
    ca: trustme.CA
    ca_file: Path
    dns: DnsServer
    policy_server: PolicyServer
    start_service: StartService

    async def receiver(self, *names: str) -> Service:
        """The MX host mx.example.test: our service, its certificate for `names`, example.test local."""
        pem = self.tmp_path / f"mx-{'-'.join(names)}.pem"
        self.ca.issue_cert(*names).private_key_and_cert_chain_pem.write_to_path(str(pem))
        return await self.start_service(
            domains={"local": ["example.test"]}, tls={"cert": str(pem), "key": str(pem)}
        )

    async def relay(self, receiver: Service) -> Service:
        """smtpsvc delivering by MX with the default tls = "dane-or-mta-sts"; reports.test is local (the
        TLS reports land in its Drop folder)."""
        return await self.start_service(
            domains={"local": ["local.test", "reports.test"]},
            resolver={"nameservers": [self.dns.nameserver]},
            delivery={
                "remote_port": smtp_port(receiver),
                "mta_sts_ca_file": str(self.ca_file),
                "mta_sts_port": self.policy_server.port,
                "retry": ["1h"],  # no second attempt within a test
            },
        )


@pytest.fixture
async def world(
    tmp_path: Path, dns_server: DnsServer, start_service: StartService, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[World]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the MX host's certificate: trusted as a system CA
    dns_server.add_mx("example.test", 10, "mx.example.test")
    dns_server.add_a("mx.example.test", "127.0.0.1")
    dns_server.add_txt("_mta-sts.example.test", "v=STSv1; id=20261204")
    dns_server.add_a("mta-sts.example.test", "127.0.0.1")
    dns_server.add_txt("_smtp._tls.example.test", "v=TLSRPTv1; rua=mailto:tls-reports@reports.test")
    with PolicyServer(ca, "mta-sts.example.test") as server:
        yield World(tmp_path, ca, ca_file, dns_server, server, start_service)


def causes(service: Service, event_id: int) -> list[str]:
    return [str(e.get("cause", "")) for e in events_of(service, event_id)]


async def test_enforce_refuses_an_mx_host_outside_the_policy(world: World) -> None:
    world.policy_server.policy = policy("enforce", "mx.elsewhere.test")
    receiver = await world.receiver("mx.example.test")
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: "mta-sts-mx-mismatch" in causes(relay, 4000), what="the deferral (event 4000)")
    assert not drop_files(receiver)
    [failed] = [e for e in events_of(relay, 4006) if e.get("cause") == "mta-sts-mx-mismatch"]
    assert "MTA-STS policy of example.test (mode enforce) does not list mx.example.test" in failed["text"]
    [envelope] = relay.queue.list()
    assert envelope.recipients[0].pending  # deferred, not bounced
    assert relay.tls_counts.domains["example.test"]["failures"] == {
        "validation-failure|mx.example.test|127.0.0.1": 1
    }


async def test_enforce_refuses_a_certificate_that_does_not_name_the_mx_host(world: World) -> None:
    world.policy_server.policy = policy("enforce", "mx.example.test")
    receiver = await world.receiver("wrong.example.test")
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: "mta-sts-certificate" in causes(relay, 4000), what="the deferral (event 4000)")
    assert not drop_files(receiver)
    [failed] = [e for e in events_of(relay, 4006) if e.get("cause") == "mta-sts-certificate"]
    assert "demands a valid certificate for mx.example.test" in failed["text"]
    assert relay.queue.list()[0].recipients[0].pending


async def test_enforce_delivers_over_verified_tls_and_counts_the_session(world: World) -> None:
    world.policy_server.policy = policy("enforce", "*.example.test")
    receiver = await world.receiver("mx.example.test")
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    [file] = await wait_until(lambda: drop_files(receiver), what="delivery over verified TLS")
    assert b"with ESMTPS id" in file.read_bytes()
    assert relay.tls_counts.domains["example.test"]["success"] == 1
    assert (relay.folders["queue"] / "mta-sts.json").exists()  # the policy, cached in the mailroot


async def test_testing_delivers_records_the_failure_and_the_report_reaches_the_rua(world: World) -> None:
    world.policy_server.policy = policy("testing", "mx.example.test")
    receiver = await world.receiver("wrong.example.test")
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: drop_files(receiver), what="delivery despite the testing-mode failure")
    [warning] = [e for e in events_of(relay, 4006) if e.get("cause") == "mta-sts-certificate"]
    assert warning["level"] == "warning" and "delivered anyway (testing)" in warning["text"]
    assert not causes(relay, 4000)

    assert await relay.tlsrpt.send_now() == 1
    [report_file] = await wait_until(
        lambda: drop_files(relay), what="the TLS report in the rua's Drop folder"
    )
    message = email.message_from_bytes(report_file.read_bytes(), policy=email.policy.default)
    assert message["TLS-Report-Domain"] == "example.test"
    assert message["TLS-Report-Submitter"] == "relay.test"
    assert message["Subject"].startswith("Report Domain: example.test Submitter: relay.test Report-ID: <")
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "tlsrpt"
    [attachment] = [
        p for p in message.iter_attachments() if p.get_content_type() == "application/tlsrpt+gzip"
    ]
    report = json.loads(gzip.decompress(attachment.get_content()))
    assert set(report) == {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    [entry] = report["policies"]
    assert entry["policy"]["policy-type"] == "sts"
    assert entry["policy"]["policy-domain"] == "example.test"
    assert entry["policy"]["mx-host"] == ["mx.example.test"]
    assert "mode: testing" in entry["policy"]["policy-string"]
    assert entry["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    assert entry["failure-details"] == [
        {
            "result-type": "certificate-host-mismatch",
            "receiving-mx-hostname": "mx.example.test",
            "receiving-ip": "127.0.0.1",
            "failed-session-count": 1,
        }
    ]
    assert relay.tls_counts.domains == {}  # sent: counting starts anew


async def test_probe_policy_and_tlsrpt_show_tell_the_administrator(world: World) -> None:
    world.policy_server.policy = policy("enforce", "mx.example.test")
    receiver = await world.receiver("mx.example.test")
    relay = await world.relay(receiver)
    assert relay.config_path is not None
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: drop_files(receiver), what="delivery")
    relay.tls_counts.save()  # the service saves every minute; the test does not wait for it
    runner = CliRunner()
    shown = await asyncio.to_thread(runner.invoke, main, ["tlsrpt", "show", "-c", relay.config_path])
    assert shown.exit_code == 0, shown.output
    assert "example.test: 1 successful, 0 failed" in shown.output
    probed = await asyncio.to_thread(
        runner.invoke, main, ["probe", "example.test", "--policy", "-c", relay.config_path]
    )
    assert probed.exit_code == 0, probed.output
    assert "MX hosts:    mx.example.test" in probed.output
    assert "MTA-STS:     TXT id 20261204" in probed.output
    assert "policy:      mode enforce, max_age 86400s, mx mx.example.test" in probed.output
    assert "TLS-RPT:     reports to mailto:tls-reports@reports.test" in probed.output
    assert "enforce: only mx.example.test over TLS with a valid certificate" in probed.output
    assert "DANE:        mx.example.test: not applied (the MX or address answers" in probed.output
    assert "Traceback" not in probed.output


async def test_enforce_refuses_an_mx_host_without_starttls(world: World, sink: Sink) -> None:
    world.policy_server.policy = policy("enforce", "mx.example.test")
    relay = await world.start_service(
        resolver={"nameservers": [world.dns.nameserver]},
        delivery={
            "remote_port": sink.port,  # aiosmtpd without STARTTLS
            "mta_sts_ca_file": str(world.ca_file),
            "mta_sts_port": world.policy_server.port,
            "retry": ["1h"],
        },
    )
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: "mta-sts-tls-required" in causes(relay, 4000), what="the deferral (event 4000)")
    assert not sink.messages  # never in plaintext
    [failed] = [e for e in events_of(relay, 4006) if e.get("cause") == "mta-sts-tls-required"]
    assert "MTA-STS policy of example.test (mode enforce) demands TLS" in failed["text"]
    assert relay.tls_counts.domains["example.test"]["failures"] == {
        "starttls-not-supported|mx.example.test|127.0.0.1": 1
    }


async def test_testing_delivers_to_an_mx_host_outside_the_policy_and_warns(world: World) -> None:
    world.policy_server.policy = policy("testing", "mx.elsewhere.test")
    receiver = await world.receiver("mx.example.test")
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: drop_files(receiver), what="delivery despite the mismatch (testing)")
    [warning] = [e for e in events_of(relay, 4006) if e.get("cause") == "mta-sts-mx-mismatch"]
    assert warning["level"] == "warning"
    entry = relay.tls_counts.domains["example.test"]
    assert entry["failures"] == {"validation-failure|mx.example.test|127.0.0.1": 1}
    assert entry["success"] == 1  # the TLS session itself met the policy


async def test_without_a_published_policy_delivery_stays_opportunistic(world: World) -> None:
    world.dns.remove("_mta-sts.example.test")
    receiver = await world.receiver("wrong.example.test")  # a certificate no policy asks about
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: drop_files(receiver), what="opportunistic delivery")
    assert world.policy_server.requests == []  # nothing published: nothing fetched
    assert relay.tls_counts.domains == {}


async def test_a_policy_that_cannot_be_fetched_is_reported_and_mail_goes_opportunistically(
    world: World,
) -> None:
    world.policy_server.status = 404
    receiver = await world.receiver("wrong.example.test")
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: drop_files(receiver), what="opportunistic delivery")
    [warning] = [e for e in events_of(relay, 4000) if e.get("cause") == "mta-sts-policy-unavailable"]
    assert warning["level"] == "warning"
    assert "answered HTTP 404, not 200" in warning["text"]
    assert "opportunistic TLS" in warning["text"]
    assert "Traceback" not in warning["text"]


def tlsa_spki_sha256(pem_path: Path) -> bytes:
    """The DANE-EE(3) SPKI(1) SHA-256(1) data of the first certificate in a PEM file."""
    certificate = x509.load_pem_x509_certificate(pem_path.read_bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


async def test_dane_wins_over_mta_sts_where_both_are_published(world: World) -> None:
    """A signed zone with TLSA records and an MTA-STS policy in mode enforce (RFC 8461 §2): the host is
    judged by DANE. A certificate that does not name the MX host fails MTA-STS but matches its TLSA record
    (DANE-EE ignores names): delivered."""
    world.policy_server.policy = policy("enforce", "mx.example.test")
    receiver = await world.receiver("wrong.example.test")
    pem = world.tmp_path / "mx-wrong.example.test.pem"
    world.dns.sign_zone("example.test")
    world.dns.add_tlsa(f"_{smtp_port(receiver)}._tcp.mx.example.test", 3, 1, 1, tlsa_spki_sha256(pem))
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: drop_files(receiver), what="delivery verified by DANE")
    assert "mta-sts-certificate" not in causes(relay, 4006)
    assert relay.config_path is not None
    probed = await asyncio.to_thread(
        CliRunner().invoke, main, ["probe", "example.test", "--policy", "-c", relay.config_path]
    )
    assert probed.exit_code == 0, probed.output
    assert "DANE:        mx.example.test: applies: 1 signed TLSA record(s)" in probed.output
    assert "DANE wins for mx.example.test" in probed.output


async def test_a_dane_mismatch_is_not_rescued_by_a_valid_mta_sts_certificate(world: World) -> None:
    world.policy_server.policy = policy("enforce", "mx.example.test")
    receiver = await world.receiver("mx.example.test")  # valid for MTA-STS
    world.dns.sign_zone("example.test")
    world.dns.add_tlsa(f"_{smtp_port(receiver)}._tcp.mx.example.test", 3, 1, 1, b"\x00" * 32)
    relay = await world.relay(receiver)
    await send(relay, "alice@local.test", ["bob@example.test"])
    await wait_until(lambda: "dane-mismatch" in causes(relay, 4006), what="the DANE mismatch (event 4006)")
    assert not drop_files(receiver)
    assert relay.queue.list()[0].recipients[0].pending
