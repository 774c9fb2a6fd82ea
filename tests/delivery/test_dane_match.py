"""DANE matching (delivery/dane.py, pure) table by table, and the TLSA lookup with its AD bit (routing/mx.py)
against the test DNS server."""

from __future__ import annotations

import datetime
import hashlib

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smtpsvc.delivery.dane import check, name_matches, usable
from smtpsvc.routing.mx import MxResolver, TlsaRecord
from tests.dnsserver import DnsServer

MX = "mx.remote.test"
ROOT = trustme.CA()
INTERMEDIATE = ROOT.create_child_ca()
LEAF = INTERMEDIATE.issue_cert(MX)
OTHER = trustme.CA().issue_cert(MX)


def der_of(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


CHAIN = [der_of(blob.bytes()) for blob in LEAF.cert_chain_pems]  # leaf, intermediate
ROOT_DER = der_of(ROOT.cert_pem.bytes())


def association(cert_der: bytes, selector: int, mtype: int) -> bytes:
    cert = x509.load_der_x509_certificate(cert_der)
    data = (
        cert_der
        if selector == 0
        else cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_by_every_selector_and_matching_type(selector: int, mtype: int) -> None:
    record = TlsaRecord(3, selector, mtype, association(CHAIN[0], selector, mtype))
    assert check([record], CHAIN, [MX]).ok
    assert not check([record], [der_of(OTHER.cert_chain_pems[0].bytes())], [MX]).ok


def test_dane_ee_ignores_names_and_dates() -> None:
    record = TlsaRecord(3, 1, 1, association(CHAIN[0], 1, 1))
    not_yet_valid = datetime.datetime(1990, 1, 1, tzinfo=datetime.UTC)  # before the leaf was valid
    assert check([record], CHAIN, ["some.other.name"], now=not_yet_valid).ok


def test_dane_ee_does_not_match_an_intermediate() -> None:
    record = TlsaRecord(3, 0, 1, association(CHAIN[1], 0, 1))
    assert not check([record], CHAIN, [MX]).ok


@pytest.mark.parametrize(("selector", "mtype"), [(0, 1), (1, 1), (0, 2), (1, 0)])
def test_dane_ta_matches_an_issuer_in_the_chain(selector: int, mtype: int) -> None:
    record = TlsaRecord(2, selector, mtype, association(CHAIN[1], selector, mtype))
    result = check([record], CHAIN, [MX])
    assert result.ok, result.detail


def test_dane_ta_checks_the_name_the_dates_and_the_signatures() -> None:
    record = TlsaRecord(2, 0, 1, association(CHAIN[1], 0, 1))
    wrong_name = check([record], CHAIN, ["mx.elsewhere.test"])
    assert not wrong_name.ok and "mx.elsewhere.test" in wrong_name.detail
    expired = check([record], CHAIN, [MX], now=datetime.datetime(1990, 1, 1, tzinfo=datetime.UTC))  # before
    assert not expired.ok and "expired" in expired.detail
    # A leaf of another CA presented with our intermediate: the intermediate matches, the signature does not.
    forged = [der_of(OTHER.cert_chain_pems[0].bytes()), CHAIN[1]]
    assert not check([record], forged, [MX]).ok


def test_dane_ta_needs_the_trust_anchor_in_the_presented_chain() -> None:
    record = TlsaRecord(2, 1, 1, association(ROOT_DER, 1, 1))
    assert not check([record], CHAIN, [MX]).ok  # the root was not sent: the documented limit
    assert check([record], [*CHAIN, ROOT_DER], [MX]).ok


@pytest.mark.parametrize(
    ("record", "is_usable"),
    [
        (TlsaRecord(3, 1, 1, b""), True),
        (TlsaRecord(2, 0, 2, b""), True),
        (TlsaRecord(0, 0, 1, b""), False),  # PKIX-TA: unusable for SMTP (RFC 7672 §3.1.3)
        (TlsaRecord(1, 1, 1, b""), False),  # PKIX-EE
        (TlsaRecord(3, 2, 1, b""), False),  # unknown selector
        (TlsaRecord(3, 1, 3, b""), False),  # unknown matching type
    ],
)
def test_usable_records(record: TlsaRecord, is_usable: bool) -> None:
    assert usable(record) is is_usable


def test_only_unusable_records_require_tls_but_check_nothing() -> None:
    result = check([TlsaRecord(1, 1, 1, b"\x00" * 32)], CHAIN, [MX])
    assert result.ok and "not checked" in result.detail


def test_a_usable_record_wins_over_unusable_ones() -> None:
    records = [TlsaRecord(1, 1, 1, association(CHAIN[0], 1, 1)), TlsaRecord(3, 1, 1, b"\x00" * 32)]
    assert not check(records, CHAIN, [MX]).ok  # the PKIX-EE record would match, but it does not count


def test_no_certificate_is_a_mismatch() -> None:
    assert not check([TlsaRecord(3, 1, 1, b"\x00" * 32)], [], [MX]).ok


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("mx.remote.test", "MX.Remote.Test.", True),
        ("*.remote.test", "mx.remote.test", True),
        ("*.remote.test", "a.mx.remote.test", False),
        ("*.remote.test", "remote.test", False),
        ("m*.remote.test", "mx.remote.test", False),
    ],
)
def test_name_matching(pattern: str, host: str, expected: bool) -> None:
    assert name_matches(pattern, host) is expected


async def test_tlsa_lookup_reports_the_ad_bit_and_mx_hops_whether_they_are_signed(
    dns_server: DnsServer,
) -> None:
    dns_server.add_mx("signed.test", 10, "mx.signed.test")
    dns_server.add_a("mx.signed.test", "127.0.0.1")
    dns_server.add_tlsa("_25._tcp.mx.signed.test", 3, 1, 1, b"\xab" * 32)
    dns_server.sign_zone("signed.test")
    dns_server.add_mx("plain.test", 10, "mx.plain.test")
    dns_server.add_a("mx.plain.test", "127.0.0.1")
    dns_server.add_tlsa("_25._tcp.mx.plain.test", 3, 1, 1, b"\xab" * 32)
    resolver = MxResolver(nameservers=[dns_server.address], use_ipv6=False)

    [signed_hop] = await resolver.resolve_mx("signed.test", 25)
    [plain_hop] = await resolver.resolve_mx("plain.test", 25)
    assert signed_hop.secure and not plain_hop.secure
    signed = await resolver.resolve_tlsa("mx.signed.test", 25)
    assert signed.secure and signed.records == (TlsaRecord(3, 1, 1, b"\xab" * 32),)
    plain = await resolver.resolve_tlsa("mx.plain.test", 25)
    assert not plain.secure and len(plain.records) == 1
    none = await resolver.resolve_tlsa("mx.nowhere.test", 25)
    assert none.records == ()
    await resolver.resolve_tlsa("mx.nowhere.test", 25)  # NXDOMAIN with an SOA: cached (RFC 2308)
    assert dns_server.query_count("_25._tcp.mx.nowhere.test", "TLSA") == 1
    # Cached by TTL: asking again does not reach the server.
    before = dns_server.query_count("_25._tcp.mx.signed.test", "TLSA")
    await resolver.resolve_tlsa("mx.signed.test", 25)
    assert dns_server.query_count("_25._tcp.mx.signed.test", "TLSA") == before == 1


async def test_a_failed_tlsa_lookup_is_an_error_not_an_empty_answer(dns_server: DnsServer) -> None:
    dns_server.set_servfail("_25._tcp.mx.signed.test")
    resolver = MxResolver(nameservers=[dns_server.address], use_ipv6=False)
    with pytest.raises(Exception, match="dns-servfail"):
        await resolver.resolve_tlsa("mx.signed.test", 25)
