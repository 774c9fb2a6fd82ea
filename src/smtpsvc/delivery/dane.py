"""DANE for SMTP (RFC 7672): does the certificate chain a server presented match its TLSA records?

Pure: the TLSA records (already known to be DNSSEC-authenticated, `routing/mx.py` `resolve_tlsa`), the chain
in DER (leaf first, as the server sent it) and the names to check go in; a `DaneResult` comes out.

What counts (RFC 7672 §3.1):

* DANE-EE(3): the leaf alone must match; its names and dates are not checked (§3.1.1): the DNS binds the key
  to the service, not a CA.
* DANE-TA(2): some certificate of the presented chain must match, the leaf must chain to it (each signature
  checked, from the leaf up to the matching certificate), the leaf and the certificates between must be
  within their validity dates, and the leaf must name the MX host (the TLSA base domain; one ``*.`` label
  of a wildcard allowed), §3.2.2. The trust anchor itself is not checked for dates (it is the DNS's word).
  Limit: the trust anchor must be in the chain the server sends (RFC 7672 §3.1.2 asks servers to send it);
  a 2 1 x record whose key is only in DNS, not in the chain, does not match.
* PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP (§3.1.3) and ignored, as are unknown selectors or
  matching types. With an authenticated TLSA set and no usable record, TLS is still mandatory but the
  certificate is not checked (§2.2).
* Selector 0: the whole certificate (DER); 1: its SubjectPublicKeyInfo (DER). Matching type 0: the bytes
  themselves; 1: SHA-256; 2: SHA-512.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from smtpsvc.routing.mx import TlsaRecord

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)
_MTYPES = (0, 1, 2)

# Causes of a DANE host failure (events 4006/4000; docs/delivery.md "DANE").
DANE_MISMATCH = "dane-mismatch"
DANE_TLS_REQUIRED = "dane-tls-required"
DANE_LOOKUP_FAILED = "dane-lookup-failed"


def usable(record: TlsaRecord) -> bool:
    """A record SMTP clients use (RFC 7672 §3.1.3: PKIX-TA/PKIX-EE and unknown values are not)."""
    return record.usage in (DANE_TA, DANE_EE) and record.selector in _SELECTORS and record.mtype in _MTYPES


def usable_records(records: Sequence[TlsaRecord]) -> list[TlsaRecord]:
    return [record for record in records if usable(record)]


@dataclass(frozen=True, slots=True)
class DaneResult:
    """`ok`: the chain is authenticated. `detail`: what matched, or why nothing did (IIS-worded)."""

    ok: bool
    detail: str


def _selected(cert: x509.Certificate, der: bytes, selector: int) -> bytes:
    if selector == 0:
        return der
    return cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def matches(record: TlsaRecord, cert: x509.Certificate, der: bytes) -> bool:
    """The record's association data is this certificate's (selector and matching type applied)."""
    return _digest(_selected(cert, der, record.selector), record.mtype) == record.data


def _names(cert: x509.Certificate) -> list[str]:
    """The DNS names of the certificate: its subjectAltName dNSNames, else its subject CN (RFC 6125)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return san.get_values_for_type(x509.DNSName)


def name_matches(pattern: str, host: str) -> bool:
    """RFC 6125 §6.4.3, as RFC 7672 §3.2.3 restricts it: a wildcard only as the whole leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*.") and "." in host:
        return host.split(".", 1)[1] == pattern[2:]
    return False


def _valid_now(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):  # wrong issuer name, key type, or signature
        return False
    return True


def check(
    records: Sequence[TlsaRecord],
    chain: Sequence[bytes],
    names: Sequence[str],
    now: datetime.datetime | None = None,
) -> DaneResult:
    """Match the presented `chain` (DER, leaf first) against the usable `records`; `names`: the reference
    identifiers for DANE-TA (the MX host name, the TLSA base domain). See the module docstring."""
    records = usable_records(records)
    if not records:
        return DaneResult(True, "no usable TLSA record: encryption required, certificate not checked")
    if not chain:
        return DaneResult(False, "the remote server presented no certificate")
    when = now if now is not None else datetime.datetime.now(datetime.UTC)
    try:
        certs = [x509.load_der_x509_certificate(der) for der in chain]
    except ValueError as exc:
        return DaneResult(False, f"the remote server's certificate cannot be read ({exc})")
    leaf = certs[0]
    for record in records:
        if record.usage == DANE_EE and matches(record, leaf, chain[0]):
            return DaneResult(True, f"the server's certificate matches TLSA {record}")
    ta_problem = ""
    for record in records:
        if record.usage != DANE_TA:
            continue
        for index, (cert, der) in enumerate(zip(certs, chain, strict=True)):
            if not matches(record, cert, der):
                continue
            problem = _chain_problem(certs[: index + 1], names, when)
            if not problem:
                return DaneResult(
                    True, f"the server's certificate chains to the trust anchor of TLSA {record}"
                )
            ta_problem = problem
    if ta_problem:
        return DaneResult(False, ta_problem)
    listed = ", ".join(str(record) for record in records)
    return DaneResult(
        False, f"no certificate the remote server presented matches its TLSA records ({listed})"
    )


def _chain_problem(path: Sequence[x509.Certificate], names: Sequence[str], now: datetime.datetime) -> str:
    """Why the leaf does not chain to the trust anchor `path[-1]` (`path` leaf first), or ""."""
    for child, parent in itertools.pairwise(path):
        if not _issued_by(child, parent):
            return f"the certificate {child.subject.rfc4514_string()} is not signed by the next in the chain"
    for cert in path[:-1] if len(path) > 1 else path:
        if not _valid_now(cert, now):
            return f"the certificate {cert.subject.rfc4514_string()} is expired or not yet valid"
    presented = _names(path[0])
    if not any(name_matches(pattern, name) for pattern in presented for name in names):
        wanted = ", ".join(names)
        return f"the server's certificate names {', '.join(presented) or 'no host'}, not {wanted}"
    return ""
