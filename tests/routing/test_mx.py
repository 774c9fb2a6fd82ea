"""MX and smart-host resolution against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from smtpsvc.routing.mx import DnsError, MxResolver, NextHop

if TYPE_CHECKING:
    from tests.dnsserver import DnsServer
else:
    try:
        from tests.dnsserver import DnsServer
    except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
        from dnsserver import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


def resolver(server: DnsServer, **kwargs: Any) -> MxResolver:
    kwargs.setdefault("timeout", 2.0)
    return MxResolver(nameservers=[server.address], **kwargs)


def diagnosis(error: DnsError) -> tuple[str, bool, str]:
    return (error.cause, error.permanent, error.status)


def hosts(hops: list[NextHop]) -> list[tuple[str, str, int, int]]:
    return [(hop.host, hop.address, hop.port, hop.preference) for hop in hops]


async def test_mx_hosts_come_in_preference_order(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 20, "mx2.example.test")
    dns_server.add_mx("example.test", 10, "mx1.example.test")
    dns_server.add_mx("example.test", 30, "mx3.example.test")
    dns_server.add_a("mx1.example.test", "192.0.2.1")
    dns_server.add_a("mx2.example.test", "192.0.2.2")
    dns_server.add_a("mx3.example.test", "192.0.2.3")

    hops = await resolver(dns_server).resolve_mx("example.test", 25)

    assert hosts(hops) == [
        ("mx1.example.test", "192.0.2.1", 25, 10),
        ("mx2.example.test", "192.0.2.2", 25, 20),
        ("mx3.example.test", "192.0.2.3", 25, 30),
    ]


async def test_equal_preferences_are_shuffled_reproducibly(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "a.example.test")
    dns_server.add_mx("example.test", 10, "b.example.test")
    dns_server.add_mx("example.test", 20, "backup.example.test")
    for name, ip in [("a", "192.0.2.1"), ("b", "192.0.2.2"), ("backup", "192.0.2.9")]:
        dns_server.add_a(f"{name}.example.test", ip)

    async def order(seed: int) -> tuple[str, ...]:
        hops = await resolver(dns_server, rng=random.Random(seed)).resolve_mx("example.test", 25)
        return tuple(hop.host for hop in hops)

    orders = {await order(seed) for seed in range(16)}

    assert orders == {
        ("a.example.test", "b.example.test", "backup.example.test"),
        ("b.example.test", "a.example.test", "backup.example.test"),
    }
    assert await order(3) == await order(3)


async def test_a_and_aaaa_addresses_of_one_host_stay_together(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "mx1.example.test")
    dns_server.add_mx("example.test", 20, "mx2.example.test")
    dns_server.add_a("mx1.example.test", "192.0.2.1")
    dns_server.add_aaaa("mx1.example.test", "2001:db8::1")
    dns_server.add_a("mx2.example.test", "192.0.2.2")
    dns_server.add_aaaa("mx2.example.test", "2001:db8::2")

    hops = await resolver(dns_server).resolve_mx("example.test", 25)

    assert [(hop.host, hop.address) for hop in hops] == [
        ("mx1.example.test", "192.0.2.1"),
        ("mx1.example.test", "2001:db8::1"),
        ("mx2.example.test", "192.0.2.2"),
        ("mx2.example.test", "2001:db8::2"),
    ]


async def test_without_ipv6_no_aaaa_is_asked_or_used(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "mx.example.test")
    dns_server.add_a("mx.example.test", "192.0.2.1")
    dns_server.add_aaaa("mx.example.test", "2001:db8::1")

    hops = await resolver(dns_server, use_ipv6=False).resolve_mx("example.test", 25)

    assert [hop.address for hop in hops] == ["192.0.2.1"]
    assert ("mx.example.test", "AAAA") not in dns_server.queries


async def test_domain_without_mx_uses_its_own_addresses(dns_server: DnsServer) -> None:
    dns_server.add_a("example.test", "192.0.2.5")
    dns_server.add_aaaa("example.test", "2001:db8::5")

    hops = await resolver(dns_server).resolve_mx("Example.TEST.", 2525)

    assert hosts(hops) == [
        ("example.test", "192.0.2.5", 2525, 0),
        ("example.test", "2001:db8::5", 2525, 0),
    ]


async def test_null_mx_is_a_permanent_5_1_10(dns_server: DnsServer) -> None:
    dns_server.add_mx("nomail.test", 0, ".")
    dns_server.add_a("nomail.test", "192.0.2.1")  # must not be used as an implicit MX

    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_mx("nomail.test", 25)

    assert diagnosis(caught.value) == ("null-mx", True, "5.1.10")


async def test_nxdomain_is_a_permanent_5_4_4(dns_server: DnsServer) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_mx("nowhere.test", 25)

    error = caught.value
    assert diagnosis(error) == ("dns-nxdomain", True, "5.4.4")
    assert error.text == "Unable to bind to the destination server in DNS."


async def test_domain_with_neither_mx_nor_address_is_permanent(dns_server: DnsServer) -> None:
    dns_server.add_aaaa("v6only.test", "2001:db8::1")

    with pytest.raises(DnsError) as caught:
        await resolver(dns_server, use_ipv6=False).resolve_mx("v6only.test", 25)

    assert diagnosis(caught.value) == ("dns-no-address", True, "5.4.4")


async def test_servfail_is_transient(dns_server: DnsServer) -> None:
    dns_server.set_servfail("broken.test")

    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_mx("broken.test", 25)

    error = caught.value
    assert diagnosis(error) == ("dns-servfail", False, "4.4.3")
    assert error.text == "An internal DNS error caused a failure to find the remote server."


async def test_timeout_is_transient_and_bounded(dns_server: DnsServer) -> None:
    dns_server.set_timeout("slow.test")
    started = time.monotonic()

    with pytest.raises(DnsError) as caught:
        await resolver(dns_server, timeout=1.0).resolve_mx("slow.test", 25)

    assert diagnosis(caught.value) == ("dns-timeout", False, "4.4.3")
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize(
    ("domain", "address"),
    [("[192.0.2.7]", "192.0.2.7"), ("[IPv6:2001:DB8::7]", "2001:db8::7")],
)
async def test_address_literal_needs_no_dns(dns_server: DnsServer, domain: str, address: str) -> None:
    hops = await resolver(dns_server).resolve_mx(domain, 25)

    assert hosts(hops) == [(address, address, 25, 0)]
    assert dns_server.queries == []


@pytest.mark.parametrize("domain", ["[mail.example.test]", "[IPv6:192.0.2.1]", "bad..name.test"])
async def test_invalid_destination_is_permanent_without_a_query(dns_server: DnsServer, domain: str) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_mx(domain, 25)

    assert caught.value.permanent
    assert dns_server.queries == []


async def test_smart_host_name_is_resolved_without_mx_lookup(dns_server: DnsServer) -> None:
    dns_server.add_mx("relay.example.test", 10, "elsewhere.example.test")
    dns_server.add_a("relay.example.test", "192.0.2.20")
    dns_server.add_aaaa("relay.example.test", "2001:db8::20")

    hops = await resolver(dns_server).resolve_host("relay.example.test", 587)

    assert hosts(hops) == [
        ("relay.example.test", "192.0.2.20", 587, 0),
        ("relay.example.test", "2001:db8::20", 587, 0),
    ]
    assert all(qtype != "MX" for _, qtype in dns_server.queries)


@pytest.mark.parametrize("host", ["192.0.2.30", "[192.0.2.30]"])
async def test_smart_host_address_is_used_as_is(dns_server: DnsServer, host: str) -> None:
    hops = await resolver(dns_server).resolve_host(host, 25)

    assert hosts(hops) == [("192.0.2.30", "192.0.2.30", 25, 0)]
    assert dns_server.queries == []


async def test_unknown_smart_host_is_nxdomain(dns_server: DnsServer) -> None:
    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_host("[relay.nowhere.test]", 25)

    assert caught.value.cause == "dns-nxdomain"
    assert ("relay.nowhere.test", "A") in dns_server.queries


async def test_mx_host_without_address_is_skipped(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "gone.example.test")  # NXDOMAIN
    dns_server.add_mx("example.test", 20, "empty.example.test")  # exists, no address
    dns_server.add_mx("example.test", 30, "ok.example.test")
    dns_server.add_mx("empty.example.test", 10, "whatever.example.test")
    dns_server.add_a("ok.example.test", "192.0.2.3")

    hops = await resolver(dns_server).resolve_mx("example.test", 25)

    assert hosts(hops) == [("ok.example.test", "192.0.2.3", 25, 30)]


async def test_mx_host_with_failing_dns_is_skipped_when_another_works(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "broken.example.test")
    dns_server.add_mx("example.test", 20, "ok.example.test")
    dns_server.set_servfail("broken.example.test")
    dns_server.add_a("ok.example.test", "192.0.2.3")

    hops = await resolver(dns_server).resolve_mx("example.test", 25)

    assert [hop.host for hop in hops] == ["ok.example.test"]


async def test_no_mx_host_with_an_address_is_permanent(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "gone1.example.test")
    dns_server.add_mx("example.test", 20, "gone2.example.test")

    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_mx("example.test", 25)

    assert diagnosis(caught.value) == ("dns-no-address", True, "5.4.4")


async def test_mx_hosts_failing_transiently_make_the_whole_lookup_transient(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "gone.example.test")
    dns_server.add_mx("example.test", 20, "broken.example.test")
    dns_server.set_servfail("broken.example.test")

    with pytest.raises(DnsError) as caught:
        await resolver(dns_server).resolve_mx("example.test", 25)

    assert (caught.value.cause, caught.value.permanent) == ("dns-servfail", False)


async def test_second_lookup_is_answered_from_the_cache(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "mx.example.test")
    dns_server.add_a("mx.example.test", "192.0.2.1")  # no AAAA: a cached negative answer
    dns_server.add_a("implicit.test", "192.0.2.2")  # no MX: a cached negative answer
    mx = resolver(dns_server)
    first = [await mx.resolve_mx("example.test", 25), await mx.resolve_mx("implicit.test", 25)]
    queries = len(dns_server.queries)

    second = [await mx.resolve_mx("example.test", 25), await mx.resolve_mx("implicit.test", 25)]

    assert second == first
    assert len(dns_server.queries) == queries


async def test_large_answer_is_fetched_over_tcp(dns_server: DnsServer) -> None:
    dns_server.add_mx("example.test", 10, "big.example.test")
    addresses = [f"198.51.100.{i}" for i in range(1, 151)]
    for address in addresses:
        dns_server.add_a("big.example.test", address)

    hops = await resolver(dns_server, use_ipv6=False).resolve_mx("example.test", 25)

    assert sorted(hop.address for hop in hops) == sorted(addresses)
    assert ("big.example.test", "A") in dns_server.tcp_queries


def test_next_hop_reads_as_host_address_port() -> None:
    assert str(NextHop("mx.example.test", "192.0.2.1", 25, 10)) == "mx.example.test[192.0.2.1]:25"
