"""MTA-STS (RFC 8461): the pure parsing and matching, and the policy cache against a real DNS server and a
real HTTPS policy server on loopback (trustme CA given as delivery.mta_sts_ca_file would give it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from smtpsvc.routing.mtasts import (
    MtaSts,
    PolicyError,
    mx_allowed,
    parse_policy,
    parse_sts_record,
    parse_tlsrpt_record,
)
from smtpsvc.routing.mx import MxResolver
from tests.delivery.policyserver import PolicyServer
from tests.dnsserver import DnsServer

POLICY = "\r\n".join(
    [
        "version: STSv1",
        "mode: enforce",
        "mx: mx.example.test",
        "mx: *.backup.example.test",
        "max_age: 86400",
        "",
    ]
)


def test_sts_record_gives_the_id_and_ignores_other_or_duplicate_records() -> None:
    assert parse_sts_record(["v=STSv1; id=20261204T010101;"]) == "20261204T010101"
    assert parse_sts_record(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_sts_record(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # two: as good as none (§3.1)
    assert parse_sts_record(["v=STSv1; id=not-alnum!"]) is None
    assert parse_sts_record([]) is None


def test_tlsrpt_record_gives_its_rua_uris() -> None:
    record = "v=TLSRPTv1; rua=mailto:tls@example.test,https://r.example.test/tls"
    assert parse_tlsrpt_record([record]) == ["mailto:tls@example.test", "https://r.example.test/tls"]
    assert parse_tlsrpt_record(["v=STSv1; id=1"]) == []


def test_policy_parses_mode_mx_and_max_age() -> None:
    policy = parse_policy("example.test", "1", POLICY, 1000.0)
    assert (policy.mode, policy.mx, policy.max_age) == (
        "enforce",
        ("mx.example.test", "*.backup.example.test"),
        86400,
    )
    assert policy.expires_at == 1000.0 + 86400
    with pytest.raises(PolicyError, match="version"):
        parse_policy("example.test", "1", "mode: enforce\nmx: a\nmax_age: 1\n", 0)
    with pytest.raises(PolicyError, match="mode"):
        parse_policy("example.test", "1", "version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", 0)
    with pytest.raises(PolicyError, match="max_age"):
        parse_policy("example.test", "1", "version: STSv1\nmode: enforce\nmx: a\nmax_age: soon\n", 0)
    with pytest.raises(PolicyError, match="MX hosts"):
        parse_policy("example.test", "1", "version: STSv1\nmode: enforce\nmax_age: 5\n", 0)
    assert parse_policy("e.test", "1", "version: STSv1\nmode: none\nmax_age: 5\n", 0).mode == "none"
    assert (
        parse_policy("e.test", "1", "version: STSv1\nmode: testing\nmx: a\nmax_age: 9999999999\n", 0).max_age
        == 31557600
    )


def test_mx_patterns_match_exactly_or_one_leftmost_label() -> None:
    patterns = ["mx.example.test", "*.backup.example.test"]
    assert mx_allowed(patterns, "MX.Example.Test.")
    assert mx_allowed(patterns, "b1.backup.example.test")
    assert not mx_allowed(patterns, "backup.example.test")
    assert not mx_allowed(patterns, "a.b1.backup.example.test")
    assert not mx_allowed(patterns, "mx.other.test")


class Published:
    def __init__(self, tmp_path: Path, dns_server: DnsServer, server: PolicyServer, ca_file: Path) -> None:
        self.dns = dns_server
        self.server = server
        self.cache = tmp_path / "mta-sts.json"
        self.ca_file = ca_file

    def sts(self) -> MtaSts:
        """A fresh MtaSts, as after a restart (it reads the cache file)."""
        resolver = MxResolver(nameservers=[self.dns.address], negative_cache_max=0)
        return MtaSts(resolver, self.cache, ca_file=str(self.ca_file), port=self.server.port)


@pytest.fixture
def published(tmp_path: Path, dns_server: DnsServer) -> Iterator[Published]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    dns_server.ttl = 0  # every lookup asks the server: the tests change the records
    dns_server.add_txt("_mta-sts.example.test", "v=STSv1; id=one")
    dns_server.add_a("mta-sts.example.test", "127.0.0.1")
    with PolicyServer(ca, "mta-sts.example.test") as server:
        server.policy = POLICY
        yield Published(tmp_path, dns_server, server, ca_file)


async def test_policy_is_fetched_over_https_by_the_policy_hosts_name_and_cached(
    published: Published,
) -> None:
    lookup = await published.sts().lookup("example.test", now=1000.0)
    assert lookup.policy is not None and lookup.policy.mode == "enforce" and not lookup.error
    assert published.server.requests == [("/.well-known/mta-sts.txt", "mta-sts.example.test")]
    again = await published.sts().lookup("example.test", now=2000.0)  # a "restart": from the cache file
    assert again.policy == lookup.policy
    assert len(published.server.requests) == 1  # same id, unexpired: no fetch


async def test_a_new_id_fetches_again_and_an_expired_policy_is_not_used(published: Published) -> None:
    sts = published.sts()
    await sts.lookup("example.test", now=1000.0)
    published.dns.add_txt("_mta-sts.example.test", "v=STSv1; id=two")  # now two records: as good as none
    published.server.policy = POLICY.replace("enforce", "testing")
    none_valid = await sts.lookup("example.test", now=1000.0)
    assert (
        none_valid.policy is not None and none_valid.policy.id == "one"
    )  # cached, unexpired: still in force
    published.dns.remove("_mta-sts.example.test")
    published.dns.add_txt("_mta-sts.example.test", "v=STSv1; id=two")
    changed = await sts.lookup("example.test", now=1001.0)
    assert changed.policy is not None and (changed.policy.id, changed.policy.mode) == ("two", "testing")
    assert len(published.server.requests) == 2
    published.dns.remove("_mta-sts.example.test")  # no longer published, and the cached one expired
    assert (await sts.lookup("example.test", now=1001.0 + 86400)).policy is None


async def test_a_failed_fetch_keeps_the_cached_policy_until_it_expires(published: Published) -> None:
    sts = published.sts()
    await sts.lookup("example.test", now=1000.0)
    published.dns.remove("_mta-sts.example.test")
    published.dns.add_txt("_mta-sts.example.test", "v=STSv1; id=two")
    published.server.status = 500
    kept = await sts.lookup("example.test", now=5000.0)
    assert kept.policy is not None and kept.policy.id == "one"  # §5.1: the attacker cannot turn it off
    assert "HTTP 500" in kept.error and kept.report
    held = await sts.lookup("example.test", now=5060.0)  # the failure is remembered for a while
    assert held.error == kept.error and not held.report
    assert len(published.server.requests) == 2
    await sts.lookup("example.test", now=5000.0 + 301)  # then tried again
    assert len(published.server.requests) == 3
    assert (await sts.lookup("example.test", now=1000.0 + 86400)).policy is None


async def test_redirects_wrong_type_and_untrusted_certificates_are_refused(
    published: Published, tmp_path: Path
) -> None:
    published.server.status, published.server.location = 301, "https://elsewhere.test/"
    assert "HTTP 301" in (await published.sts().lookup("example.test")).error
    published.server.status, published.server.location = 200, ""
    published.server.content_type = "text/html"
    assert "text/html, not text/plain" in (await published.sts().lookup("example.test")).error
    published.server.content_type = "text/plain"
    published.ca_file = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(published.ca_file))
    error = (await published.sts().lookup("example.test")).error
    assert "certificate is not valid" in error


async def test_refresh_fetches_a_policy_past_half_its_max_age_and_renews_it(published: Published) -> None:
    sts = published.sts()
    await sts.lookup("example.test", now=1000.0)
    await sts.refresh(now=1000.0 + 3600)  # young: left alone
    assert len(published.server.requests) == 1
    await sts.refresh(now=1000.0 + 86400 * 0.55)  # same id, old: fetched again, max_age counts anew
    assert len(published.server.requests) == 2
    same = sts.cached("example.test")
    assert same is not None and same.fetched_at == 1000.0 + 86400 * 0.55
    published.dns.remove("_mta-sts.example.test")
    published.dns.add_txt("_mta-sts.example.test", "v=STSv1; id=two")
    await sts.refresh(now=1000.0 + 86400 * 0.55 + 86400 * 0.6)
    assert len(published.server.requests) == 3
    renewed = sts.cached("example.test")
    assert renewed is not None and renewed.id == "two"


async def test_an_unreadable_ca_file_is_a_fetch_error_in_words(published: Published, tmp_path: Path) -> None:
    published.ca_file = tmp_path / "missing-ca.pem"
    lookup = await published.sts().lookup("example.test")
    assert lookup.policy is None
    assert "delivery.mta_sts_ca_file" in lookup.error and "cannot be used" in lookup.error
