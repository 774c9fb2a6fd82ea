"""The queue interface every backend implements: the local file spool (`queue/local.py`, one node) and
PostgreSQL (`queue/postgres.py`, a cluster of nodes sharing one queue).

The contract, in the order a message lives through it:
  create_writer()  a message being received; bytes are streamed into it (bounded memory)
  put(w, env)      make message + envelope durable; returns only when they survive a crash (the 250 waits)
  claim(now, n)    hand out messages due for delivery; a claimed (leased) message is nobody else's until
                   it is saved, released or completed, or (in a cluster) until its lease expires
  save(env)        persist changed delivery state (attempts, next attempt, results) and release the lease;
                   raises LeaseLost when another node took the message over meanwhile
  complete(id)     every recipient is final: remove the message
Reading (`get`, `list`, `open_message`, ...) never changes state. Operator verbs (`set_frozen`,
`make_due`, `recategorize`, `delete`, `set_link_frozen`) work on a message whether or not it is being
delivered: a change to a leased message is honoured when its delivery saves.

`QueueStore` is the async interface the pipeline (scheduler, reports, admin, metrics) uses; `Intake` is the
part ingest needs. tests/queue/test_contract.py runs one suite of this contract against every backend.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from smtpsvc.model import Envelope


class QueueError(Exception):
    """The queue could not do what was asked (disk full, permissions, database down): the caller answers
    4xx."""


class QueueLocked(QueueError):
    """Another process holds the local queue (the running service, or another admin tool): reach the
    service through its admin API instead."""


class LeaseLost(QueueError):
    """This node's lease on a message expired and another node claimed it (or the message was deleted):
    the other node now owns the delivery state, so ours is not written. Drop the envelope; the message
    may be delivered twice (at-least-once), never lost."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A leased message. `taken_over_from` names the node whose lease had expired (it died or stalled
    mid-delivery): re-run categorization before delivering, as Exchange cluster failover does. "" for a
    message nobody held (always "" with the local spool)."""

    envelope: Envelope
    taken_over_from: str = ""

    @property
    def taken_over(self) -> bool:
        return self.taken_over_from != ""


@dataclass(frozen=True, slots=True)
class Rescheduled:
    """What `make_due` changed: how many messages, and the links (route names) of the recipients made
    due, so the caller can lift its per-destination backoff for them."""

    messages: int = 0
    links: frozenset[str] = frozenset()


class MessageWriter(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def size(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def attach_xexch50(self, blob: bytes) -> None: ...

    def abort(self) -> None: ...


class Intake(Protocol):
    """What ingest needs: a writer for a message being received, and the durable commit."""

    def create_writer(self) -> MessageWriter: ...

    async def put(self, writer: MessageWriter, envelope: Envelope) -> None: ...


class QueueStore(Intake, Protocol):
    """The queue as the service uses it, whatever the backend. Every call may raise QueueError."""

    @property
    def node_id(self) -> str:
        """This node's name (`queue.node_id`): who holds a lease."""
        ...

    @property
    def shared(self) -> bool:
        """True when other nodes work on the same queue (PostgreSQL)."""
        ...

    async def close(self) -> None: ...

    # -- delivery ------------------------------------------------------------------------------------
    async def claim(self, now: float, limit: int) -> list[Claim]: ...

    async def next_due(self) -> float | None:
        """When a claim may next find work; None: nothing to wait for."""
        ...

    def wake(self) -> None:
        """Make a pending `wait_for_work` return now (new mail, a finished delivery)."""
        ...

    async def wait_for_work(self, timeout: float | None) -> bool:
        """Sleep until woken (True) or `timeout` seconds pass (False)."""
        ...

    async def save(self, envelope: Envelope) -> None: ...

    async def release(self, queue_id: str) -> bool:
        """Give a lease back unchanged (a cancelled delivery). True when this node held it and gave it
        back; False when it held none (in a cluster, also when the database could not be told: the lease
        then expires)."""
        ...

    def abandon(self, queue_id: str) -> None:
        """Stop holding a lease without giving it back (a delivery whose state could not be written): in a
        cluster it expires, so the message is tried again, by any node, only after the lease time, never
        in a tight loop. The local spool has no lease time: it releases."""
        ...

    async def complete(self, queue_id: str) -> None: ...

    async def open_message(self, queue_id: str) -> BinaryIO:
        """The message bytes, seekable; the caller closes it. One handle per reader. QueueError when it
        cannot be read, no such message included."""
        ...

    async def xexch50_blob(self, queue_id: str) -> bytes | None: ...

    def link_slot(self, link: str, limit: int) -> AbstractAsyncContextManager[None]:
        """Hold one of `limit` connection slots of `link` shared by every node of the queue (a no-op for
        one node: the scheduler's own per-link limit is the whole story there)."""
        ...

    # -- reading -------------------------------------------------------------------------------------
    async def get(self, queue_id: str) -> Envelope | None: ...

    async def list(self) -> list[Envelope]: ...

    async def count(self) -> int: ...

    async def holders(self) -> dict[str, str]:
        """Queue id -> the node holding a valid lease on it (being delivered right now)."""
        ...

    def recent(self, queue_id: str) -> Envelope | None:
        """A message this node has just queued, without a round trip (metrics: the kind of a report)."""
        ...

    async def frozen_links(self) -> frozenset[str]: ...

    # -- operator verbs ------------------------------------------------------------------------------
    async def set_frozen(self, queue_id: str, frozen: bool) -> Envelope | None:
        """Freeze or thaw a message; the envelope after the change, None when there is no such message."""
        ...

    async def make_due(
        self, now: float, queue_id: str = "", domain: str = "", subdomains: bool = False
    ) -> Rescheduled:
        """Force Connection / ETRN: the pending recipients of one message (`queue_id`), or at `domain` (and
        its subdomains), or of every message, are due at `now`. Frozen messages are left alone. Returns how
        many messages changed and the links of the recipients made due (to lift a backoff for).

        A message being delivered (leased) counts among those changed, and its delivery goes on undisturbed:
        it is flagged (`rerun`), and when that delivery saves or releases it, every pending recipient is
        due at once, whatever the delivery recorded for it.

        The caller lifts its backoff for the returned links: the local spool makes nothing claimable before
        it returns, so no delivery pass finds those destinations still down meanwhile; PostgreSQL has every
        node, this one included, lift it on the NOTIFY of its commit (`on_forced_retry`)."""
        ...

    async def recategorize(
        self,
        route_of: Callable[[str], str],
        now: float,
        *,
        queue_id: str = "",
        changed_only: Callable[[str], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Rescheduled:
        """ResetMessageStatus: categorize queued mail again, one message (`queue_id`) or all of it.
        `route_of(address)` is a recipient's link under the configuration now in force (routing is a layer
        above the queue, so the caller supplies it). Each pending recipient gets that link recorded and is
        due at `now`; given `changed_only(address)`, only the pending recipients for which it says True (a
        route that changed with a reload). Frozen messages are left alone; a message being delivered counts
        and gets the rerun, as with `make_due` (its delivery routes every recipient afresh anyway).

        The queue is worked through in batches, so a queue of a million messages takes neither a million
        envelopes read at once (PostgreSQL reads a page of recipients per transaction) nor an event loop
        blocked for the whole of it; `progress(looked_at, total)` after each batch, in messages. Returns how
        many messages changed and the links their re-routed recipients have now."""
        ...

    async def delete(self, queue_id: str) -> bool:
        """Remove a message without a report. False: no such message."""
        ...

    async def set_link_frozen(self, link: str, frozen: bool) -> None: ...
