"""The retry schedule (SmtpRemoteProgressiveRetry): pure, so it is tested with plain tables.

`delivery.retry` lists the waits after the 1st, 2nd, 3rd... failed attempt; the last one repeats. Each wait
gets ±10 % jitter so that a restart, which finds many messages due at once, does not retry them in lockstep.
No attempt is scheduled past the expiration time: the last try happens when the message expires.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def retry_delay(attempts: int, schedule: Sequence[float], rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (attempts >= 1)."""
    if not schedule:
        raise ValueError("the retry schedule is empty")
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return base * (rng or random).uniform(0.9, 1.1)


def next_attempt_time(
    now: float,
    attempts: int,
    received_at: float,
    expiration: float,
    schedule: Sequence[float],
    rng: random.Random | None = None,
) -> float:
    return min(now + retry_delay(attempts, schedule, rng), received_at + expiration)


def expired(now: float, received_at: float, expiration: float) -> bool:
    return now - received_at >= expiration
