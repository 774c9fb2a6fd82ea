"""Prometheus metrics (`GET /metrics`, SPEC 1.5), kept apart from the mail pipeline.

Most counters are derived from the event log: `Metrics.on_event` subscribes to `EventLog` and counts what
the pipeline already reports (messages queued by source with their size, reports, Badmail, expiries, every
event id). What the events do not carry comes through three small hooks, each optional for the pipeline:

- `SessionContext.metrics` (the `SessionObserver` protocol of `server/session.py`): connections, open
  sessions, commands by verb, replies by class, the end-of-data → `250` time;
- `Scheduler.delivery_observer`: the result of every recipient's attempt (a deferral logs no per-recipient
  event) and how long each route group's attempt took;
- `queue_snapshot`: the queued envelopes, read at scrape time by a custom collector, so the queue gauges are
  always the truth of the moment rather than something kept in step by hand. The service feeds it from a
  `QueueView`, refreshed from the queue (`QueueStore`, async: with PostgreSQL the whole cluster's queue)
  just before each scrape.

`loop_lag`, the event-loop lag histogram, is fed by a `looplag.LoopLagMonitor` the service runs.

`watch_budgets` adds the providers' limits (a connector's `rate` and `recipients_per_day`, as the
scheduler's `budget_views` reads them at scrape time): used and limit per link.

Every `Metrics` has its own `CollectorRegistry` (never the process-wide default), so several services can
run in one process (the tests do) without their series colliding.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from smtpsvc import events
from smtpsvc.model import QUEUE_STATES, DeliveryResult, Envelope, Source
from smtpsvc.protocol import VERBS, Rejected
from smtpsvc.queue.base import LinkStats, QueueError, QueueStore, QueueSummary

PREFIX = "smtpsvc_"
OTHER = "other"  # the label value for anything outside a bounded label set
OTHER_LINKS = "(other)"  # the links beyond `max_links`, together (parentheses: never a domain name)

# A label set must stay bounded whatever a client sends: known verbs, else "other".
KNOWN_VERBS = frozenset(VERBS)
_VERB_OF_EVENT: dict[type, str] = {spec.event: verb for verb, spec in VERBS.items()}
SOURCES = tuple(s.value for s in Source)
DSN_KINDS = ("failure", "delay", "success")
RESULTS = ("delivered", "deferred", "failed")
TRANSPORTS = ("drop", "smtp", "graph")
REPLY_CLASSES = ("2xx", "3xx", "4xx", "5xx")
BADMAIL_REASONS = ("undeliverable-report", "pickup-invalid")

# End of DATA → 250 is an fsync (group commit): milliseconds normally, seconds on a struggling disk.
ACCEPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A route group's attempt: a Drop write (ms) up to an SMTP conversation with failover (delivery.timeout).
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# How late the event loop woke a 50 ms sleep (looplag.py): about a millisecond when idle; 0.1 s is the
# point where a greeting or an admin request visibly waits; a start-up or a long synchronous pass, seconds.
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Event 3001's Postfix-shaped track line: "from=<a@b>, size=123, nrcpt=1, source=smtp[, sasl_username=u]".
_TRACK_SIZE = re.compile(r"(?:^|, )size=(\d+)(?:,|$)")
_TRACK_SOURCE = re.compile(r"(?:^|, )source=([a-z]+)(?:,|$)")


_ADDABLE = frozenset({"counter", "gauge", "histogram"})
_SUFFIXES = ("", "_total", "_bucket", "_count", "_sum")
_Key = tuple[str, tuple[tuple[str, str], ...]]


class WorkerSamples:
    """The SMTP workers' series added up: (sample name, labels) -> value. Pure."""

    def __init__(self) -> None:
        self._values: dict[_Key, float] = {}
        self._types: dict[_Key, str] = {}

    def __bool__(self) -> bool:
        return bool(self._values)

    def add(self, samples: Iterable[Sequence[Any]], *, counters_only: bool = False) -> None:
        """Add [type, name, labels, value] items; `counters_only`: not the gauges (a worker that exited has
        no open sessions any more, but what it counted stays counted)."""
        for item in samples:
            try:
                kind, name, labels, value = item
                key = (str(name), tuple(sorted((str(k), str(v)) for k, v in dict(labels).items())))
                number = float(value)
            except (TypeError, ValueError):
                continue  # a malformed item from a worker is left out, never a failed scrape
            if counters_only and kind == "gauge":
                continue
            self._values[key] = self._values.get(key, 0.0) + number
            self._types[key] = str(kind)

    def items(self) -> list[list[Any]]:
        return [[self._types[key], key[0], dict(key[1]), value] for key, value in self._values.items()]

    def get(self, key: _Key) -> float | None:
        return self._values.get(key)

    def series(self) -> Iterable[_Key]:
        return self._values.keys()


class _Merged:
    """This process's registry with the workers' values added to the same series (and their series this
    process has none of, e.g. an event id only a worker logged)."""

    def __init__(self, base: CollectorRegistry, workers: WorkerSamples) -> None:
        self._base = base
        self._workers = workers

    def collect(self) -> Iterator[Metric]:
        for family in self._base.collect():
            names = {family.name + suffix for suffix in _SUFFIXES}
            seen: set[_Key] = set()
            samples: list[Sample] = []
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                seen.add(key)
                extra = self._workers.get(key) if family.type in _ADDABLE else None
                samples.append(sample._replace(value=sample.value + extra) if extra else sample)
            if family.type in _ADDABLE:
                for key in self._workers.series():
                    if key[0] in names and key not in seen:
                        samples.append(Sample(key[0], dict(key[1]), self._workers.get(key) or 0.0))
            family.samples = samples
            yield family


class BudgetReading(Protocol):
    """One link's sending budget as the gauges read it (delivery/budget.py `BudgetView`)."""

    @property
    def link(self) -> str: ...
    @property
    def rate_limit(self) -> int: ...
    @property
    def rate_used(self) -> int: ...
    @property
    def recipients_per_day(self) -> int: ...
    @property
    def recipients_used(self) -> int: ...
    @property
    def next_free(self) -> float: ...


class Metrics:
    """The service's metrics. Wire it with `EventLog.subscribe(metrics.on_event)`, `SessionContext.metrics =
    metrics`, `Scheduler.delivery_observer = metrics.delivery_group`, and serve `render()`.

    `queue_summary` returns the queue's summary (`QueueView.summary`, refreshed before each scrape, or
    `queue.base.summary_of` over some envelopes). `queue_lookup`
    (`QueueStore.recent`, `LocalSpool.get`) tells the kind of a report just queued (event 3001 does not say
    it); without it the kind is counted as "unknown". `frozen_links` makes a message waiting only on frozen
    links count as frozen, as `smtpsvc queue` shows it.
    """

    def __init__(
        self,
        queue_summary: Callable[[], QueueSummary] | None = None,
        queue_lookup: Callable[[str], Envelope | None] | None = None,
        frozen_links: Callable[[], frozenset[str]] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        max_links: int = 100,
    ) -> None:
        self.registry = CollectorRegistry()
        self._lookup = queue_lookup
        self._clock = clock
        r = self.registry

        # -- inbound SMTP (session hook) --
        self.connections = Counter(
            PREFIX + "smtp_connections_total",
            "Inbound SMTP connections accepted (sessions started).",
            registry=r,
        )
        self.sessions = Gauge(PREFIX + "smtp_sessions", "Inbound SMTP sessions open now.", registry=r)
        self.commands = Counter(
            PREFIX + "smtp_commands_total",
            "SMTP commands received, by verb (known verbs, else other), refused ones included.",
            ["verb"],
            registry=r,
        )
        self.replies = Counter(
            PREFIX + "smtp_replies_total", "Replies sent to SMTP commands, by class.", ["class"], registry=r
        )
        self.accept_seconds = Histogram(
            PREFIX + "smtp_accept_duration_seconds",
            "From the end of DATA (or BDAT LAST) to the 250 reply, the durable queueing (fsync) included.",
            buckets=ACCEPT_BUCKETS,
            registry=r,
        )
        # -- submission (events) --
        self.received = Counter(
            PREFIX + "messages_received_total",
            "Messages queued (event 3001), by source: smtp, pickup, dsn (our reports), replay.",
            ["source"],
            registry=r,
        )
        self.received_bytes = Counter(
            PREFIX + "received_bytes_total",
            "Bytes of the messages queued, by source.",
            ["source"],
            registry=r,
        )
        self.pickup_files = Counter(
            PREFIX + "pickup_files_total",
            "Pickup files taken: queued, or invalid (moved to Badmail).",
            ["result"],
            registry=r,
        )
        # -- delivery (scheduler hook and events) --
        self.attempts = Counter(
            PREFIX + "delivery_attempts_total",
            "Delivery attempts per recipient, by result (delivered, deferred: will retry, failed: permanent) "
            "and transport (drop, smtp).",
            ["result", "transport"],
            registry=r,
        )
        self.delivery_seconds = Histogram(
            PREFIX + "delivery_duration_seconds",
            "Duration of one delivery attempt of a route group (Drop write, or SMTP with host failover).",
            ["transport"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.expired = Counter(
            PREFIX + "recipients_expired_total",
            "Recipients that failed because delivery.expiration passed (event 3004, cause expired).",
            registry=r,
        )
        self.dsn_sent = Counter(
            PREFIX + "dsn_sent_total",
            "Delivery status notifications queued, by kind (failure = NDR, delay, success).",
            ["kind"],
            registry=r,
        )
        self.badmail = Counter(
            PREFIX + "badmail_writes_total",
            "Badmail items written (or discarded under badmail.max_size = 0), by reason (event 3005).",
            ["reason"],
            registry=r,
        )
        self.badmail_trimmed = Counter(
            PREFIX + "badmail_trims_total",
            "Times the Badmail folder was trimmed to badmail.max_size (event 3005, cause badmail-cap).",
            registry=r,
        )
        self.event_count = Counter(
            PREFIX + "events_total", "Events written to the event log, by event id.", ["id"], registry=r
        )
        # -- the process itself (looplag.LoopLagMonitor feeds it) --
        self.loop_lag = Histogram(
            PREFIX + "event_loop_lag_seconds",
            "How much later than asked the event loop woke a 50 ms sleep: every SMTP session, delivery and "
            "admin request of the process waits as long.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        if queue_summary is not None:
            r.register(_QueueCollector(queue_summary, frozen_links, clock, max_links))

        # Known label values start at 0, so a rate() or an alert sees the series before the first increment.
        # The per-command and per-reply children are kept: labels() on every command was a visible cost.
        self._command_child = {verb: self.commands.labels(verb) for verb in (*sorted(KNOWN_VERBS), OTHER)}
        self._reply_child = {int(cls[0]): self.replies.labels(cls) for cls in REPLY_CLASSES}
        for source in SOURCES:
            self.received.labels(source)
            self.received_bytes.labels(source)
        for result in ("queued", "invalid"):
            self.pickup_files.labels(result)
        for result in RESULTS:
            for transport in TRANSPORTS:
                self.attempts.labels(result, transport)
        for transport in TRANSPORTS:
            self.delivery_seconds.labels(transport)
        for kind in DSN_KINDS:
            self.dsn_sent.labels(kind)
        for reason in BADMAIL_REASONS:
            self.badmail.labels(reason)

    def render(self, workers: WorkerSamples | None = None) -> tuple[bytes, str]:
        """The exposition (body, Content-Type) for `GET /metrics`; with SMTP workers, their counters added
        to this process's (`WorkerPool.metric_samples`)."""
        if not workers:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Merged(self.registry, workers))
        return generate_latest(merged), CONTENT_TYPE_LATEST

    def samples(self) -> list[list[Any]]:
        """This process's series as [type, sample name, labels, value] (an SMTP worker's answer to its
        main process), creation times left out: they cannot be added up."""
        return [
            [family.type, sample.name, sample.labels, sample.value]
            for family in self.registry.collect()
            for sample in family.samples
            if not sample.name.endswith("_created") and family.type in _ADDABLE
        ]

    def watch_budgets(self, budgets: Callable[[], Sequence[BudgetReading]]) -> None:
        """Gauges of the links that have a provider's limits, read from `budgets()` at each scrape."""
        self.registry.register(_BudgetCollector(budgets, self._clock))

    # -- the event log subscriber ---------------------------------------------------------------------
    def on_event(self, event: events.Event) -> None:
        self.event_count.labels(str(event.id)).inc()
        if event.id == events.MESSAGE_QUEUED:
            self._queued(event)
        elif event.id == events.NDR_SENT and event.cause == "expired":
            self.expired.inc()
        elif event.id == events.BADMAIL_WRITTEN:
            if event.cause == "badmail-cap":
                self.badmail_trimmed.inc()
            elif event.cause == "pickup-invalid":
                self.badmail.labels("pickup-invalid").inc()
                self.pickup_files.labels("invalid").inc()
            else:
                self.badmail.labels("undeliverable-report").inc()  # a report to <> that failed

    def _queued(self, event: events.Event) -> None:
        found = _TRACK_SOURCE.search(event.track)
        source = found.group(1) if found and found.group(1) in SOURCES else OTHER
        size = _TRACK_SIZE.search(event.track)
        self.received.labels(source).inc()
        if size:
            self.received_bytes.labels(source).inc(int(size.group(1)))
        if source == Source.PICKUP:
            self.pickup_files.labels("queued").inc()
        elif source == Source.DSN:
            # The envelope is indexed before event 3001 is emitted, so the lookup finds the report here.
            envelope = self._lookup(event.queue_id) if self._lookup is not None else None
            kind = envelope.dsn_kind if envelope is not None else ""
            self.dsn_sent.labels(kind if kind in DSN_KINDS else "unknown").inc()

    # -- the session hook (server.session.SessionObserver) -------------------------------------------
    def session_opened(self) -> None:
        self.connections.inc()
        self.sessions.inc()

    def session_closed(self) -> None:
        self.sessions.dec()

    def protocol_event(self, event: object) -> None:
        """A protocol core event: commands are counted by verb; data, AUTH continuation lines and the like
        are not commands and are ignored."""
        if isinstance(event, Rejected):
            verb: str | None = event.verb if event.verb in KNOWN_VERBS else OTHER
        else:
            verb = _VERB_OF_EVENT.get(type(event))
        if verb is not None:
            child = self._command_child.get(verb)
            (child if child is not None else self.commands.labels(verb)).inc()

    def reply(self, code: int) -> None:
        child = self._reply_child.get(code // 100)
        (child if child is not None else self.replies.labels(OTHER)).inc()

    def message_accepted(self, seconds: float) -> None:
        self.accept_seconds.observe(seconds)

    # -- the scheduler hook --------------------------------------------------------------------------
    def delivery_group(self, kind: str, results: Sequence[DeliveryResult], seconds: float) -> None:
        """One route group's attempt: its transport ("drop" or "smtp"), each recipient's result, duration."""
        transport = kind if kind in TRANSPORTS else OTHER
        for result in results:
            outcome = "delivered" if result.ok else ("failed" if result.permanent else "deferred")
            self.attempts.labels(outcome, transport).inc()
        self.delivery_seconds.labels(transport).observe(seconds)


class QueueView:
    """The queue as the gauges read it (synchronously, inside `render()`): its summary, refreshed from the
    store (a pass over the index, or a database query) by `await refresh()` right before the scrape. On a
    large queue a summary costs a second of CPU: it is made again only once 20 times the time the last
    one took has passed, so summaries never take more than 5% of the service's time (a million messages:
    a fresh one every 20 s or so)."""

    def __init__(self, store: QueueStore, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self._summary = QueueSummary()
        self._frozen_links: frozenset[str] = frozenset()
        self._error: QueueError | None = None
        self._made = -float("inf")
        self._cost = 0.0
        self._making: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        """Make the summary again if it is older than its budget allows (and none is being made)."""
        fresh_for = SUMMARY_BUDGET * self._cost if self._cost >= QUICK_SUMMARY else 0.0
        if self._clock() - self._made < fresh_for and self._error is None:
            return
        if self._making is None:
            self._making = asyncio.ensure_future(self._make())
        await asyncio.shield(self._making)

    async def current(self) -> QueueSummary:
        """The summary now: the last one made at once (a new one is made meanwhile when it is stale, so a
        caller never waits for the second a million messages take); the very first one is awaited."""
        if self._made == -float("inf") or self._cost < QUICK_SUMMARY:
            await self.refresh()  # a small queue: its summary is always fresh
        elif self._making is None and (
            self._clock() - self._made >= SUMMARY_BUDGET * self._cost or self._error is not None
        ):
            self._making = asyncio.ensure_future(self._make())
        return self.summary()

    async def _make(self) -> None:
        started = self._clock()
        try:
            self._summary = await self._store.summary()
            self._frozen_links = await self._store.frozen_links()
            self._error = None
        except QueueError as exc:
            self._error = exc  # the scrape then shows no queue series rather than stale ones
        finally:
            self._made = self._clock()
            self._cost = self._made - started
            self._making = None

    def summary(self) -> QueueSummary:
        if self._error is not None:
            raise self._error
        return self._summary

    def frozen_links(self) -> frozenset[str]:
        return self._frozen_links


SUMMARY_BUDGET = 20  # a queue summary is made again after this many times what the last one took
QUICK_SUMMARY = 0.05  # a summary made this fast is awaited; a slower one (a large queue) is made meanwhile


class _QueueCollector:
    """Queue gauges from the queue's summary at each scrape (states and links as `smtpsvc queue` shows
    them: `model.queue_state`, `model.pending_by_link`)."""

    def __init__(
        self,
        summary: Callable[[], QueueSummary],
        frozen_links: Callable[[], frozenset[str]] | None,
        clock: Callable[[], float],
        max_links: int,
    ):
        self._summary = summary
        self._frozen_links = frozen_links
        self._clock = clock
        self._max_links = max_links

    def describe(self) -> Iterator[Metric]:
        # The names only: the registry checks them for duplicates without reading the queue at registration.
        yield from _queue_families().values()

    def collect(self) -> Iterator[Metric]:
        try:
            summary = self._summary()
            frozen = self._frozen_links() if self._frozen_links is not None else frozenset()
        except Exception:
            return  # the queue cannot be read now: the scrape shows no queue series rather than failing
        now = self._clock()
        f = _queue_families()
        for state in QUEUE_STATES:
            f["messages"].add_metric([state], summary.states.get(state, 0))
        for link, stats in self._bounded(summary.links):
            f["link_messages"].add_metric([link], stats.messages)
            f["link_recipients"].add_metric([link], stats.recipients)
            f["link_oldest"].add_metric([link], max(0.0, now - stats.oldest))
        oldest = summary.oldest
        f["oldest"].add_metric([], max(0.0, now - oldest) if oldest is not None else 0.0)
        f["bytes"].add_metric([], summary.bytes)
        f["frozen_links"].add_metric([], len(frozen))
        yield from f.values()

    def _bounded(self, links: dict[str, LinkStats]) -> list[tuple[str, LinkStats]]:
        """The busiest `max_links` links, the rest summed as one "(other)" link: MX routing makes a link per
        recipient domain, and a queue full of distinct domains must not make a series each. A message
        waiting for two of those links counts in "(other)" twice (the summary counts per link)."""
        ranked = sorted(links.items(), key=lambda item: (-item[1].messages, item[0]))
        if len(ranked) <= self._max_links:
            return ranked
        kept, rest = ranked[: self._max_links], [stats for _, stats in ranked[self._max_links :]]
        other = LinkStats(
            messages=sum(s.messages for s in rest),
            recipients=sum(s.recipients for s in rest),
            oldest=min(s.oldest for s in rest),
            next_due=None,
            states=frozenset(),
            sample=(),
        )
        return [*kept, (OTHER_LINKS, other)]


class _BudgetCollector:
    """The sending budgets at each scrape: per link with limits (a handful, from the configuration)."""

    def __init__(self, budgets: Callable[[], Sequence[BudgetReading]], clock: Callable[[], float]) -> None:
        self._budgets = budgets
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        yield from _budget_families().values()

    def collect(self) -> Iterator[Metric]:
        try:
            budgets = self._budgets()
        except Exception:
            return  # never fail a scrape for it
        now = self._clock()
        f = _budget_families()
        for b in budgets:
            if b.rate_limit:
                f["rate_limit"].add_metric([b.link], b.rate_limit)
                f["rate_used"].add_metric([b.link], b.rate_used)
            if b.recipients_per_day:
                f["rcpt_limit"].add_metric([b.link], b.recipients_per_day)
                f["rcpt_used"].add_metric([b.link], b.recipients_used)
            f["wait"].add_metric([b.link], max(0.0, b.next_free - now))
        yield from f.values()


def _budget_families() -> dict[str, GaugeMetricFamily]:
    return {
        "rate_limit": GaugeMetricFamily(
            PREFIX + "connector_rate_limit",
            "Messages this link (a connector, or smarthost) may send in its rate interval (its `rate`).",
            labels=["link"],
        ),
        "rate_used": GaugeMetricFamily(
            PREFIX + "connector_rate_used",
            "Messages this link sent (or is sending) within the last rate interval.",
            labels=["link"],
        ),
        "rcpt_limit": GaugeMetricFamily(
            PREFIX + "connector_recipients_per_day_limit",
            "Recipients this link may send to in any 24 hours (its `recipients_per_day`).",
            labels=["link"],
        ),
        "rcpt_used": GaugeMetricFamily(
            PREFIX + "connector_recipients_per_day_used",
            "Recipients this link sent to in the last 24 hours.",
            labels=["link"],
        ),
        "wait": GaugeMetricFamily(
            PREFIX + "connector_budget_wait_seconds",
            "Seconds until this link's budget lets the next message go (0: now).",
            labels=["link"],
        ),
    }


def _queue_families() -> dict[str, GaugeMetricFamily]:
    """Fresh, empty queue gauge families (a custom collector builds new ones at every scrape)."""
    return {
        "messages": GaugeMetricFamily(
            PREFIX + "queue_messages",
            "Queued messages by state: ready (never tried, due now), retry (failed before, or held until "
            "later by its link's backoff or budget), frozen (the message, or every link it waits for).",
            labels=["state"],
        ),
        "link_messages": GaugeMetricFamily(
            PREFIX + "queue_link_messages",
            "Queued messages with pending recipients for this link (next hop: drop, a connector, smarthost, "
            "or the recipient domain).",
            labels=["link"],
        ),
        "link_recipients": GaugeMetricFamily(
            PREFIX + "queue_link_recipients", "Pending recipients for this link.", labels=["link"]
        ),
        "link_oldest": GaugeMetricFamily(
            PREFIX + "queue_link_oldest_age_seconds",
            "Age of the oldest message with pending recipients for this link.",
            labels=["link"],
        ),
        "oldest": GaugeMetricFamily(
            PREFIX + "queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when the queue is empty).",
        ),
        "bytes": GaugeMetricFamily(PREFIX + "queue_bytes", "Bytes of the messages in the queue."),
        "frozen_links": GaugeMetricFamily(
            PREFIX + "queue_frozen_links", "Links (next hops) frozen by the operator."
        ),
    }
