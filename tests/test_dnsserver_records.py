"""The test DNS server's TXT, TLSA and AD-flag answers (the outbound-trust tests rely on them)."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.query
import dns.rdatatype

from tests.dnsserver import DnsServer


def ask(server: DnsServer, name: str, qtype: str) -> dns.message.Message:
    host, port = server.address
    return dns.query.udp(dns.message.make_query(name, qtype, want_dnssec=True), host, port=port, timeout=10)


def test_txt_tlsa_and_the_ad_flag_of_a_signed_zone() -> None:
    with DnsServer() as server:
        long_key = "v=DKIM1; k=rsa; p=" + "A" * 300  # over 255 octets: two character-strings
        server.add_txt("sel._domainkey.signed.test", long_key[:255], long_key[255:])
        server.add_tlsa("_25._tcp.mx.signed.test", 3, 1, 1, bytes.fromhex("ab" * 32))
        server.add_txt("_mta-sts.plain.test", "v=STSv1; id=20261204")
        server.sign_zone("signed.test")
        txt = ask(server, "sel._domainkey.signed.test", "TXT")
        assert b"".join(txt.answer[0][0].strings).decode() == long_key
        assert txt.flags & dns.flags.AD
        tlsa = ask(server, "_25._tcp.mx.signed.test", "TLSA")
        [record] = tlsa.answer[0]
        assert (record.usage, record.selector, record.mtype) == (3, 1, 1)
        assert record.cert == bytes.fromhex("ab" * 32)
        assert tlsa.flags & dns.flags.AD
        unsigned = ask(server, "_mta-sts.plain.test", "TXT")
        assert not unsigned.flags & dns.flags.AD
        assert unsigned.answer[0].rdtype == dns.rdatatype.TXT
