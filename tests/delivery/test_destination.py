"""Destination: slow start, the session cache handed from message to message, the dead timer
(delivery/destination.py). Bookkeeping only: the sessions here are plain objects; the SMTP side is tested
end to end in tests/delivery/test_delivery_core.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from smtpsvc.delivery.destination import Destination, DestinationDead, Destinations, Grant, SlowStart
from tests.conftest import wait_until


class FakeSession:
    def __init__(self) -> None:
        self.messages = 0
        self.closed = False
        self.clean = True

    def usable(self) -> bool:
        return self.clean and not self.closed

    def close_soon(self, then: Callable[[], None] | None = None) -> None:
        self.closed = True
        if then is not None:
            then()

    async def quit(self) -> None:
        self.closed = True


def destination(
    initial: int = 2, limit: int = 100, max_messages: int = 20, **kw: float
) -> Destination[FakeSession]:
    return Destination(initial, limit, max_messages, clock=time.time, **kw)


async def run_messages(dest: Destination[FakeSession], count: int) -> list[FakeSession]:
    """`count` messages at once, each taking a short while on its session, as the SMTP transport would."""
    sessions: list[FakeSession] = []

    async def one() -> None:
        grant = await dest.acquire()
        session = grant.session
        if session is None:
            session = FakeSession()
            await asyncio.sleep(0)  # connecting
            dest.opened(session)
            sessions.append(session)
        await asyncio.sleep(0.001)  # the transaction
        dest.release(session)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 30)
    return sessions


@pytest.mark.parametrize(("initial", "limit", "events", "window"), [
    (2, 100, "", 2),
    (2, 100, "+++", 5),
    (2, 4, "+++++", 4),
    (5, 100, "----", 1),
    (3, 100, "-++-", 3),
    (7, 5, "", 5),
])  # fmt: skip
def test_slow_start_grows_on_success_and_shrinks_on_failure_within_its_bounds(
    initial: int, limit: int, events: str, window: int
) -> None:
    slow = SlowStart(initial, limit)
    for event in events:
        slow.succeeded() if event == "+" else slow.failed()
    assert slow.connections == window


async def test_25_messages_at_once_go_over_two_connections() -> None:
    # IIS: 20 per connection, another one only when the first is full. Both then take turns with the
    # messages that wait, so the split is about even; never a third connection.
    dest = destination()
    sessions = await run_messages(dest, 25)
    assert len(sessions) == 2 and sum(s.messages for s in sessions) == 25
    assert all(s.messages <= 20 for s in sessions)


async def test_300_messages_need_no_more_connections_than_twenty_messages_each_fill() -> None:
    dest = destination(max_messages=20)
    sessions = await run_messages(dest, 300)
    assert len(sessions) == 15 and all(s.messages == 20 for s in sessions)


async def test_connections_are_opened_at_most_initial_at_a_time() -> None:
    dest = destination(initial=2, max_messages=1)  # every message needs its own connection
    opening, most = 0, 0

    async def one() -> None:
        nonlocal opening, most
        grant = await dest.acquire()
        assert grant.session is None
        opening += 1
        most = max(most, opening)
        await asyncio.sleep(0.002)  # connect and greeting
        opening -= 1
        session = FakeSession()
        dest.opened(session)
        dest.release(session)

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(40))), 30)
    assert most == 2 and dest.opened_total == 40
    assert dest.slow_start.connections == 42  # each greeted connection widened the window by one


async def test_a_message_arriving_while_the_only_session_is_busy_waits_for_it() -> None:
    dest = destination()
    first = await dest.acquire()
    assert first.session is None
    session = FakeSession()
    dest.opened(session)
    second = asyncio.ensure_future(dest.acquire())
    await asyncio.sleep(0.01)
    assert not second.done()  # not a second connection: the busy one can carry it
    dest.release(session)
    grant = await asyncio.wait_for(second, 5)
    assert grant.session is session and session.messages == 2


async def test_a_message_that_waited_too_long_for_a_busy_session_opens_another() -> None:
    dest = destination(wait_limit=0.05)
    await dest.acquire()
    dest.opened(FakeSession())  # busy for good (a stalled peer)
    grant = await asyncio.wait_for(dest.acquire(), 10)
    assert grant.session is None and dest.active == 2


async def test_an_idle_session_is_reused_and_closed_after_the_idle_time() -> None:
    dest = destination(idle_time=0.05)
    await dest.acquire()
    session = FakeSession()
    dest.opened(session)
    dest.release(session)
    assert (await dest.acquire()).session is session
    dest.release(session)
    await wait_until(lambda: session.closed, 5, "the idle session to be closed")
    assert dest.active == 0


async def test_a_full_or_unclean_session_is_closed_not_cached() -> None:
    dest = destination(max_messages=1)
    await dest.acquire()
    full = FakeSession()
    dest.opened(full)
    dest.release(full)
    assert full.closed and dest.active == 0
    await dest.acquire()
    broken = FakeSession()
    dest.opened(broken)
    broken.clean = False
    dest.release(broken)
    assert broken.closed and dest.active == 0


async def test_when_no_host_answers_the_destination_is_dead_and_waiters_are_told() -> None:
    dest = destination(initial=1)
    await dest.acquire()
    waiter = asyncio.ensure_future(dest.acquire())
    await asyncio.sleep(0.01)
    until = time.time() + 900
    dest.open_failed(time.time(), until, "refused", "connection-failed", every_host=True)
    with pytest.raises(DestinationDead) as dead:
        await asyncio.wait_for(waiter, 5)
    assert dead.value.until == until and dead.value.cause == "connection-failed"
    with pytest.raises(DestinationDead):
        await dest.acquire()  # and whoever comes meanwhile
    dest.revive()  # ETRN
    assert (await dest.acquire()).session is None


async def test_a_failed_connection_does_not_kill_a_destination_with_a_working_session() -> None:
    dest = destination()
    await dest.acquire()
    working = FakeSession()
    dest.opened(working)
    assert (await asyncio.wait_for(dest.acquire(), 5)).session is None  # wait limit: default 2 s
    dest.open_failed(time.time(), time.time() + 900, "no greeting", "greeting-timeout", every_host=True)
    assert not dest.dead(time.time())
    assert dest.slow_start.connections == 2  # 3 after the first success, one taken away


async def test_a_stale_cached_session_becomes_a_grant_to_reconnect() -> None:
    dest = destination()
    await dest.acquire()
    old = FakeSession()
    dest.opened(old)
    dest.release(old)
    grant = await dest.acquire()
    assert grant.session is old
    dest.stale(old)  # the peer had closed it
    assert old.closed and dest.active == 1 and dest.opening == 1
    new = FakeSession()
    dest.opened(new)
    dest.release(new)
    assert dest.active == 1 and dest.opening == 0


async def test_a_waiter_cancelled_after_being_handed_a_session_gives_it_back() -> None:
    dest = destination()
    await dest.acquire()
    session = FakeSession()
    dest.opened(session)
    waiter = asyncio.ensure_future(dest.acquire())
    await asyncio.sleep(0.01)
    dest.release(session)  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    grant: Grant[FakeSession] = await asyncio.wait_for(dest.acquire(), 5)
    assert grant.session is session  # not lost: idle again


def test_quiet_destinations_are_forgotten_when_the_table_is_full() -> None:
    table: Destinations[str, FakeSession] = Destinations(destination, kept=3)
    for key in "abcd":
        table.get(key)
    assert len(list(table.items())) <= 3
