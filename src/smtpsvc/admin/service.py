"""The admin service layer for the queue: list, summary, show, freeze, thaw, retry (Force Connection),
delete (with or without an NDR), recategorize; per message and per link (next hop).

One implementation, two places it runs:
  - inside the running service (`QueueAdmin.attach`), behind the admin HTTP API and the web viewer, where it
    works on the live spool and wakes the scheduler;
  - on the spool files of a STOPPED service (`QueueAdmin.offline`), taking the same lock the service holds,
    so the two can never change the queue at the same time.
The CLI reaches the first through `smtpsvc.admin.client` and opens the second itself; nothing here prints.

A message being delivered right now (leased by the scheduler) is never rewritten under the delivery: a freeze
is recorded on it and takes effect when the attempt ends; a delete is refused until it has.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpsvc import events
from smtpsvc.config import Config
from smtpsvc.delivery.reports import Reporter
from smtpsvc.delivery.scheduler import Scheduler
from smtpsvc.dsn import split_headers
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.model import Envelope, RecipientState, pending_by_link, queue_state
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.local import LocalSpool
from smtpsvc.routing.categorizer import route_for

HEADER_LIMIT = 64 * 1024
DELETED_STATUS = "4.3.2"  # Exchange's status for a message deleted by the administrator with an NDR
DELETED_TEXT = "Deleted by the administrator of this relay (the message was not delivered)"


class AdminError(Exception):
    """The operation cannot be done; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    envelope: Envelope
    frozen_links: frozenset[str] = frozenset()

    @property
    def state(self) -> str:
        """Exchange Queue Viewer words: frozen, retry (failed before, waiting), ready (not tried yet)."""
        return queue_state(self.envelope, self.frozen_links)  # shared with smtpsvc.metrics

    def to_json(self, now: float) -> dict[str, Any]:
        env = self.envelope
        due = env.next_due(self.frozen_links)
        return {
            "id": env.id,
            "state": self.state,
            "age_seconds": round(now - env.received_at, 1),
            "size": env.size,
            "sender": env.sender,
            "source": env.source.value,
            "next_attempt": due,
            "recipients": [
                {
                    "address": r.address,
                    "state": r.state.value,
                    "route": r.route,
                    "attempts": r.attempts,
                    "next_attempt": r.next_attempt if r.pending else None,
                    "last_reply": r.last_reply,
                }
                for r in env.recipients
            ],
        }


@dataclass(frozen=True, slots=True)
class LinkSummary:
    """One next hop ("link", as in the Exchange Queue Viewer): what waits for it."""

    link: str
    messages: int
    recipients: int
    oldest_age: float
    state: str  # "frozen" (the link or all its messages), "retry" when any failed before, else "ready"
    next_attempt: float | None
    ids: tuple[str, ...] = ()


def summarize(
    entries: list[QueueEntry], now: float, frozen_links: frozenset[str] = frozenset()
) -> list[LinkSummary]:
    """Pending recipients grouped by link, busiest first (like Postfix's qshape). A frozen link with nothing
    queued is listed too, so it can be thawed from where it was frozen."""
    groups: dict[str, list[tuple[QueueEntry, int]]] = {}
    for entry in entries:
        for link, n in pending_by_link(entry.envelope).items():  # shared with smtpsvc.metrics
            groups.setdefault(link, []).append((entry, n))
    for link in frozen_links:
        groups.setdefault(link, [])
    out = []
    for link, members in groups.items():
        states = {entry.state for entry, _ in members}
        dues = [
            d
            for entry, _ in members
            if (d := entry.envelope.next_due(frozen_links)) is not None and not entry.envelope.frozen
        ]
        if link in frozen_links or (states and states == {"frozen"}):
            state = "frozen"
        else:
            state = "retry" if "retry" in states else "ready"
        out.append(
            LinkSummary(
                link=link,
                messages=len(members),
                recipients=sum(n for _, n in members),
                oldest_age=max((now - entry.envelope.received_at for entry, _ in members), default=0.0),
                state=state,
                next_attempt=None if state == "frozen" or not dues else min(dues),
                ids=tuple(entry.envelope.id for entry, _ in members),
            )
        )
    return sorted(out, key=lambda s: (-s.messages, s.link))


class QueueAdmin:
    def __init__(
        self,
        spool: LocalSpool,
        config: Config,
        event_log: EventLog,
        reporter: Reporter,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.spool = spool
        self.config = config
        self.events = event_log
        self.reporter = reporter
        self.scheduler = scheduler  # None: the service is stopped, we work on its files

    @property
    def where(self) -> str:
        return "the running service" if self.scheduler is not None else "the queue files (service stopped)"

    @classmethod
    def attach(cls, scheduler: Scheduler) -> QueueAdmin:
        """The admin layer of a running service: the live spool, its scheduler and its reporter."""
        return cls(scheduler.queue, scheduler.config, scheduler.events, scheduler.reports, scheduler)

    @classmethod
    @contextmanager
    def offline(cls, config: Config) -> Iterator[QueueAdmin]:
        """Open the queue of a stopped service (with its lock) for the duration of the block. Raises
        ServiceRunning when the service holds the lock (reach it through its admin API instead)."""
        root = Path(config.server.root)
        event_log = EventLog(root / "log" / "events.jsonl", stream=None)

        def corrupt(name: str, reason: str) -> None:
            event_log.emit(
                events.Event(
                    events.QUEUE_FILE_CORRUPT,
                    f"Queue file {name} is unreadable and was moved to queue/corrupt: {reason}",
                    queue_id=name,
                    cause="queue-file-corrupt",
                )
            )

        spool = LocalSpool(root / "queue", on_corrupt=corrupt)
        try:
            try:
                spool.open()
            except QueueError as exc:
                raise ServiceRunning(str(exc)) from None
            except OSError as exc:
                raise AdminError(f"cannot open the queue folder {spool.dir}: {exc.strerror or exc}") from None
            ingest = Ingest(spool, config, event_log)
            reporter = Reporter(spool, config, ingest, event_log, root / "badmail")
            try:
                yield cls(spool, config, event_log, reporter)
            finally:
                spool.close()
        finally:
            event_log.close()

    # -- reading -------------------------------------------------------------------------------------
    def entries(self, state: str = "", to: str = "", domain: str = "", link: str = "") -> list[QueueEntry]:
        """Queued messages, oldest first, filtered by state, recipient address, domain or link."""
        out = []
        frozen_links = self.spool.frozen_links
        for envelope in self.spool.list():
            entry = QueueEntry(envelope, frozen_links)
            if state and entry.state != state:
                continue
            if to and not any(r.address.lower() == to.lower() for r in envelope.recipients):
                continue
            if domain and not any(r.domain == domain.lower().rstrip(".") for r in envelope.recipients):
                continue
            if link and not any(r.route == link for r in envelope.pending):
                continue
            out.append(entry)
        return sorted(out, key=lambda e: e.envelope.received_at)

    def summary(self, now: float) -> list[LinkSummary]:
        return summarize(self.entries(), now, self.spool.frozen_links)

    def get(self, queue_id: str) -> Envelope:
        envelope = self.spool.get(queue_id)
        if envelope is None:
            raise AdminError(f"no message {queue_id!r} in the queue (see `smtpsvc queue list`)")
        return envelope

    def headers(self, queue_id: str) -> bytes:
        self.get(queue_id)
        with self.spool.open_message(queue_id) as fh:
            return split_headers(fh.read(HEADER_LIMIT))

    def in_flight(self, queue_id: str) -> bool:
        return queue_id in self.spool.leased

    # -- one message ---------------------------------------------------------------------------------
    async def freeze(self, queue_id: str) -> Envelope:
        """Hold a message: it is kept, and not delivered, until thawed (Exchange Queue Viewer Freeze)."""
        envelope = self.get(queue_id)
        envelope.frozen = True
        await self._persist(envelope, "frozen")
        return envelope

    async def thaw(self, queue_id: str) -> Envelope:
        envelope = self.get(queue_id)
        envelope.frozen = False
        await self._persist(envelope, "thawed")
        return envelope

    async def retry(self, queue_id: str) -> Envelope:
        """Force Connection: every pending recipient is due now (at the next start for a stopped service)."""
        envelope = self.get(queue_id)
        if envelope.frozen:
            raise AdminError(f"{queue_id} is frozen; thaw it first (`smtpsvc queue thaw {queue_id}`)")
        self._make_due(envelope, time.time())
        await self._persist(envelope, "retry forced")
        return envelope

    async def delete(self, queue_id: str, ndr: bool = False) -> Envelope:
        """Remove a message; with `ndr`, its undelivered recipients are reported to the sender first
        (status 4.3.2, or Badmail for a null sender), and the NDR is queued before the message goes."""
        envelope = self.get(queue_id)
        if self.in_flight(queue_id):
            raise AdminError(
                f"{queue_id} is being delivered right now; freeze it and delete it when the attempt ends"
            )
        if ndr:
            was_frozen, envelope.frozen = envelope.frozen, True  # nobody delivers it while the NDR is made
            failed = [r for r in envelope.recipients if r.outstanding]
            for rcpt in envelope.pending:
                rcpt.state, rcpt.status, rcpt.last_reply = RecipientState.FAILED, DELETED_STATUS, DELETED_TEXT
            try:
                await self.reporter.failure(envelope, failed)
            except (QueueError, OSError) as exc:
                envelope.frozen = was_frozen
                raise AdminError(
                    f"cannot queue the NDR for {queue_id} ({exc}); the message is kept"
                ) from None
        await self.spool.complete(queue_id)
        self._log(envelope, "deleted with an NDR to the sender" if ndr else "deleted without a report")
        return envelope

    async def recategorize(self, queue_id: str = "") -> int:
        """ResetMessageStatus by hand: recompute every pending recipient's route from the config and make the
        message due now (one message, or all). Returns how many messages were re-routed."""
        if self.scheduler is not None and not queue_id:
            count = self.scheduler.recategorize()
        else:
            envelopes = [self.get(queue_id)] if queue_id else self.spool.list()
            now = time.time()
            count = 0
            for envelope in envelopes:
                if not envelope.pending:
                    continue
                for rcpt in envelope.pending:
                    rcpt.route = route_for(rcpt.address, self.config).link
                self._make_due(envelope, now)
                await self._persist(envelope, "", log=False)
                count += 1
        self.events.emit(
            events.Event(
                events.RECATEGORIZED,
                f"ResetMessageStatus by the administrator: {count} queued message(s) re-categorized",
                queue_id=queue_id,
                cause="reset-message-status",
            )
        )
        return count

    # -- many messages / links -----------------------------------------------------------------------
    async def retry_where(self, domain: str = "", link: str = "") -> int:
        """Force Connection for every message with a pending recipient at `domain`, or on `link`, or (with
        neither) every message. Frozen messages and links are left alone. Returns how many."""
        frozen_links = self.spool.frozen_links
        if link in frozen_links:
            raise AdminError(f"link {link!r} is frozen; thaw it first (`smtpsvc queue thaw --link {link}`)")
        now = time.time()
        count = 0
        for entry in self.entries(domain=domain, link=link):
            envelope = entry.envelope
            if envelope.frozen or entry.state == "frozen":
                continue
            self._make_due(envelope, now)
            await self._persist(envelope, "", log=False)
            count += 1
        what = f"link {link}" if link else (f"domain {domain}" if domain else "every link")
        self._log(None, f"retry forced for {what}: {count} message(s)")
        return count

    async def freeze_link(self, link: str) -> int:
        """Freeze a next hop: its mail stays queued (and new mail for it is still accepted) until thawed."""
        await self.spool.set_link_frozen(link, True)
        self._log(None, f"link {link} frozen")
        return sum(1 for e in self.entries(link=link))

    async def thaw_link(self, link: str) -> int:
        if link not in self.spool.frozen_links:
            raise AdminError(f"link {link!r} is not frozen (see `smtpsvc queue summary`)")
        await self.spool.set_link_frozen(link, False)
        if self.scheduler is not None:
            self.scheduler.wake()
        self._log(None, f"link {link} thawed")
        return sum(1 for e in self.entries(link=link))

    # -- helpers -------------------------------------------------------------------------------------
    def _make_due(self, envelope: Envelope, now: float) -> None:
        for rcpt in envelope.pending:
            rcpt.next_attempt = now
        if self.scheduler is not None:
            self.scheduler.forget_backoff({r.route for r in envelope.pending})
            if self.in_flight(envelope.id):
                self.scheduler.rerun_after_attempt(envelope.id)

    async def _persist(self, envelope: Envelope, action: str, log: bool = True) -> None:
        try:
            await self.spool.update(envelope)
        except QueueError as exc:
            raise AdminError(str(exc)) from None
        if self.scheduler is not None:
            self.scheduler.wake()
        if log:
            suffix = " (it is being delivered now; this applies when the attempt ends)"
            self._log(envelope, action + (suffix if self.in_flight(envelope.id) else ""))

    def log_action(self, text: str) -> None:
        """An operator action outside the queue (a Badmail replay) in the same event stream."""
        self._log(None, text)

    def _log(self, envelope: Envelope | None, action: str) -> None:
        self.events.emit(
            events.Event(
                events.QUEUE_ADMIN,
                f"Queue administration: {envelope.id + ' ' if envelope else ''}{action}",
                queue_id=envelope.id if envelope else "",
                cause="queue-admin",
            )
        )


class ServiceRunning(AdminError):
    """The spool is locked by the running service: reach it through its admin API."""
