"""Failed-AUTH rate limiting per client address: a growing delay, then a block (pure; the clock is passed in).

The session asks ``blocked(ip, now)`` before an AUTH attempt (True: answer ``421 4.7.0`` and close), waits
``delay_for(ip, now)`` seconds before answering it, then calls ``record_failure`` or ``record_success``.
Failures count within a sliding ``window``; the delay is ``base_delay * 2**(failures-1)`` capped at
``max_delay``; ``max_failures`` failures within the window block the address until the oldest of them ages
out. IPv6 clients are counted per /64 (one host usually owns a whole /64, so counting single addresses would
let it rotate through them); IPv4-mapped IPv6 addresses count as their IPv4 address. Memory is bounded: at
most ``max_tracked`` addresses are remembered (the one idle longest is forgotten first), each with at most
``max_failures`` timestamps. ``now`` is any monotonic clock in seconds (``time.monotonic()``).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Protocol

__all__ = ["AuthGate", "AuthLimiter", "LocalAuthGate", "client_key"]


def client_key(ip: str) -> str:
    """The key failures are counted under: the IPv4 address, the IPv6 /64, or the text as is if not an IP."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AuthLimiter:
    """Per-client failed-AUTH bookkeeping. Not thread-safe: use it from the event loop only."""

    def __init__(
        self,
        max_failures: int = 5,
        window: float = 900.0,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        *,
        max_tracked: int = 100_000,
    ) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        if window <= 0:
            raise ValueError("window must be positive")
        if base_delay < 0 or max_delay < 0:
            raise ValueError("delays must not be negative")
        if max_tracked < 1:
            raise ValueError("max_tracked must be at least 1")
        self.max_failures = max_failures
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_tracked = max_tracked
        # key → failure times (oldest first), ordered by the latest failure (least recent first)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        """How many client keys are tracked now (expired ones may linger until the next record_failure)."""
        return len(self._failures)

    def failures(self, ip: str, now: float) -> int:
        """Failed attempts from ``ip`` within the window ending at ``now``."""
        times = self._failures.get(client_key(ip))
        if not times:
            return 0
        return sum(1 for t in times if now - t < self.window)

    def delay_for(self, ip: str, now: float) -> float:
        """Seconds to wait before answering the next AUTH from ``ip``: 0 without recent failures, else
        ``base_delay * 2**(failures-1)``, at most ``max_delay``."""
        count = self.failures(ip, now)
        if count == 0:
            return 0.0
        return float(min(self.base_delay * 2.0 ** min(count - 1, 64), self.max_delay))

    def blocked(self, ip: str, now: float) -> bool:
        """True once the failures within the window reach ``max_failures`` (the session answers 421 4.7.0)."""
        return self.failures(ip, now) >= self.max_failures

    def record_failure(self, ip: str, now: float) -> None:
        """Count a failed AUTH from ``ip`` at ``now``."""
        self._expire(now)
        key = client_key(ip)
        times = self._failures.pop(key, None)
        if times is None:
            times = deque(maxlen=self.max_failures)
        while times and now - times[0] >= self.window:
            times.popleft()
        times.append(now)
        self._failures[key] = times  # now the most recent
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)

    def record_success(self, ip: str, now: float) -> None:
        """A successful AUTH from ``ip`` clears its failures (``now`` keeps the calls uniform)."""
        self._failures.pop(client_key(ip), None)

    def _expire(self, now: float) -> None:
        """Forget clients whose latest failure is older than the window (they sit at the front)."""
        while self._failures:
            key, times = next(iter(self._failures.items()))
            if times and now - times[-1] < self.window:
                break
            del self._failures[key]


class AuthGate(Protocol):
    """What a session asks around an AUTH attempt: this process's limiter (`LocalAuthGate`), or, in an SMTP
    worker, the main process's, so that the whole service counts a client's failures once
    (workers.py `MasterChannel`)."""

    async def check(self, ip: str) -> tuple[bool, float]:
        """Before an attempt: (blocked, seconds to wait before answering it)."""
        ...

    async def failed(self, ip: str) -> bool:
        """Count a failure; whether the client is blocked now."""
        ...

    def succeeded(self, ip: str) -> None:
        """A success clears the client's failures."""
        ...


class LocalAuthGate:
    """An `AuthGate` on a limiter of this process; `limiter` is read at each call (a test may swap it)."""

    def __init__(self, limiter: Callable[[], AuthLimiter], clock: Callable[[], float] = time.monotonic):
        self._limiter = limiter
        self._clock = clock

    async def check(self, ip: str) -> tuple[bool, float]:
        return check(self._limiter(), ip, self._clock())

    async def failed(self, ip: str) -> bool:
        return failed(self._limiter(), ip, self._clock())

    def succeeded(self, ip: str) -> None:
        self._limiter().record_success(ip, self._clock())


def check(limiter: AuthLimiter, ip: str, now: float) -> tuple[bool, float]:
    """(blocked, delay) for an attempt from `ip` at `now`."""
    if limiter.blocked(ip, now):
        return True, 0.0
    return False, limiter.delay_for(ip, now)


def failed(limiter: AuthLimiter, ip: str, now: float) -> bool:
    """Record a failure from `ip` at `now`; whether it is blocked now."""
    limiter.record_failure(ip, now)
    return limiter.blocked(ip, now)
