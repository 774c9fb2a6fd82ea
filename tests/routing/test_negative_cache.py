"""How long negative DNS answers are cached (RFC 2308), against a real DNS server on loopback.

A negative answer (NXDOMAIN, or NODATA: the name exists without records of the type) is cached for
min(SOA TTL, SOA MINIMUM), at most `resolver.negative_cache_max`, and not at all when it carries no SOA.
The waits for a cache entry to expire are bounded polling loops: each round looks the name up again and
stops as soon as the server sees the query.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from smtpsvc.routing.mx import DnsError, MxResolver, NextHop, negative_cache_ttl
from tests.conftest import StartService, events_of, wait_until
from tests.dnsserver import DnsServer
from tests.sink import Sink
from tests.test_relay import drop_files, send

# Clock slack between the cache's wall clock (time.time) and the test's monotonic clock.
SLACK = 0.1


def resolver(server: DnsServer, **kwargs: Any) -> MxResolver:
    kwargs.setdefault("timeout", 5.0)
    return MxResolver(nameservers=[server.address], **kwargs)


async def lookup(mx: MxResolver, domain: str) -> list[NextHop] | DnsError:
    """resolve_mx's hops, or the DnsError it raised."""
    try:
        return await mx.resolve_mx(domain, 25)
    except DnsError as error:
        return error


async def seconds_until_asked_again(
    server: DnsServer, mx: MxResolver, domain: str, qtype: str, since: float, timeout: float = 30.0
) -> float:
    """Look `domain` up until `server` gets one more `qtype` query; seconds from `since` to then."""
    asked = server.query_count(domain, qtype)
    deadline = time.monotonic() + timeout
    while server.query_count(domain, qtype) == asked:
        if time.monotonic() > deadline:
            raise AssertionError(f"{domain} {qtype} was not asked again within {timeout}s")
        await asyncio.sleep(0.05)
        await lookup(mx, domain)
    return time.monotonic() - since


def cause(result: list[NextHop] | DnsError) -> str:
    return result.cause if isinstance(result, DnsError) else "hops"


# ------------------------------------------------------------------------------------------ the decision


@pytest.mark.parametrize(
    ("soa", "cap", "seconds"),
    [
        pytest.param(None, 300.0, 0.0, id="no SOA: not cached (RFC 2308 section 5)"),
        pytest.param(None, 0.0, 0.0, id="no SOA, caching off"),
        pytest.param((3600, 60), 300.0, 60.0, id="MINIMUM below the SOA TTL"),
        pytest.param((30, 3600), 300.0, 30.0, id="SOA TTL below the MINIMUM"),
        pytest.param((120, 120), 300.0, 120.0, id="both equal, under the cap"),
        pytest.param((3600, 3600), 300.0, 300.0, id="the cap bounds a long negative TTL"),
        pytest.param((3600, 3600), 0.5, 0.5, id="a cap under a second"),
        pytest.param((60, 60), 0.0, 0.0, id="cap 0: negative caching off"),
        pytest.param((0, 60), 300.0, 0.0, id="SOA TTL 0: not cached"),
        pytest.param((60, 0), 300.0, 0.0, id="MINIMUM 0: not cached"),
    ],
)
def test_negative_cache_ttl_follows_rfc_2308_and_the_cap(
    soa: tuple[int, int] | None, cap: float, seconds: float
) -> None:
    assert negative_cache_ttl(soa, cap) == seconds


def test_a_negative_cache_limit_below_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        MxResolver(nameservers=[("127.0.0.1", 53)], negative_cache_max=-1.0)


# ---------------------------------------------------------------------------------------- without an SOA


async def test_nxdomain_without_soa_is_asked_again_at_once() -> None:
    with DnsServer(negative_soa=False) as server:
        mx = resolver(server)
        first = await lookup(mx, "fixed.test")

        second = await lookup(mx, "fixed.test")

    assert (cause(first), cause(second)) == ("dns-nxdomain", "dns-nxdomain")
    assert server.query_count("fixed.test", "MX") == 2


async def test_nxdomain_without_soa_stops_as_soon_as_the_zone_is_fixed() -> None:
    with DnsServer(negative_soa=False) as server:
        mx = resolver(server)
        assert cause(await lookup(mx, "fixed.test")) == "dns-nxdomain"
        server.add_mx("fixed.test", 10, "mx.fixed.test")
        server.add_a("mx.fixed.test", "192.0.2.1")

        hops = await mx.resolve_mx("fixed.test", 25)

    assert [str(hop) for hop in hops] == ["mx.fixed.test[192.0.2.1]:25"]


async def test_nodata_without_soa_is_asked_again_at_once() -> None:
    with DnsServer(negative_soa=False) as server:
        server.add_aaaa("v6only.test", "2001:db8::1")  # no MX and, for an IPv4-only resolver, no address
        mx = resolver(server, use_ipv6=False)
        first = await lookup(mx, "v6only.test")

        second = await lookup(mx, "v6only.test")

    assert (cause(first), cause(second)) == ("dns-no-address", "dns-no-address")
    assert (server.query_count("v6only.test", "MX"), server.query_count("v6only.test", "A")) == (2, 2)


async def test_nodata_without_soa_stops_as_soon_as_the_record_is_added() -> None:
    with DnsServer(negative_soa=False) as server:
        server.add_aaaa("v6only.test", "2001:db8::1")
        mx = resolver(server, use_ipv6=False)
        assert cause(await lookup(mx, "v6only.test")) == "dns-no-address"
        server.add_a("v6only.test", "192.0.2.7")

        hops = await mx.resolve_mx("v6only.test", 25)

    assert [str(hop) for hop in hops] == ["v6only.test[192.0.2.7]:25"]


# ------------------------------------------------------------------------------------------- with an SOA


async def test_nxdomain_with_soa_is_cached_for_the_soa_minimum() -> None:
    with DnsServer(negative_ttl=3) as server:  # SOA MINIMUM (and SOA TTL) 3 s
        mx = resolver(server)
        since = time.monotonic()
        assert cause(await lookup(mx, "gone.test")) == "dns-nxdomain"

        assert cause(await lookup(mx, "gone.test")) == "dns-nxdomain"
        assert server.query_count("gone.test", "MX") == 1  # from the cache
        elapsed = await seconds_until_asked_again(server, mx, "gone.test", "MX", since)

    assert elapsed >= 3 - SLACK


async def test_nodata_with_soa_is_cached_for_the_soa_minimum() -> None:
    with DnsServer(negative_ttl=3) as server:
        server.add_aaaa("v6only.test", "2001:db8::1")
        mx = resolver(server, use_ipv6=False)
        since = time.monotonic()
        assert cause(await lookup(mx, "v6only.test")) == "dns-no-address"

        assert cause(await lookup(mx, "v6only.test")) == "dns-no-address"
        assert server.query_count("v6only.test", "MX") == 1
        elapsed = await seconds_until_asked_again(server, mx, "v6only.test", "MX", since)

    assert elapsed >= 3 - SLACK


async def test_an_soa_ttl_below_the_minimum_bounds_the_negative_ttl() -> None:
    with DnsServer(negative_ttl=3600, soa_ttl=2) as server:
        mx = resolver(server, negative_cache_max=3600.0)
        since = time.monotonic()
        assert cause(await lookup(mx, "gone.test")) == "dns-nxdomain"

        assert cause(await lookup(mx, "gone.test")) == "dns-nxdomain"
        assert server.query_count("gone.test", "MX") == 1
        elapsed = await seconds_until_asked_again(server, mx, "gone.test", "MX", since)

    assert elapsed >= 2 - SLACK  # and, by the loop's bound, long before the hour of the MINIMUM


async def test_negative_cache_max_bounds_a_long_soa_minimum() -> None:
    with DnsServer(negative_ttl=3600) as server:
        mx = resolver(server, negative_cache_max=1.0)
        since = time.monotonic()
        assert cause(await lookup(mx, "gone.test")) == "dns-nxdomain"

        assert cause(await lookup(mx, "gone.test")) == "dns-nxdomain"
        assert server.query_count("gone.test", "MX") == 1
        elapsed = await seconds_until_asked_again(server, mx, "gone.test", "MX", since)

    assert elapsed >= 1 - SLACK


async def test_negative_cache_max_zero_turns_negative_caching_off() -> None:
    with DnsServer(negative_ttl=3600) as server:
        server.add_aaaa("v6only.test", "2001:db8::1")
        mx = resolver(server, use_ipv6=False, negative_cache_max=0.0)
        await lookup(mx, "gone.test")
        await lookup(mx, "v6only.test")

        await lookup(mx, "gone.test")
        await lookup(mx, "v6only.test")

    assert (server.query_count("gone.test", "MX"), server.query_count("v6only.test", "MX")) == (2, 2)


# --------------------------------------------------------------------------------------------- positive


async def test_positive_answers_are_still_cached_for_their_ttl() -> None:
    with DnsServer(ttl=2) as server:
        server.add_mx("example.test", 10, "mx.example.test")
        server.add_a("mx.example.test", "192.0.2.1")
        server.add_aaaa("mx.example.test", "2001:db8::1")
        mx = resolver(server, negative_cache_max=0.0)  # positive answers do not depend on it
        since = time.monotonic()
        first = await mx.resolve_mx("example.test", 25)

        assert await mx.resolve_mx("example.test", 25) == first
        assert server.query_count("example.test", "MX") == 1
        elapsed = await seconds_until_asked_again(server, mx, "example.test", "MX", since)

    assert elapsed >= 2 - SLACK


# ---------------------------------------------------------------------------------------- end to end


async def test_mail_to_a_domain_fixed_after_an_nxdomain_without_soa_is_delivered_at_once(
    start_service: StartService, sink: Sink, dns_server: DnsServer
) -> None:
    dns_server.negative_soa = False
    service = await start_service(  # resolver.negative_cache_max at its default, 5m
        resolver={"nameservers": [dns_server.nameserver]}, delivery={"remote_port": sink.port}
    )
    await send(service, "alice@local.test", ["first@fixed.test"])
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR of the first message")
    assert b"Status: 5.4.4" in ndr.read_bytes()
    dns_server.add_mx("fixed.test", 10, "mx.fixed.test")
    dns_server.add_a("mx.fixed.test", "127.0.0.1")

    await send(service, "alice@local.test", ["second@fixed.test"])

    await wait_until(lambda: sink.messages or len(drop_files(service)) > 1, what="the second message's fate")
    assert len(sink.messages) == 1 and len(drop_files(service)) == 1
    assert [e["cause"] for e in events_of(service, 4000)] == ["dns-nxdomain"]
