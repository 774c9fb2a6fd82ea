"""The admin service layer for the queue: list, summary, show, freeze, thaw, retry (Force Connection),
delete (with or without an NDR), recategorize; per message and per link (next hop).

One implementation over the queue interface (`QueueStore`), three places it runs:
  - inside the running service (`QueueAdmin.attach`), behind the admin HTTP API and the web viewer, where it
    works on the live queue and wakes the scheduler;
  - on the spool files of a STOPPED service (`QueueAdmin.offline`, local backend), taking the same lock the
    service holds, so the two can never change the queue at the same time;
  - on the PostgreSQL queue of a cluster (`QueueAdmin.offline`, postgres backend), from any machine whether
    the nodes run or not: the database is the arbiter, and every node sees a change at once.
The CLI reaches the first through `smtpsvc.admin.client`, and the others with the queue it opens through
the composition root (`app.open_queue`, passed in); nothing here prints.

Changes to one message answer when done. Changes to many (retry, recategorize, freeze, thaw or delete all;
a domain's or a link's mail) are background jobs (`start_job`, admin/jobs.py): the caller gets the job at
once and polls it, the work goes through the queue BATCH messages at a time with the event loop free
between batches, and logs one event 9006 with its count, never one per message.

A message being delivered right now (leased) is never rewritten under the delivery: a freeze or a retry
is recorded on it and takes effect when the attempt ends; a delete is refused until it has. With a shared
queue the lease holder may be another node; `QueueEntry.leased_by` names it.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from smtpsvc import events, protolog
from smtpsvc.admin import tracking
from smtpsvc.admin.jobs import KEEP, BulkRequest, JobStatus, JobStopped, JobTable, Outcome, Progress
from smtpsvc.config import Config, LiveConfig
from smtpsvc.delivery.reports import Reporter
from smtpsvc.delivery.scheduler import Scheduler
from smtpsvc.dsn import split_headers
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.model import Envelope, QueueStatus, RecipientState, pending_by_link, queue_status
from smtpsvc.queue import pgschema
from smtpsvc.queue.base import QueueError, QueueLocked, QueueStore, QueueSummary
from smtpsvc.routing.categorizer import route_for

T = TypeVar("T")

HEADER_LIMIT = 64 * 1024
DELETED_STATUS = "4.3.2"  # Exchange's status for a message deleted by the administrator with an NDR
DELETED_TEXT = "Deleted by the administrator of this relay (the message was not delivered)"
LIST_LIMIT = 1000  # messages `queue list` and the API list at most (the oldest first)
TRACK_LIMIT = 100  # messages `smtpsvc track` and GET /api/track answer with at most (the newest first)
SORT_CHUNK = 50_000  # ids sorted at once between two loop turns
READ_BATCH = 256  # envelopes read at once between two loop turns
BATCH = 256  # messages a bulk job changes at once (concurrently: they share fsyncs) between two loop turns

# What a bulk job's step did to one message.
CHANGED, LEFT, GONE = "changed", "left", "gone"


class AdminError(Exception):
    """The operation cannot be done; the message says why and what to do. `status` is the admin API's
    HTTP answer: 409, the request conflicts with the state of the queue (a frozen message, one being
    delivered)."""

    status = 409


class NotFound(AdminError):
    """No such message, link or Badmail item."""

    status = 404


class BadRequest(AdminError):
    """The request itself is malformed (a body that is not JSON, a name that cannot be one)."""

    status = 400


class BeingDelivered(AdminError):
    """The message is being delivered right now: freeze it, then change it when the attempt ends."""


class QueueUnavailable(AdminError):
    """The queue's storage failed (the database is down, a disk error): nothing was changed; try again."""

    status = 503


@dataclass(frozen=True, slots=True)
class QueueEntry:
    envelope: Envelope
    frozen_links: frozenset[str] = frozenset()
    leased_by: str = ""  # the node delivering it right now ("" when nobody is)

    def status(self, now: float) -> QueueStatus:
        """Its state and next attempt as every view shows them (`model.queue_status_of`): frozen, retry
        (tried before, or held until later by its link's backoff or budget), ready (due now, never tried)."""
        return queue_status(self.envelope, self.frozen_links, now)

    def to_json(self, now: float) -> dict[str, Any]:
        env = self.envelope
        status = self.status(now)
        return {
            "id": env.id,
            "state": status.state,
            "age_seconds": round(now - env.received_at, 1),
            "size": env.size,
            "sender": env.sender,
            "source": env.source.value,
            "next_attempt": status.next_attempt,
            "leased_by": self.leased_by,
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
    # The link's sending budget (a connector's rate / recipients_per_day), from the running service:
    # e.g. "rate 30/min: 12 used, next free in 8s; recipients 340/10000 per day"; "" without limits.
    budget: str = ""


def summarize_links(
    summary: QueueSummary, now: float, frozen_links: frozenset[str] = frozenset()
) -> list[LinkSummary]:
    """The queue's summary per link, busiest first (like Postfix's qshape). A frozen link with nothing
    queued is listed too, so it can be thawed from where it was frozen."""
    out = []
    for link, stats in summary.links.items():
        if link in frozen_links or stats.states == {"frozen"}:
            state = "frozen"
        else:
            state = "retry" if "retry" in stats.states else "ready"
        out.append(
            LinkSummary(
                link=link,
                messages=stats.messages,
                recipients=stats.recipients,
                oldest_age=max(0.0, now - stats.oldest),
                state=state,
                next_attempt=None if state == "frozen" else stats.next_due,
                ids=stats.sample,
            )
        )
    for link in frozen_links - set(summary.links):
        out.append(LinkSummary(link, 0, 0, 0.0, "frozen", None))
    return sorted(out, key=lambda s: (-s.messages, s.link))


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
        statuses = [entry.status(now) for entry, _ in members]
        states = {status.state for status in statuses}
        dues = [status.next_attempt for status in statuses if status.next_attempt is not None]
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


class QueueOpener(Protocol):
    """How an admin tool opens the queue of a configuration: `app.open_queue`, the one place backends are
    built, passed in by the CLI (admin does not import the composition root above it)."""

    def __call__(self, config: Config, event_log: EventLog, *, for_tool: bool) -> Awaitable[QueueStore]: ...


class QueueAdmin:
    def __init__(
        self,
        store: QueueStore,
        live: LiveConfig,
        event_log: EventLog,
        reporter: Reporter,
        scheduler: Scheduler | None = None,
        where: str = "",
        summaries: Callable[[], Awaitable[QueueSummary]] | None = None,
    ) -> None:
        self.store = store
        # The service's shared, rate-limited summary (the metrics use it too); a tool asks the store.
        self.summaries = summaries
        self.live = live  # the service's configuration holder (a tool's own): a reload reaches this part too
        self.events = event_log
        self.reporter = reporter
        self.scheduler = scheduler  # None: no service in this process (its files, or the database)
        self._where = where
        self.jobs = JobTable()  # the bulk jobs run in this process's event loop

    @property
    def config(self) -> Config:
        return self.live.current

    @property
    def where(self) -> str:
        if self._where:
            return self._where
        return "the running service" if self.scheduler is not None else "the queue files (service stopped)"

    @classmethod
    def attach(
        cls, scheduler: Scheduler, summaries: Callable[[], Awaitable[QueueSummary]] | None = None
    ) -> QueueAdmin:
        """The admin layer of a running service: the live queue, its scheduler, its reporter, and the
        service's summary of the queue."""
        where = ""
        if scheduler.queue.shared:
            where = f"the cluster queue through node {scheduler.queue.node_id}"
        return cls(
            scheduler.queue, scheduler.live, scheduler.events, scheduler.reports, scheduler, where, summaries
        )

    @classmethod
    @asynccontextmanager
    async def offline(cls, config: Config, open_queue: QueueOpener) -> AsyncIterator[QueueAdmin]:
        """Open the queue without a service in this process, for the duration of the block, with
        `open_queue` (the composition root's `app.open_queue`, handed over by the CLI): the files of a
        stopped service (with its lock; raises ServiceRunning when the service holds it: reach it through
        its admin API instead), or the PostgreSQL queue of a cluster (no lock: the database decides)."""
        root = Path(config.server.root)
        event_log = EventLog(root / "log" / "events.jsonl", stream=None)
        try:
            store = await _opened(open_queue, config, event_log)
            try:
                live = LiveConfig(config)
                ingest = Ingest(store, live, event_log)
                reporter = Reporter(store, live, ingest, event_log, root / "badmail")
                where = "the queue files (service stopped)"
                if store.shared:
                    where = f"the cluster queue in PostgreSQL at {pgschema.describe(config.queue.dsn)}"
                admin = cls(store, live, event_log, reporter, where=where)
                try:
                    yield admin
                finally:
                    await admin.jobs.close("the command ended (interrupted)")
            finally:
                await store.close()
        finally:
            event_log.close()

    # -- reading -------------------------------------------------------------------------------------
    async def entries(
        self, state: str = "", to: str = "", domain: str = "", link: str = "", limit: int = LIST_LIMIT
    ) -> list[QueueEntry]:
        """Queued messages, oldest first, filtered by state, recipient address, domain or link: the first
        `limit` that match (a queue of a million messages is not listed whole). Envelopes are read in id
        order (the oldest first) a batch at a time, the event loop free in between, until `limit` match."""
        frozen_links = await self._read(self.store.frozen_links())
        holders = await self._read(self.store.holders())
        now = time.time()
        out: list[QueueEntry] = []
        for batch in await self._oldest_first(await self._read(self.store.ids())):
            for envelope in await self._read_many(batch):
                entry = QueueEntry(envelope, frozen_links, holders.get(envelope.id, ""))
                if state and entry.status(now).state != state:
                    continue
                if to and not any(r.address.lower() == to.lower() for r in envelope.recipients):
                    continue
                if domain and not any(r.domain == domain.lower().rstrip(".") for r in envelope.recipients):
                    continue
                if link and not any(r.route == link for r in envelope.pending):
                    continue
                out.append(entry)
            if len(out) >= limit:
                break
        return sorted(out, key=lambda e: e.envelope.received_at)[:limit]

    async def listing(
        self, state: str = "", to: str = "", domain: str = "", link: str = "", limit: int = LIST_LIMIT
    ) -> dict[str, Any]:
        """`entries` as one JSON document: what `GET /api/queue` answers and `queue list --json` prints
        (one shape for scripts, whichever they use)."""
        entries = await self.entries(state, to, domain, link, limit)
        now = time.time()
        return {
            "where": self.where,
            "queued": await self.count(),
            "limit": limit,
            "frozen_links": sorted(await self.frozen_links()),
            "messages": [
                {**e.to_json(now), "in_flight": bool(e.leased_by), "envelope": e.envelope.to_json()}
                for e in entries
            ],
        }

    async def entries_of(self, ids: list[str]) -> list[QueueEntry]:
        """These messages (those still queued), as `entries` gives them."""
        frozen_links = await self._read(self.store.frozen_links())
        holders = await self._read(self.store.holders())
        out = []
        for start in range(0, len(ids), READ_BATCH):
            for envelope in await self._read_many(ids[start : start + READ_BATCH]):
                out.append(QueueEntry(envelope, frozen_links, holders.get(envelope.id, "")))
        return out

    async def count(self) -> int:
        return await self._read(self.store.count())

    async def _oldest_first(self, ids: list[str]) -> list[list[str]]:
        """`ids` sorted (ids begin with the time they were made, so: oldest first), in batches; sorted a
        chunk at a time and merged, so a million ids do not hold the loop for the whole sort."""
        runs = []
        for start in range(0, len(ids), SORT_CHUNK):
            runs.append(sorted(ids[start : start + SORT_CHUNK]))
            await asyncio.sleep(0)
        merged = list(heapq.merge(*runs)) if len(runs) > 1 else (runs[0] if runs else [])
        return [merged[start : start + READ_BATCH] for start in range(0, len(merged), READ_BATCH)]

    async def _read_many(self, ids: list[str]) -> list[Envelope]:
        envelopes = [e for e in [await self._read(self.store.get(q)) for q in ids] if e is not None]
        await asyncio.sleep(0)
        return envelopes

    async def summary(self, now: float) -> list[LinkSummary]:
        """Per link, from the queue's index (QueueStore.summary, through the shared cache when the service
        has one): what waits, how old, the next retry, and the ids of its oldest messages."""
        summary = await self._read(self.summaries() if self.summaries is not None else self.store.summary())
        links = summarize_links(summary, now, await self._read(self.store.frozen_links()))
        return self._with_budgets(links, now)

    def _with_budgets(self, links: list[LinkSummary], now: float) -> list[LinkSummary]:
        """The budget used of each link with a provider's limits (the running service counts it); such a
        link is listed even with nothing queued, so the operator sees how much of the day is gone."""
        if self.scheduler is None:
            return links
        views = {view.link: view for view in self.scheduler.budget_views(now)}
        out = [
            replace(link, budget=views[link.link].text(now)) if link.link in views else link for link in links
        ]
        listed = {link.link for link in links}
        out.extend(
            LinkSummary(link, 0, 0, 0.0, "ready", None, budget=view.text(now))
            for link, view in sorted(views.items())
            if link not in listed
        )
        return out

    async def frozen_links(self) -> frozenset[str]:
        return await self.store.frozen_links()

    async def holders(self) -> dict[str, str]:
        """Queue id -> the node delivering it now."""
        return await self.store.holders()

    async def get(self, queue_id: str) -> Envelope:
        envelope = await self._read(self.store.get(queue_id))
        if envelope is None:
            raise NotFound(f"no message {queue_id!r} in the queue (see `smtpsvc queue list`)")
        return envelope

    async def headers(self, queue_id: str) -> bytes:
        await self.get(queue_id)
        try:
            with await self.store.open_message(queue_id) as fh:
                return split_headers(fh.read(HEADER_LIMIT))
        except QueueError as exc:
            raise QueueUnavailable(f"cannot read message {queue_id}: {exc}") from None

    async def leased_by(self, queue_id: str) -> str:
        """The node delivering the message right now, or ""."""
        return (await self._read(self.store.holders())).get(queue_id, "")

    async def in_flight(self, queue_id: str) -> bool:
        return bool(await self.leased_by(queue_id))

    @staticmethod
    async def _read(step: Awaitable[T]) -> T:
        try:
            return await step
        except QueueError as exc:
            raise QueueUnavailable(str(exc)) from None

    # -- one message ---------------------------------------------------------------------------------
    async def freeze(self, queue_id: str) -> Envelope:
        """Hold a message: it is kept, and not delivered, until thawed (Exchange Queue Viewer Freeze)."""
        return await self._set_frozen(queue_id, True, "frozen")

    async def thaw(self, queue_id: str) -> Envelope:
        return await self._set_frozen(queue_id, False, "thawed")

    async def _set_frozen(self, queue_id: str, frozen: bool, action: str) -> Envelope:
        await self.get(queue_id)
        envelope = await self._read(self.store.set_frozen(queue_id, frozen))
        if envelope is None:
            raise NotFound(f"no message {queue_id!r} in the queue (see `smtpsvc queue list`)")
        await self._changed(envelope, action)
        return envelope

    async def retry(self, queue_id: str) -> Envelope:
        """Force Connection: every pending recipient is due now (at the next start for a stopped service)."""
        envelope = await self.get(queue_id)
        if envelope.frozen:
            raise AdminError(f"{queue_id} is frozen; thaw it first (`smtpsvc queue thaw {queue_id}`)")
        await self._make_due(envelope, time.time())
        await self._changed(envelope, "retry forced")
        return await self.get(queue_id)

    async def delete(self, queue_id: str, ndr: bool = False) -> Envelope:
        """Remove a message; with `ndr`, its undelivered recipients are reported to the sender first
        (status 4.3.2, or Badmail for a null sender), and the NDR is queued before the message goes."""
        envelope = await self._delete(queue_id, ndr)
        self._log(envelope, "deleted with an NDR to the sender" if ndr else "deleted without a report")
        return envelope

    async def _delete(self, queue_id: str, ndr: bool) -> Envelope:
        envelope = await self.get(queue_id)
        holder = await self.leased_by(queue_id)
        if holder:
            on = f" by node {holder}" if self.store.shared else ""
            raise BeingDelivered(
                f"{queue_id} is being delivered right now{on}; freeze it and delete it when the attempt ends"
            )
        if ndr:
            await self._report_deleted(envelope)
        await self._read(self.store.delete(queue_id))
        return envelope

    async def _report_deleted(self, envelope: Envelope) -> None:
        """The NDR of a delete: the message is frozen meanwhile, so no node delivers it while it is made."""
        was_frozen = envelope.frozen
        if not was_frozen:
            await self._read(self.store.set_frozen(envelope.id, True))
        failed = [r for r in envelope.recipients if r.outstanding]
        for rcpt in envelope.pending:
            rcpt.state, rcpt.status, rcpt.last_reply = RecipientState.FAILED, DELETED_STATUS, DELETED_TEXT
        try:
            await self.reporter.failure(envelope, failed)
        except (QueueError, OSError) as exc:
            if not was_frozen:
                await self._read(self.store.set_frozen(envelope.id, False))
            raise QueueUnavailable(
                f"cannot queue the NDR for {envelope.id} ({exc}); the message is kept"
            ) from None

    async def recategorize(self, queue_id: str = "", progress: Progress | None = None) -> int:
        """ResetMessageStatus by hand: recompute every pending recipient's route from the config and make the
        message due now (one message, or all; frozen ones are left alone). Returns how many messages were
        re-routed. All of them is a bulk job's work (`start_job`); `progress` hears how far it is."""
        if queue_id and (await self.get(queue_id)).frozen:
            raise AdminError(f"{queue_id} is frozen; thaw it first (`smtpsvc queue thaw {queue_id}`)")
        if self.scheduler is not None and not queue_id:
            # The scheduler also forgets which connectors it found down; it reports no progress of its own.
            total = await self._read(self.store.count())
            if progress is not None:
                progress(0, total)
            count = await self._read(self.scheduler.recategorize())
            if progress is not None:
                progress(total, total)
        else:
            config = self.config
            done = await self._read(
                self.store.recategorize(
                    lambda address: route_for(address, config).link,
                    time.time(),
                    queue_id=queue_id,
                    progress=progress,
                )
            )
            self._forget_backoff(set(done.links))
            count = done.messages
            if count and self.scheduler is not None:
                self.scheduler.wake()
        self.events.emit(
            events.Event(
                events.RECATEGORIZED,
                f"ResetMessageStatus by the administrator: {count} queued message(s) re-categorized",
                queue_id=queue_id,
                cause="reset-message-status",
            )
        )
        return count

    # -- many messages / links: background jobs --------------------------------------------------------
    async def start_job(self, request: BulkRequest) -> tuple[JobStatus, bool]:
        """Start a bulk job, or (False) find the one already doing this request. A request that cannot
        work (a frozen link to retry, a link to thaw that is not frozen) is refused here, at once; the
        work then runs in this event loop while the caller polls `job(id)`."""
        problem = request.problem()
        if problem:
            raise BadRequest(problem)
        already = self.jobs.running(request)
        if already is not None:
            return already, False
        await self._check(request)
        try:
            return self.jobs.start(request, lambda progress: self._job(request, progress))
        except JobStopped as exc:
            raise QueueUnavailable(f"no new job now: {exc}") from None

    async def job(self, job_id: str) -> JobStatus:
        status = self.jobs.get(job_id)
        if status is None:
            raise NotFound(
                f"no job {job_id!r} here (see `smtpsvc queue jobs`; the running service keeps the "
                f"newest {KEEP} until it stops, and a stopped one's bulk commands run within the command)"
            )
        return status

    async def recent_jobs(self) -> list[JobStatus]:
        """Running and recent jobs, newest first."""
        return self.jobs.list()

    async def _check(self, request: BulkRequest) -> None:
        if request.link and request.kind == "retry":
            await self._refuse_frozen(request.link)
        if request.link and request.kind == "thaw":
            await self._refuse_not_frozen(request.link)

    async def _refuse_frozen(self, link: str) -> None:
        if link in await self._read(self.store.frozen_links()):
            raise AdminError(f"link {link!r} is frozen; thaw it first (`smtpsvc queue thaw --link {link}`)")

    async def _refuse_not_frozen(self, link: str) -> None:
        if link not in await self._read(self.store.frozen_links()):
            raise AdminError(f"link {link!r} is not frozen (see `smtpsvc queue summary`)")

    async def _job(self, request: BulkRequest, progress: Progress) -> Outcome:
        """One bulk job's work and its one event 9006, done or failed (never one per message)."""
        job = f" (job {progress.job_id})" if progress.job_id else ""
        try:
            outcome = await self._bulk(request, progress)
        except Exception as exc:
            seen = f" after {progress.done} of {progress.total} message(s)" if progress.total else ""
            self._log(None, f"{request.description} failed{seen}{job}: {exc}")
            raise
        self._log(None, outcome.message + job)
        return outcome

    async def _bulk(self, request: BulkRequest, progress: Progress) -> Outcome:
        if request.kind == "retry":
            return await self.retry_where(request.domain, request.link, progress)
        if request.kind == "recategorize":
            count = await self.recategorize("", progress)
            return Outcome(count, f"ResetMessageStatus: {count} queued message(s) re-categorized")
        if request.link:
            return await self.set_link_frozen(request.link, request.kind == "freeze", progress)
        if request.kind in ("freeze", "thaw"):
            return await self.set_frozen_all(request.kind == "freeze", progress)
        return await self.delete_all(request.ndr, progress)

    async def retry_where(
        self, domain: str = "", link: str = "", progress: Progress | None = None
    ) -> Outcome:
        """Force Connection for the pending recipients at `domain`, or on `link`, or (with neither) of every
        message. Frozen messages are left alone, and retrying a frozen link is refused; a recipient made
        due that waits on a frozen link (retry all, or by domain) goes once the link is thawed."""
        progress = progress or Progress()
        now = time.time()
        if link:
            await self._refuse_frozen(link)
        # One queue operation, whatever the size of the queue (it works in batches, and on a spool still
        # being recovered it waits for the whole queue to be known); it makes nothing claimable before the
        # backoff is lifted. It reports no progress of its own: before and after.
        total = await self._read(self.store.count())
        progress(0, total)
        done = await self._read(self.store.make_due(now, domain=domain, link=link))
        self._forget_backoff(set(done.links))
        count = done.messages
        progress(total, total)
        if count and self.scheduler is not None:
            self.scheduler.wake()
        what = f"link {link}" if link else (f"domain {domain}" if domain else "every link")
        return Outcome(count, f"retry forced for {what}: {count} message(s)")

    async def set_link_frozen(self, link: str, frozen: bool, progress: Progress | None = None) -> Outcome:
        """Freeze a next hop: its mail stays queued (and new mail for it is still accepted) until thawed.
        Thaw it: its mail goes at its next retry time (or now, with a retry)."""
        if not frozen:
            await self._refuse_not_frozen(link)
        await self._read(self.store.set_link_frozen(link, frozen))
        if not frozen and self.scheduler is not None:
            self.scheduler.wake()
        stats = (await self._read(self.store.summary())).links.get(link)  # the index, not the envelopes
        count = stats.messages if stats else 0
        if progress is not None:
            progress(count, count)
        return Outcome(
            count, f"link {link} {'frozen' if frozen else 'thawed'} ({count} message(s) wait on it)"
        )

    async def set_frozen_all(self, frozen: bool, progress: Progress | None = None) -> Outcome:
        """Freeze (or thaw) every queued message that is not (or is) frozen. A message being delivered
        counts: its freeze applies when the attempt ends."""

        async def one(queue_id: str) -> str:
            envelope = await self._read(self.store.set_frozen(queue_id, frozen))
            if envelope is not None and not frozen and self.scheduler is not None:
                self.scheduler.wake()
            return GONE if envelope is None else CHANGED

        ids = await self._read(self.store.ids(frozen=not frozen))
        count, _ = await self._each(ids, one, progress or Progress())
        return Outcome(count, f"every queued message {'frozen' if frozen else 'thawed'}: {count} message(s)")

    async def delete_all(self, ndr: bool, progress: Progress | None = None) -> Outcome:
        """Delete every queued message (as it was when the job started: its own NDRs are not), each with
        an NDR to its sender when `ndr`. A message being delivered right now is left (counted as `left`)."""

        async def one(queue_id: str) -> str:
            try:
                await self._delete(queue_id, ndr)
            except BeingDelivered:
                return LEFT
            except NotFound:
                return GONE
            return CHANGED

        ids = await self._read(self.store.ids())
        count, left = await self._each(ids, one, progress or Progress())
        how = "with an NDR to each sender" if ndr else "without a report"
        text = f"every queued message deleted {how}: {count} message(s)"
        if left:
            text += f"; {left} being delivered right now left in the queue (freeze them, then delete them)"
        return Outcome(count, text, left)

    async def _each(
        self, ids: list[str], one: Callable[[str], Awaitable[str]], progress: Progress
    ) -> tuple[int, int]:
        """`one` on every id, BATCH at a time (together, so the queue's writes share their fsyncs), the
        event loop free between batches; progress after each. Returns how many changed and how many were
        left alone. The first error ends the work (after its batch): what was changed stays changed."""
        changed = left = 0
        total = len(ids)
        progress(0, total)
        for start in range(0, total, BATCH):
            results = await asyncio.gather(
                *(one(q) for q in ids[start : start + BATCH]), return_exceptions=True
            )
            changed += results.count(CHANGED)
            left += results.count(LEFT)
            progress(min(start + BATCH, total), total)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            await progress.next_batch()
        return changed, left

    # -- helpers -------------------------------------------------------------------------------------
    async def _make_due(self, envelope: Envelope, now: float) -> None:
        """Every pending recipient due now; a delivery under way makes them due again when it ends."""
        await self._read(self.store.make_due(now, queue_id=envelope.id))
        self._forget_backoff({r.route for r in envelope.pending})

    def _forget_backoff(self, links: set[str]) -> None:
        if self.scheduler is not None:
            self.scheduler.forget_backoff(links)

    async def _changed(self, envelope: Envelope, action: str) -> None:
        """After a change to one message: wake the scheduler and log it (event 9006)."""
        if self.scheduler is not None:
            self.scheduler.wake()
        holder = await self.leased_by(envelope.id)
        suffix = " (it is being delivered now; this applies when the attempt ends)" if holder else ""
        self._log(envelope, action + suffix)

    # -- message tracking ----------------------------------------------------------------------------
    async def track(
        self,
        sender: str = "",
        recipient: str = "",
        queue_id: str = "",
        since: str = "",
        limit: int = TRACK_LIMIT,
    ) -> dict[str, Any]:
        """`smtpsvc track` and `GET /api/track` (one document for both): what the event log and the protocol
        log say about the messages that match, the newest first, each with its state now."""
        now = time.time()
        try:
            query = tracking.TrackQuery(
                sender.strip(),
                recipient.strip(),
                queue_id.strip(),
                tracking.parse_since(since, now) if since.strip() else None,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        config = self.config
        root = Path(config.server.root)
        folder = config.protocol_log.folder(root)
        records, lines = await asyncio.to_thread(_read_logs, root / "log" / "events.jsonl", folder)
        found = tracking.track(records, lines, query, queued=(), limit=max(1, limit))
        for message in found:  # recipients left: in the queue still, or gone (deleted, logs cut)?
            if message.state != tracking.UNKNOWN:
                continue
            if await self._read(self.store.get(message.id)) is not None:
                message.state = tracking.QUEUED
        return {
            "where": self.where,
            "protocol_log": str(folder) if config.protocol_log.enabled else "",
            "limit": limit,
            "messages": [m.to_json() for m in found],
        }

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


def _read_logs(events_path: Path, folder: Path) -> tuple[list[dict[str, Any]], list[protolog.LogLine]]:
    """The event log's records and the protocol log's lines (read in a thread: they may be large)."""
    return events.read_events(events_path), protolog.read_log(folder)


async def _opened(open_queue: QueueOpener, config: Config, event_log: EventLog) -> QueueStore:
    """The queue for an admin tool, or the AdminError that says why not."""
    try:
        return await open_queue(config, event_log, for_tool=True)
    except QueueLocked as exc:
        raise ServiceRunning(str(exc)) from None
    except QueueError as exc:
        raise QueueUnavailable(str(exc)) from None
    except OSError as exc:
        folder = Path(config.server.root) / "queue"
        raise QueueUnavailable(f"cannot open the queue folder {folder}: {exc.strerror or exc}") from None


class ServiceRunning(AdminError):
    """The spool is locked by the running service: reach it through its admin API."""
