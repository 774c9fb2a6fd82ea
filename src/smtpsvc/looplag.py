"""Event-loop lag: how late the event loop runs a callback that is due.

Everything the service does in one process shares one event loop (SMTP sessions, delivery, the admin API,
`/metrics`), so a piece of code that holds the loop for 300 ms delays every one of them by up to 300 ms: a
greeting, a `250`, an admin request. `LoopLagMonitor` measures that directly: a task sleeps `interval`
(50 ms) on the loop, again and again, and reports how much later than asked it woke up. An idle loop wakes
within a millisecond or so; a blocked one reports the length of the block (a single sample per block, so
the samples count wake-ups, not seconds).

Cheap by design: one timer and one observation per interval (20 a second), no allocation beyond what
`asyncio.sleep` itself makes. Nothing from smtpsvc is imported: the caller passes where the samples go
(the service: `Metrics.loop_lag.observe`, the `smtpsvc_event_loop_lag_seconds` histogram).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

INTERVAL = 0.05  # seconds between two wake-ups asked of the loop


class LoopLagMonitor:
    """`start()` runs the monitor on the running loop (returns its task); `stop()` cancels it."""

    def __init__(
        self,
        observe: Callable[[float], None],
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self._observe = observe
        self._interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="event-loop-lag")
        return self._task

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        interval, clock, observe = self._interval, self._clock, self._observe
        while True:
            asked = clock()
            await asyncio.sleep(interval)
            # A timer may fire a little early (uvloop rounds to milliseconds, from a time cached at the
            # start of the loop's iteration): never a negative lag.
            observe(max(0.0, clock() - asked - interval))
