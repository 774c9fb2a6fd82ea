"""The queue interface every backend implements (the local file spool now, PostgreSQL later).

The contract, in the order a message lives through it:
  create_writer()  a message being received; bytes are streamed into it (bounded memory)
  put(w, env)      make message + envelope durable; returns only when they survive a crash (the 250 waits)
  lease(now, n)    hand out messages due for delivery; a leased message is nobody else's until released
  save(env)        persist changed delivery state (attempts, next attempt, results) and release the lease
  complete(id)     every recipient is final: remove the message
Reading (`get`, `list`, `open_message`) never changes state.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol

from smtpsvc.model import Envelope


class QueueError(Exception):
    """The queue could not do what was asked (disk full, permissions): the caller answers 4xx."""


class MessageWriter(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def attach_xexch50(self, blob: bytes) -> None: ...

    def abort(self) -> None: ...


class Queue(Protocol):
    def create_writer(self) -> MessageWriter: ...

    async def put(self, writer: MessageWriter, envelope: Envelope) -> None: ...

    def lease(self, now: float, limit: int) -> list[Envelope]: ...

    def release(self, queue_id: str) -> None: ...

    async def save(self, envelope: Envelope) -> None: ...

    async def complete(self, queue_id: str) -> None: ...

    def get(self, queue_id: str) -> Envelope | None: ...

    def list(self) -> list[Envelope]: ...

    def open_message(self, queue_id: str) -> BinaryIO: ...

    def next_due(self) -> float | None: ...
