"""DANE for SMTP (RFC 7672) through the real service: MX routing against the test DNS (answers with the AD
bit where the zone is signed), an aiosmtpd peer with STARTTLS presenting trustme certificates, the message
submitted over SMTP. A DANE-EE match delivers over TLS; a mismatch, or a peer without STARTTLS, defers the
message with the named cause and nothing reaches the peer; TLSA records without the AD bit, or under an
unsigned MX, are ignored (opportunistic TLS, delivered); DANE-TA with the trust anchor in the presented
chain (an intermediate, or the root sent along) delivers when the leaf names the MX host."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smtpsvc.app import Service
from tests.conftest import events_of, smtp_port, wait_until
from tests.delivery.test_delivery_core import config_file, queued, start_in_process, submit
from tests.dnsserver import DnsServer
from tests.sink import Sink, SinkHandler
from tests.test_queue_cli import run

MX = "mx.remote.test"


class TlsHandler(SinkHandler):
    """The sink's handler, noting for each message whether it came over TLS."""

    def __init__(self) -> None:
        super().__init__()
        self.over_tls: list[bool] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.over_tls.append(session.ssl is not None)
        return await super().handle_DATA(server, session, envelope)


class TlsSink(Sink):
    """The test sink with STARTTLS, presenting `chain_pem` (leaf first) and its key."""

    def __init__(self, tmp_path: Path, key_pem: bytes, chain_pem: bytes) -> None:
        super().__init__()
        self.handler = TlsHandler()
        self.tls_handler = self.handler
        pem = tmp_path / "peer.pem"
        pem.write_bytes(key_pem + chain_pem)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pem)

    def start(self, port: int = 0) -> TlsSink:
        self._thread.start()

        def protocol() -> SMTP:
            session = SMTP(
                self.handler, hostname=MX, decode_data=False, data_size_limit=0, tls_context=self.context
            )
            self._sessions.append(session)
            return session

        async def serve() -> asyncio.AbstractServer:
            return await self._loop.create_server(protocol, "127.0.0.1", port)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


def der(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def spki_sha256(pem: bytes) -> bytes:
    spki = der(pem).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def cert_sha256(pem: bytes) -> bytes:
    return hashlib.sha256(der(pem).public_bytes(Encoding.DER)).digest()


def mx_zone(dns_server: DnsServer, *, signed: bool = True) -> None:
    dns_server.add_mx("remote.test", 10, MX)
    dns_server.add_a(MX, "127.0.0.1")
    if signed:
        dns_server.sign_zone("remote.test")


async def service_for(tmp_path: Path, dns_server: DnsServer, port: int) -> Service:
    root = tmp_path / "mailroot"
    path = config_file(tmp_path, root, remote_port=port, tls="dane-or-mta-sts")
    path.write_text(path.read_text() + f'\n[resolver]\nnameservers = ["{dns_server.nameserver}"]\n')
    return await start_in_process(path)


def leaf(ca: trustme.CA, name: str = MX) -> trustme.LeafCert:
    return ca.issue_cert(name)


async def deliver_one(service: Service, sink: Sink) -> None:
    await submit(smtp_port(service), 1, clients=1)
    await wait_until(lambda: sink.messages, timeout=60, what="delivery to the DANE peer")


async def deferred_with(service: Service, cause: str) -> dict[str, Any]:
    """Wait for the one message's first attempt to end with event 4006 of `cause`; that event."""
    await submit(smtp_port(service), 1, clients=1)
    failures = await wait_until(
        lambda: [e for e in events_of(service, 4006) if e["cause"] == cause], timeout=60, what=f"4006 {cause}"
    )
    root = service.root
    await wait_until(
        lambda: (e := queued(root)) and e[0]["recipients"][0]["attempts"] >= 1, timeout=60, what="deferred"
    )
    event: dict[str, Any] = failures[0]
    return event


async def test_a_dane_ee_spki_sha256_match_delivers_over_tls(tmp_path: Path, dns_server: DnsServer) -> None:
    ca = trustme.CA()
    cert = leaf(ca)
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, spki_sha256(cert.cert_chain_pems[0].bytes()))
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        await deliver_one(service, sink)
        assert not [e for e in events_of(service, 4006) if e["cause"].startswith("dane")]
    finally:
        await service.stop()
        sink.stop()
    assert sink.tls_handler.over_tls == [True]
    assert dns_server.query_count(f"_{sink.port}._tcp.{MX}", "TLSA") >= 1


async def test_a_dane_ee_mismatch_defers_with_dane_mismatch_and_sends_nothing(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    ca = trustme.CA()
    cert = leaf(ca)
    other = leaf(trustme.CA())  # what the TLSA record names: another key
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, spki_sha256(other.cert_chain_pems[0].bytes()))
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        event = await deferred_with(service, "dane-mismatch")
        envelope = queued(service.root)[0]
    finally:
        await service.stop()
        sink.stop()
    assert sink.messages == [] and sink.handler.rcpt_attempts == []
    assert event["host"] == f"{MX}[127.0.0.1]:{sink.port}"
    assert "does not match the DANE TLSA records" in event["text"]
    assert "Traceback" not in event["text"]
    assert envelope["recipients"][0]["state"] != "failed"


async def test_tlsa_records_without_the_ad_bit_are_ignored(tmp_path: Path, dns_server: DnsServer) -> None:
    """An unsigned zone: the (mismatching) TLSA record cannot be trusted, so it does not count: opportunistic
    TLS delivers, as without any record."""
    ca = trustme.CA()
    cert = leaf(ca)
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    mx_zone(dns_server, signed=False)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, b"\x00" * 32)
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        await deliver_one(service, sink)
    finally:
        await service.stop()
        sink.stop()
    assert sink.tls_handler.over_tls == [True]


async def test_unauthenticated_tlsa_under_a_signed_mx_is_ignored(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    """MX and address signed, but the TLSA records come from an unsigned child zone (no AD bit): they do not
    count, the transcript says so, and opportunistic TLS delivers."""
    cert = leaf(trustme.CA())
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, b"\x00" * 32)
    dns_server.unsign_zone(f"_tcp.{MX}")
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        await deliver_one(service, sink)
    finally:
        await service.stop()
        sink.stop()
    assert sink.tls_handler.over_tls == [True]
    assert dns_server.query_count(f"_{sink.port}._tcp.{MX}", "TLSA") == 1


async def test_a_failed_tlsa_lookup_skips_the_host(tmp_path: Path, dns_server: DnsServer) -> None:
    """RFC 7672 §2.2.1: a signed MX host whose TLSA lookup fails is not used without its check."""
    sink = Sink().start()
    mx_zone(dns_server)
    dns_server.set_servfail(f"_{sink.port}._tcp.{MX}")
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        event = await deferred_with(service, "dane-lookup-failed")
    finally:
        await service.stop()
        sink.stop()
    assert sink.connections == 0
    assert "TLSA lookup for this host failed" in event["text"] and "Traceback" not in event["text"]


async def test_signed_tlsa_under_an_unsigned_mx_is_ignored(tmp_path: Path, dns_server: DnsServer) -> None:
    """RFC 7672 §2.2: DANE applies only when the MX answer is authenticated too; here only the MX host's
    own zone is signed."""
    ca = trustme.CA()
    cert = leaf(ca, "mx.other.test")
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    dns_server.add_mx("remote.test", 10, "mx.other.test")
    dns_server.add_a("mx.other.test", "127.0.0.1")
    dns_server.sign_zone("other.test")
    dns_server.add_tlsa(f"_{sink.port}._tcp.mx.other.test", 3, 1, 1, b"\x00" * 32)
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        await deliver_one(service, sink)
    finally:
        await service.stop()
        sink.stop()
    assert dns_server.query_count(f"_{sink.port}._tcp.mx.other.test", "TLSA") == 0


async def test_a_peer_without_starttls_under_dane_is_deferred(tmp_path: Path, dns_server: DnsServer) -> None:
    sink = Sink().start()  # no STARTTLS offered
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, b"\x11" * 32)
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        event = await deferred_with(service, "dane-tls-required")
    finally:
        await service.stop()
        sink.stop()
    assert sink.messages == [] and sink.handler.rcpt_attempts == []
    assert "does not offer STARTTLS" in event["text"]


async def test_dane_ta_on_the_intermediate_delivers(tmp_path: Path, dns_server: DnsServer) -> None:
    """2 0 1: the SHA-256 of the intermediate CA certificate the server sends after its leaf."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    cert = intermediate.issue_cert(MX)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)  # leaf, intermediate
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), chain).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 2, 0, 1, cert_sha256(cert.cert_chain_pems[1].bytes()))
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        await deliver_one(service, sink)
    finally:
        await service.stop()
        sink.stop()
    assert sink.tls_handler.over_tls == [True]


async def test_dane_ta_on_the_root_sent_along_delivers(tmp_path: Path, dns_server: DnsServer) -> None:
    """2 1 2: the SHA-512 of the root's key; the server sends leaf, intermediate and root (RFC 7672
    §3.1.2 asks servers to include the trust anchor)."""
    root = trustme.CA()
    intermediate = root.create_child_ca()
    cert = intermediate.issue_cert(MX)
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems) + root.cert_pem.bytes()
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), chain).start()
    mx_zone(dns_server)
    spki = (
        der(root.cert_pem.bytes()).public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 2, 1, 2, hashlib.sha512(spki).digest())
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        await deliver_one(service, sink)
    finally:
        await service.stop()
        sink.stop()
    assert sink.tls_handler.over_tls == [True]


async def test_dane_ta_with_a_leaf_for_another_name_is_a_mismatch(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    cert = intermediate.issue_cert("mail.elsewhere.test")
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), chain).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 2, 0, 1, cert_sha256(cert.cert_chain_pems[1].bytes()))
    service = await service_for(tmp_path, dns_server, sink.port)
    try:
        event = await deferred_with(service, "dane-mismatch")
    finally:
        await service.stop()
        sink.stop()
    assert sink.messages == []
    assert "mail.elsewhere.test" in event["text"] and MX in event["text"]


async def probe_dane(tmp_path: Path, dns_server: DnsServer, port: int) -> tuple[int, str]:
    root = tmp_path / "mailroot"
    path = config_file(tmp_path, root)
    path.write_text(path.read_text() + f'\n[resolver]\nnameservers = ["{dns_server.nameserver}"]\n')
    code, out, err = await run("probe", "-c", str(path), f"{MX}:{port}", "--dane")
    return code, out + err


async def test_probe_dane_shows_the_records_the_ad_bit_and_the_match(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    cert = leaf(trustme.CA())
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, spki_sha256(cert.cert_chain_pems[0].bytes()))
    try:
        code, output = await probe_dane(tmp_path, dns_server, sink.port)
    finally:
        sink.stop()
    assert code == 0, output
    assert f"TLSA:     _{sink.port}._tcp.{MX} 3 1 1 " in output
    assert "the TLSA answer is authenticated (the resolver set the AD bit)" in output
    assert "DANE:     the server's certificate matches TLSA 3 1 1" in output
    assert "dane-mismatch" not in output and "Traceback" not in output


async def test_probe_dane_names_a_mismatch_and_unsigned_records(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    cert = leaf(trustme.CA())
    sink = TlsSink(tmp_path, cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes()).start()
    mx_zone(dns_server)
    dns_server.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, b"\x00" * 32)
    try:
        code, signed = await probe_dane(tmp_path, dns_server, sink.port)
        assert code == 0, signed
        unsigned_dns = DnsServer().__enter__()
        try:
            mx_zone(unsigned_dns, signed=False)
            unsigned_dns.add_tlsa(f"_{sink.port}._tcp.{MX}", 3, 1, 1, b"\x00" * 32)
            code, unsigned = await probe_dane(tmp_path, unsigned_dns, sink.port)
        finally:
            unsigned_dns.stop()
    finally:
        sink.stop()
    assert "problem:  DANE: no certificate the remote server presented matches" in signed
    assert "(dane-mismatch)" in signed
    assert code == 0, unsigned
    assert "NOT authenticated" in unsigned and "validating resolver" in unsigned
    assert "dane-mismatch" not in unsigned
