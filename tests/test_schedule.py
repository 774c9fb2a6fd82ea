"""The retry schedule: IIS progressive retry, last interval repeats, ±10 % jitter, capped at expiry."""

from __future__ import annotations

import random

import pytest

from smtpsvc.delivery.schedule import expired, next_attempt_time, retry_delay

IIS = [900.0, 1800.0, 3600.0, 14400.0]


@pytest.mark.parametrize(
    ("attempts", "base"), [(1, 900), (2, 1800), (3, 3600), (4, 14400), (5, 14400), (40, 14400)]
)
def test_retry_follows_the_list_and_the_last_interval_repeats(attempts: int, base: float) -> None:
    rng = random.Random(1)
    delays = [retry_delay(attempts, IIS, rng) for _ in range(200)]
    assert all(0.9 * base <= d <= 1.1 * base for d in delays)


def test_jitter_spreads_retries_so_a_restart_does_not_stampede() -> None:
    rng = random.Random(7)
    delays = {round(retry_delay(1, IIS, rng)) for _ in range(50)}
    assert len(delays) > 25


def test_next_attempt_is_never_after_expiry() -> None:
    assert (
        next_attempt_time(now=1000.0, attempts=4, received_at=0.0, expiration=2000.0, schedule=IIS) == 2000.0
    )


def test_expiry() -> None:
    assert expired(now=172800.0, received_at=0.0, expiration=172800.0)
    assert not expired(now=172799.0, received_at=0.0, expiration=172800.0)


def test_empty_schedule_is_an_error() -> None:
    with pytest.raises(ValueError):
        retry_delay(1, [])
