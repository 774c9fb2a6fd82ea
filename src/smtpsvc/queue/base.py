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

import builtins
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from smtpsvc.model import QUEUE_STATES, Envelope, pending_by_link, queue_state


class QueueError(Exception):
    """The queue could not do what was asked (disk full, permissions, database down): the caller answers
    4xx. `full`: for lack of space (ENOSPC, EDQUOT): SMTP answers 452 4.3.1 (RFC 3463: mail system full)
    rather than 451 4.3.0, and what failed is tried again as soon as there is room, not on a schedule."""

    def __init__(self, *args: object, full: bool = False) -> None:
        super().__init__(*args)
        self.full = full


class QueueLocked(QueueError):
    """Another process holds the local queue (the running service, or another admin tool): reach the
    service through its admin API instead."""


class MessageSetAside(QueueError):
    """The message's files cannot be read (not a moment's shortage: the file is damaged, missing, or not a
    file): they were moved to queue/corrupt/ with event 9001, once, and the message is no longer queued.
    Drop the envelope; nothing is to be delivered, saved or retried (Postfix moves such a file aside
    without a bounce)."""


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


SAMPLE_IDS = 100  # message ids a link's summary names (its oldest)


@dataclass(frozen=True, slots=True)
class LinkStats:
    """One link (next hop) in a queue summary: its messages with pending recipients."""

    messages: int
    recipients: int  # pending recipients for this link
    oldest: float  # received_at of its oldest message (epoch seconds)
    next_due: float | None  # the earliest due time among its messages that wait; None: none waits
    states: frozenset[str]  # the queue states (ready, retry, frozen) among its messages
    sample: tuple[str, ...]  # the ids of its oldest messages, at most SAMPLE_IDS, oldest first


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """The queue in numbers, as `smtpsvc queue summary` and the metrics show it (Postfix's qshape), made
    without reading every envelope: it costs a pass over the index, not over the files."""

    messages: int = 0
    states: dict[str, int] = field(default_factory=dict)  # ready, retry, frozen (queue_state) -> messages
    links: dict[str, LinkStats] = field(default_factory=dict)
    oldest: float | None = None  # received_at of the oldest message; None when the queue is empty
    bytes: int = 0


def summary_of(
    envelopes: Iterable[Envelope], frozen_links: frozenset[str] = frozenset(), now: float | None = None
) -> QueueSummary:
    """The summary of these envelopes (what a backend's `summary` gives for its queue), computed from the
    envelopes themselves: for a few messages (tools, tests), or as the reference the backends match. The
    states are as of `now` (the current time when None): a message held until later is in retry."""
    now = time.time() if now is None else now
    states = dict.fromkeys(QUEUE_STATES, 0)
    links: dict[str, list[Envelope]] = {}
    recipients: dict[str, int] = {}
    listed = sorted(envelopes, key=lambda e: e.id)
    for envelope in listed:
        states[queue_state(envelope, frozen_links, now)] += 1
        for link, count in pending_by_link(envelope).items():
            links.setdefault(link, []).append(envelope)
            recipients[link] = recipients.get(link, 0) + count
    out = {}
    for link, members in links.items():
        dues = [
            d
            for e in members
            if not e.frozen and link not in frozen_links and (d := e.next_due(frozen_links)) is not None
        ]
        out[link] = LinkStats(
            messages=len(members),
            recipients=recipients[link],
            oldest=min(e.received_at for e in members),
            next_due=min(dues) if dues else None,
            states=frozenset(queue_state(e, frozen_links, now) for e in members),
            sample=tuple(e.id for e in members[:SAMPLE_IDS]),
        )
    return QueueSummary(
        messages=len(listed),
        states=states,
        links=out,
        oldest=min((e.received_at for e in listed), default=None),
        bytes=sum(e.size for e in listed),
    )


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

    async def ids(self, frozen: bool | None = None) -> builtins.list[str]:
        """The ids of the queued messages (only the frozen ones, or only the others, when `frozen` says),
        in no particular order: cheap for a million, where `list` would read every envelope."""
        ...

    async def summary(self) -> QueueSummary:
        """Counts by state and by link (see QueueSummary); it may be a few seconds old on a large queue."""
        ...

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
        self, now: float, queue_id: str = "", domain: str = "", subdomains: bool = False, link: str = ""
    ) -> Rescheduled:
        """Force Connection / ETRN: the pending recipients of one message (`queue_id`), or at `domain` (and
        its subdomains), or waiting for `link`, or of every message, are due at `now`. Frozen messages are
        left alone. Returns how many messages changed and the links of the recipients made due (to lift a
        backoff for).

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
