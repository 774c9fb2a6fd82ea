"""Per-destination delivery state in one place, as Postfix's queue manager keeps it: how many connections a
destination may have (slow start), the connections it has (a cache of sessions handed from one message to
the next), and whether it is known to be down (the dead-destination timer).

A destination is one route choice (`RouteChoice`: the next hops and how to talk to them): a domain's MX, the
smart host, or a connector. A message's route group asks its destination for a session with `acquire`:

- an idle cached session, when there is one;
- else, when the sessions already open can carry every message waiting (each carries up to
  `max_messages` in all), the message waits for one of them to finish its current transaction: IIS sends up
  to 20 messages on one connection and opens another only when that one is full, so 25 messages go over
  2 connections (20 + 5), not 25;
- else, when the slow-start window allows another connection, a grant to open one;
- else it waits. A message that has waited `wait_limit` seconds may open a connection if the window allows:
  a stalled session must not hold everybody up.

Slow start: the window starts at `initial` connections; each new connection that gets through its greeting
and EHLO adds one (up to `limit`), each that fails takes one away (never below one); and at most `initial`
connections are being opened at any moment. So a host that comes back from an outage gets a few
connections, then more as they succeed, never a burst of connection attempts that overflows its listen
backlog (a SYN-cookie connection the peer never accepted hangs until the greeting timeout).

When a connection cannot be made to any host and no other session of the destination works, the
destination is dead until a retry time: every message waiting for it, and every message that comes for it
meanwhile, is postponed without an attempt on its count (and without an event).

Pure bookkeeping on the event loop: the connection itself (SMTP) is the transport's business. `Destinations`
keeps them per route choice, bounded.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

IDLE_TIME = 5.0  # seconds an idle session stays cached for the next message to the same destination
WAIT_LIMIT = 2.0  # seconds a message waits for a busy session before it may open another connection
KEPT = 10_000  # destinations remembered; past it, the ones with nothing going on are forgotten


class Session(Protocol):
    """A connection a destination caches (an SMTP session)."""

    messages: int  # messages started on it, the one under way included

    def usable(self) -> bool:
        """Still connected and clean for another transaction."""
        ...

    def close_soon(self, then: Callable[[], None] | None = None) -> None:
        """End it (QUIT) in the background; `then` once it is closed."""
        ...

    async def quit(self) -> None:
        """End it (QUIT) and wait for that."""
        ...


S = TypeVar("S", bound=Session)


class DestinationDead(Exception):
    """The destination failed moments ago: do not try it before `until` (epoch seconds)."""

    def __init__(self, until: float, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.until = until
        self.reason = reason
        self.cause = cause


@dataclass(frozen=True, slots=True)
class Grant(Generic[S]):
    """What `acquire` hands out: a ready session, or (session None) a reserved slot to open a connection
    in; either way the holder must end with `release`, `opened`/`open_failed`, as the methods say."""

    session: S | None


class SlowStart:
    """The concurrency window of one destination (pure)."""

    def __init__(self, initial: int, limit: int) -> None:
        self.limit = max(1, limit)
        self.window = float(min(max(1, initial), self.limit))

    @property
    def connections(self) -> int:
        return math.floor(self.window)

    def succeeded(self) -> None:
        self.window = min(float(self.limit), self.window + 1)

    def failed(self) -> None:
        self.window = max(1.0, self.window - 1)


class Destination(Generic[S]):
    def __init__(
        self,
        initial: int,
        limit: int,
        max_messages: int,
        *,
        clock: Callable[[], float],
        idle_time: float = IDLE_TIME,
        wait_limit: float = WAIT_LIMIT,
    ) -> None:
        self.slow_start = SlowStart(initial, limit)
        self.initial = max(1, initial)
        self.max_messages = max(1, max_messages)
        self.idle_time = idle_time
        self.wait_limit = wait_limit
        self._clock = clock  # wall clock (dead times are compared with messages' retry times)
        self.active = 0  # connections open or being opened, idle ones included
        self.opening = 0  # of those, the ones being opened (connect, greeting, EHLO)
        self.working = 0  # of those, the ones that got through their greeting (open, not being opened)
        self._capacity = 0  # messages the active connections can still take beyond those handed out
        self._idle: list[tuple[S, asyncio.TimerHandle]] = []
        self._waiters: deque[asyncio.Future[Grant[S]]] = deque()
        self._impatient: set[asyncio.Future[Grant[S]]] = set()  # waited wait_limit already
        self.dead_until = 0.0
        self.dead_reason = ""
        self.dead_cause = ""
        self.opened_total = 0  # connections opened (statistics, tests)
        self.peak = 0  # most connections at once (statistics, tests)

    # -- what the scheduler asks ---------------------------------------------------------------------
    def dead(self, now: float) -> bool:
        return self.dead_until > now

    @property
    def quiet(self) -> bool:
        """Nothing going on and nothing worth remembering: it may be forgotten (and start afresh)."""
        return self.active == 0 and not self._waiters and self.dead_until <= self._clock()

    # -- sessions ------------------------------------------------------------------------------------
    async def acquire(self) -> Grant[S]:
        """An idle session, a slot to open one, or a wait (module docstring). Raises DestinationDead."""
        self._check_alive()
        grant = self._take_idle()
        if grant is not None:
            return grant
        if not self._waiters and self._may_open(demand=1):
            return self._reserve()
        waiter: asyncio.Future[Grant[S]] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._dispatch()  # the queue grew: the open sessions may no longer carry it all
        timer = asyncio.get_running_loop().call_later(self.wait_limit, self._waited_long, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._return_unused(waiter.result())  # handed to us just as we were cancelled
            raise
        finally:
            timer.cancel()
            self._impatient.discard(waiter)

    def release(self, session: S) -> None:
        """The holder's transaction on `session` is over: hand it to the next waiter, keep it idle, or (not
        usable, or full) close it."""
        if session.usable() and session.messages < self.max_messages:
            if self._waiters:
                self._hand(session)
                return
            timer = asyncio.get_running_loop().call_later(self.idle_time, self._expire, session)
            self._idle.append((session, timer))
            return
        self._drop(session)

    def opened(self, session: S) -> None:
        """A connection opened on a grant got through its greeting: positive feedback."""
        self.opening -= 1
        session.messages = 1
        self.working += 1
        self.opened_total += 1
        self.slow_start.succeeded()
        self.dead_until = 0.0
        self._dispatch()

    def open_failed(self, now: float, retry_at: float, reason: str, cause: str, every_host: bool) -> None:
        """A connection could not be opened on a grant (connect or greeting failed): negative feedback. With
        `every_host` (no host of the destination took one) and no other session working, the destination
        is dead until `retry_at`, and whoever waits for it is told so."""
        self.opening -= 1
        self._give_slot(self.max_messages - 1)
        self.slow_start.failed()
        if every_host and self.working == 0:
            self.mark_dead(retry_at, reason, cause)
        else:
            self._dispatch()

    def unused(self) -> None:
        """A grant to open a connection was not used (DNS failed before any host was tried)."""
        self.opening -= 1
        self._give_slot(self.max_messages - 1)
        self._dispatch()

    def stale(self, session: S) -> None:
        """A session handed out turned out dead before its transaction began (the peer closed an idle
        connection): it is closed, and its slot becomes the holder's grant to open a new one."""
        session.close_soon()
        self.working -= 1
        self.opening += 1
        self._capacity += (self.max_messages - 1) - (self.max_messages - session.messages)

    def mark_dead(self, until: float, reason: str, cause: str) -> None:
        self.dead_until, self.dead_reason, self.dead_cause = until, reason, cause
        error = DestinationDead(until, reason, cause)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def revive(self) -> None:
        """The operator asked for a retry (ETRN, `queue retry`): try it now."""
        self.dead_until = 0.0

    async def close(self) -> None:
        """Stop: idle sessions get their QUIT now; sessions in use close when released."""
        idle, self._idle = self._idle, []
        for _, timer in idle:
            timer.cancel()
        await asyncio.gather(*(session.quit() for session, _ in idle), return_exceptions=True)
        for session, _ in idle:
            self.working -= 1
            self._give_slot(self.max_messages - session.messages)

    def sessions(self) -> Iterable[S]:
        """The idle sessions (diagnosis, tests)."""
        return [session for session, _ in self._idle]

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self.dead_until > self._clock():
            raise DestinationDead(self.dead_until, self.dead_reason, self.dead_cause)

    def _take_idle(self) -> Grant[S] | None:
        while self._idle:
            session, timer = self._idle.pop()  # the newest: the older ones expire first
            timer.cancel()
            if session.usable():
                session.messages += 1
                self._capacity -= 1
                return Grant(session)
            self._drop(session)
        return None

    def _may_open(self, demand: int) -> bool:
        """Open a connection for `demand` waiting messages? Only when the open ones cannot carry them all,
        the window allows one more, and not too many are being opened already."""
        return demand > self._capacity and self._room()

    def _room(self) -> bool:
        return self.active < self.slow_start.connections and self.opening < self.initial

    def _reserve(self) -> Grant[S]:
        self.active += 1
        self.opening += 1
        self.peak = max(self.peak, self.active)
        self._capacity += self.max_messages - 1
        return Grant(None)

    def _give_slot(self, unused: int) -> None:
        self.active -= 1
        self._capacity -= unused

    def _hand(self, session: S) -> None:
        """Give `session` to the first waiter still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                session.messages += 1
                self._capacity -= 1
                waiter.set_result(Grant(session))
                return
        self.release(session)  # nobody left after all: keep it idle

    def _drop(self, session: S) -> None:
        """Close a session. Its slot is free only once it is closed: the peer must never see more
        connections than the window, and a closing one is still one to the peer."""
        self.working -= 1
        self._capacity -= self.max_messages - session.messages  # it carries nothing more
        session.close_soon(then=self._closed)

    def _closed(self) -> None:
        self._give_slot(0)
        self._dispatch()

    def _expire(self, session: S) -> None:
        for index, (cached, _) in enumerate(self._idle):
            if cached is session:
                del self._idle[index]
                self._drop(session)
                return

    def _dispatch(self) -> None:
        """Something changed (a slot freed, the window grew): give waiters what they may have now."""
        while self._waiters:
            if self._idle:
                session, timer = self._idle.pop()
                timer.cancel()
                if session.usable():
                    self._hand(session)
                else:
                    self._drop(session)
                continue
            if self._may_open(demand=len(self._waiters)):
                waiter = self._waiters.popleft()
            else:
                impatient = self._first_impatient() if self._room() else None
                if impatient is None:
                    return
                waiter = impatient
                self._waiters.remove(waiter)
            if not waiter.done():
                waiter.set_result(self._reserve())

    def _first_impatient(self) -> asyncio.Future[Grant[S]] | None:
        if not self._impatient:
            return None
        return next((w for w in self._waiters if w in self._impatient), None)

    def _waited_long(self, waiter: asyncio.Future[Grant[S]]) -> None:
        """A message waited `wait_limit` for a busy session: it may open a connection if the window allows."""
        if waiter.done() or waiter not in self._waiters:
            return
        self._impatient.add(waiter)
        self._dispatch()

    def _return_unused(self, grant: Grant[S]) -> None:
        if grant.session is not None:
            self.release(grant.session)
        else:
            self.unused()


K = TypeVar("K", bound=Hashable)


class Destinations(Generic[K, S]):
    """The destinations by key, made on first use with the limits `make` gives; bounded."""

    def __init__(self, make: Callable[[], Destination[S]], kept: int = KEPT) -> None:
        self._make = make
        self._kept = kept
        self._by_key: dict[K, Destination[S]] = {}

    def get(self, key: K) -> Destination[S]:
        destination = self._by_key.get(key)
        if destination is None:
            if len(self._by_key) >= self._kept:
                self._forget_quiet()
            destination = self._by_key[key] = self._make()
        return destination

    def items(self) -> Iterable[tuple[K, Destination[S]]]:
        return list(self._by_key.items())

    async def close(self) -> None:
        await asyncio.gather(*(destination.close() for destination in self._by_key.values()))

    def _forget_quiet(self) -> None:
        for key in [k for k, d in self._by_key.items() if d.quiet]:
            del self._by_key[key]
