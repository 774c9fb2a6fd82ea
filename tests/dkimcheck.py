"""A small DKIM verifier of our own (RFC 6376 §3.4, §3.7; RFC 8463), independent of dkimpy: the second
opinion the tests ask of every signature the service makes. relaxed/relaxed only (what the service uses).
"""

from __future__ import annotations

import base64
import hashlib
import re

import dns.message
import dns.query
import dns.rdatatype
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from tests.dnsserver import DnsServer


def txt_lookup(dns_server: DnsServer, name: str) -> str:
    """The TXT record at `name` (its strings joined), asked of the test DNS server with dnspython."""
    host, port = dns_server.address
    query = dns.message.make_query(name, dns.rdatatype.TXT)
    answer = dns.query.udp(query, host, port=port, timeout=5)
    for rrset in answer.answer:
        for rdata in rrset:
            return b"".join(rdata.strings).decode("ascii")
    return ""


def dkimpy_dnsfunc(dns_server: DnsServer):  # type: ignore[no-untyped-def]
    """dkimpy's dnsfunc: the test DNS server instead of the system resolver."""

    def lookup(name: bytes, timeout: int = 5) -> bytes:
        return txt_lookup(dns_server, name.decode("ascii").rstrip(".")).encode("ascii")

    return lookup


def _fields(message: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + b"\r\n" + line)
        else:
            fields.append((line.split(b":", 1)[0].decode("ascii").strip().lower(), line))
    return fields, body


def _relaxed_header(raw: bytes) -> bytes:
    name, _, value = raw.partition(b":")
    value = re.sub(rb"\r\n(?=[ \t])", b"", value)
    value = re.sub(rb"[ \t]+", b" ", value).strip(b" ")
    return name.strip().lower() + b":" + value


def _relaxed_body(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    out = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    while out and out[-1] == b"":
        out.pop()
    return b"".join(line + b"\r\n" for line in out)


def _tags(value: bytes) -> dict[str, str]:
    text = re.sub(r"\s", "", value.decode("ascii"))
    return {k: v for k, _, v in (part.partition("=") for part in text.split(";") if part)}


def verify_all(message: bytes, dns_server: DnsServer) -> list[str]:
    """Verify every DKIM-Signature of `message`; returns the d=/s=/a= of each that verifies and raises
    AssertionError for one that does not."""
    fields, body = _fields(message)
    good: list[str] = []
    for name, raw in fields:
        if name != "dkim-signature":
            continue
        tags = _tags(raw.partition(b":")[2])
        assert tags["c"] == "relaxed/relaxed", tags["c"]
        assert base64.b64decode(tags["bh"]) == hashlib.sha256(_relaxed_body(body)).digest(), "body hash"
        # §5.4.2: fields are taken from the bottom up; a name listed more often than it occurs adds nothing
        remaining = {n: [r for fn, r in fields if fn == n] for n in {fn for fn, _ in fields}}
        data = b""
        for wanted in tags["h"].lower().split(":"):
            instances = remaining.get(wanted, [])
            if instances:
                data += _relaxed_header(instances.pop()) + b"\r\n"
        unsigned = re.sub(rb"(b=)[^;]*", rb"\1", raw)
        data += _relaxed_header(unsigned)
        record = _tags(txt_lookup(dns_server, f"{tags['s']}._domainkey.{tags['d']}").encode())
        public = base64.b64decode(record["p"])
        signature = base64.b64decode(tags["b"])
        if tags["a"] == "rsa-sha256":
            key = serialization.load_der_public_key(public)
            assert isinstance(key, rsa.RSAPublicKey)
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert tags["a"] == "ed25519-sha256"
            ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
                signature, hashlib.sha256(data).digest()
            )
        good.append(f"{tags['d']}/{tags['s']}/{tags['a']}")
    return good
