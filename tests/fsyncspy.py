"""See, or fail, each fsync the queue's group committer asks for, whichever way it makes them (the kernel's
AIO or threads): a wrapper around what `smtpsvc.queue.fsyncs.start` returns."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

from smtpsvc.queue import fsyncs

# Called with each descriptor, still open, before its fsync: None lets it be synced, an exception is
# reported for it instead (the fsync is not made; the descriptor is closed all the same).
Verdict = Callable[[int], BaseException | None]


def spy_on_fsyncs(monkeypatch: pytest.MonkeyPatch, verdict: Verdict) -> None:
    real_start = fsyncs.start

    def start(loop: asyncio.AbstractEventLoop) -> fsyncs.Fsyncs:
        return _Spy(real_start(loop), verdict)

    monkeypatch.setattr(fsyncs, "start", start)


class _Spy:
    def __init__(self, inner: fsyncs.Fsyncs, verdict: Verdict) -> None:
        self._inner = inner
        self._verdict = verdict

    async def run(self, loop: asyncio.AbstractEventLoop, fds: list[int]) -> list[BaseException | None]:
        verdicts = [self._verdict(fd) for fd in fds]
        for fd, verdict in zip(fds, verdicts, strict=True):
            if verdict is not None:
                os.close(fd)
        synced = iter(
            await self._inner.run(loop, [fd for fd, v in zip(fds, verdicts, strict=True) if v is None])
        )
        return [verdict if verdict is not None else next(synced) for verdict in verdicts]

    def stop(self) -> None:
        self._inner.stop()
