"""Supervised tasks: a long-running part of the service that dies is logged and started again.

Pickup, the scheduler, the event log's flush, the queue's recovery, the SMTP workers' keepers: each runs as
one asyncio task for the life of the service. A bug or an unforeseen error in one of them must not leave the
service taking mail that nothing delivers (or files that nothing picks up) while it looks healthy. So each
runs under `Supervisor.start`: an exception ends that run only; event 9007 (an error) names the task and the
exception in one line (never a traceback: an administrator reads the log), and the task is started again
after a backoff (1 s, doubling up to 60 s; back to 1 s once a run has lasted a minute), with event 9002
(cause `task-restarted`). Meanwhile `Supervisor.down` names it, and /healthz answers 503.

A task that returns ends for good (its part has finished: the recovery, or a stop). Cancelling the task
`start` returns cancels the run in progress, or the wait before the next one.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from smtpsvc import events
from smtpsvc.events import EventLog

FIRST_DELAY = 1.0  # seconds before the first restart
MAX_DELAY = 60.0  # the backoff doubles up to this; a run that lasted as long resets it


def backoff(
    previous: float | None, ran_for: float, first: float = FIRST_DELAY, ceiling: float = MAX_DELAY
) -> float:
    """The wait before the next restart: `first` after a run that lasted `ceiling` or more (a task that
    fails once a day is not a crash loop) or after none; else twice the previous wait, at most `ceiling`."""
    if previous is None or ran_for >= ceiling:
        return first
    return min(ceiling, previous * 2)


def describe(exc: BaseException) -> str:
    """The exception in one line, with where it was raised (for whoever reports the bug): `OSError: [Errno
    5] Input/output error (in scan, pickup.py:241)`."""
    text = " ".join(str(exc).split())  # one line, whatever the message holds
    words = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        words += f" (in {last.name}, {Path(last.filename).name}:{last.lineno})"
    return words


class Supervisor:
    """Runs tasks that restart after an exception; `down()` names those waiting to restart."""

    def __init__(
        self,
        event_log: EventLog,
        first_delay: float = FIRST_DELAY,
        max_delay: float = MAX_DELAY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = event_log
        self._first = first_delay
        self._max = max_delay
        self._clock = clock
        self._down: dict[str, str] = {}  # task name -> why it stopped (until it runs again)
        self.restarts: dict[str, int] = {}  # task name -> how many times it was restarted

    def down(self) -> dict[str, str]:
        """The tasks that stopped with an error and wait for their restart, with the error."""
        return dict(self._down)

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `run()` as the task `name`, again after each exception, until it returns or is cancelled."""
        return asyncio.get_running_loop().create_task(self._keep(name, run), name=name)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay: float | None = None
        while True:
            started = self._clock()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the point of a supervisor: any error, in one line, then a restart
                delay = backoff(delay, self._clock() - started, self._first, self._max)
                why = describe(exc)
                self._down[name] = why
                self.events.emit(
                    events.Event(
                        events.TASK_STOPPED,
                        f"The {name} task stopped with an error: {why}; it is restarted in {delay:g}s",
                        cause="task-stopped",
                    )
                )
            else:
                return
            try:
                await asyncio.sleep(delay)
            finally:
                self._down.pop(name, None)  # restarted, or cancelled (the service stops)
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self.events.emit(
                events.Event(
                    events.SERVICE_STARTED,
                    f"The {name} task was restarted ({self.restarts[name]} restart(s) since the start)",
                    cause="task-restarted",
                )
            )
