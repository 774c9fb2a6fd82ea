"""Failed-AUTH rate limiting: delays, blocking, expiry, clearing on success, IPv6 /64 keys, bounded memory."""

from __future__ import annotations

import pytest

from smtpsvc.auth.limiter import AuthLimiter, client_key

IP = "192.0.2.1"


@pytest.mark.parametrize(
    ("failures_at", "now", "delay"),
    [
        ([], 0.0, 0.0),
        ([0.0], 1.0, 1.0),
        ([0.0, 1.0], 2.0, 2.0),
        ([0.0, 1.0, 2.0], 3.0, 4.0),
        ([0.0, 1.0, 2.0, 3.0], 4.0, 8.0),
        ([0.0, 1.0, 2.0, 3.0, 4.0], 5.0, 16.0),
        ([0.0] * 5, 899.0, 16.0),  # still inside the 900 s window
        ([0.0] * 5, 900.0, 0.0),  # aged out exactly at the window's end
        ([0.0, 500.0], 950.0, 1.0),  # the first expired, the second counts
    ],
)
def test_delay_grows_exponentially_with_recent_failures(
    failures_at: list[float], now: float, delay: float
) -> None:
    limiter = AuthLimiter()
    for t in failures_at:
        limiter.record_failure(IP, t)
    assert limiter.delay_for(IP, now) == delay


@pytest.mark.parametrize(
    ("failures", "delay"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 30.0), (20, 30.0), (200, 30.0)],
)
def test_delay_is_capped_at_max_delay(failures: int, delay: float) -> None:
    limiter = AuthLimiter(max_failures=1000)
    for i in range(failures):
        limiter.record_failure(IP, float(i) / 1000)
    assert limiter.delay_for(IP, 1.0) == delay


@pytest.mark.parametrize(
    ("max_failures", "failures", "blocked"),
    [(5, 0, False), (5, 4, False), (5, 5, True), (5, 9, True), (1, 1, True), (3, 2, False)],
)
def test_blocked_once_failures_reach_max_failures(max_failures: int, failures: int, blocked: bool) -> None:
    limiter = AuthLimiter(max_failures=max_failures)
    for i in range(failures):
        limiter.record_failure(IP, float(i))
    assert limiter.blocked(IP, 10.0) is blocked


def test_block_lifts_when_the_oldest_failure_leaves_the_sliding_window() -> None:
    limiter = AuthLimiter(max_failures=3, window=100.0)
    for t in (0.0, 10.0, 20.0):
        limiter.record_failure(IP, t)
    assert limiter.blocked(IP, 99.0)
    assert not limiter.blocked(IP, 100.0)  # the failure at 0 aged out; two remain
    assert limiter.failures(IP, 100.0) == 2
    assert not limiter.blocked(IP, 121.0)
    assert limiter.delay_for(IP, 121.0) == 0.0


def test_success_clears_the_failures() -> None:
    limiter = AuthLimiter()
    for t in range(4):
        limiter.record_failure(IP, float(t))
    limiter.record_success(IP, 5.0)
    assert limiter.delay_for(IP, 5.0) == 0.0
    assert not limiter.blocked(IP, 5.0)
    assert len(limiter) == 0


def test_addresses_are_counted_separately() -> None:
    limiter = AuthLimiter(max_failures=2)
    limiter.record_failure("192.0.2.1", 0.0)
    limiter.record_failure("192.0.2.1", 0.0)
    assert limiter.blocked("192.0.2.1", 1.0)
    assert not limiter.blocked("192.0.2.2", 1.0)
    assert limiter.delay_for("192.0.2.2", 1.0) == 0.0


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_client_key_groups_ipv6_by_64_and_unmaps_ipv4(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_an_ipv6_client_cannot_escape_by_rotating_addresses_in_its_64() -> None:
    limiter = AuthLimiter(max_failures=3)
    for i in range(3):
        limiter.record_failure(f"2001:db8::{i + 1}", float(i))
    assert limiter.blocked("2001:db8::ffff", 5.0)
    assert not limiter.blocked("2001:db8:0:1::1", 5.0)


def test_memory_is_bounded_dropping_the_least_recent_address() -> None:
    limiter = AuthLimiter(max_tracked=3)
    for i in range(5):
        limiter.record_failure(f"192.0.2.{i}", float(i))
    assert len(limiter) == 3
    assert limiter.failures("192.0.2.0", 5.0) == 0
    assert limiter.failures("192.0.2.1", 5.0) == 0
    assert limiter.failures("192.0.2.4", 5.0) == 1


def test_a_repeat_failure_makes_an_address_the_most_recent() -> None:
    limiter = AuthLimiter(max_tracked=2)
    limiter.record_failure("192.0.2.1", 0.0)
    limiter.record_failure("192.0.2.2", 1.0)
    limiter.record_failure("192.0.2.1", 2.0)
    limiter.record_failure("192.0.2.3", 3.0)  # evicts .2, not .1
    assert limiter.failures("192.0.2.1", 4.0) == 2
    assert limiter.failures("192.0.2.2", 4.0) == 0


def test_timestamps_per_address_are_bounded_by_max_failures() -> None:
    limiter = AuthLimiter(max_failures=5)
    for i in range(10_000):
        limiter.record_failure(IP, i * 0.001)
    assert limiter.failures(IP, 10.0) == 5
    assert limiter.blocked(IP, 10.0)


def test_expired_addresses_are_forgotten() -> None:
    limiter = AuthLimiter(window=60.0)
    for i in range(100):
        limiter.record_failure(f"198.51.100.{i}", 0.0)
    limiter.record_failure(IP, 61.0)
    assert len(limiter) == 1


@pytest.mark.parametrize(
    "kwargs",
    [{"max_failures": 0}, {"window": 0.0}, {"base_delay": -1.0}, {"max_delay": -1.0}, {"max_tracked": 0}],
)
def test_nonsense_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AuthLimiter(**kwargs)  # type: ignore[arg-type]
