"""Prometheus metrics: counters from events and hooks, queue gauges from envelopes, and end to end."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from smtpsvc import events
from smtpsvc.admin.service import QueueEntry, summarize
from smtpsvc.app import Service
from smtpsvc.events import Event, EventLog
from smtpsvc.looplag import LoopLagMonitor
from smtpsvc.metrics import Metrics
from smtpsvc.model import DeliveryResult, Envelope, Recipient, RecipientState, Source
from smtpsvc.protocol import (
    AuthResponse,
    Bdat,
    BdatEnd,
    Data,
    DataEnd,
    Ehlo,
    Mail,
    Quit,
    Rcpt,
    Rejected,
    replies,
)
from smtpsvc.queue.base import QueueSummary, summary_of
from smtpsvc.queue.local import LocalSpool
from tests.conftest import StartService, wait_until
from tests.sink import Sink
from tests.test_relay import drop_files, queue_is_empty, send

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NOW = 1_700_000_000.0


def scrape(metrics: Metrics) -> Samples:
    """Every sample of the exposition, parsed by prometheus_client's own parser."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """A sample's value; None when the series is absent (so a typo in a name cannot pass as 0)."""
    return samples.get((name, tuple(sorted(labels.items()))))


def queued_event(queue_id: str, source: str, size: int) -> Event:
    """Event 3001 as `ingest.commit` writes it."""
    return Event(
        events.MESSAGE_QUEUED,
        f"Message queued from {source}",
        queue_id=queue_id,
        track=f"from=<a@local.test>, size={size}, nrcpt=1, source={source}",
    )


def envelope(
    queue_id: str,
    received_at: float,
    *recipients: Recipient,
    frozen: bool = False,
    size: int = 100,
    dsn_kind: str = "",
) -> Envelope:
    return Envelope(
        id=queue_id,
        sender="a@local.test",
        recipients=list(recipients),
        received_at=received_at,
        frozen=frozen,
        size=size,
        dsn_kind=dsn_kind,
    )


# -- registry and exposition ---------------------------------------------------------------------------
def test_each_instance_has_its_own_registry_and_known_series_start_at_zero() -> None:
    first, second = Metrics(), Metrics()
    first.session_opened()
    a, b = scrape(first), scrape(second)
    assert value(a, "smtpsvc_smtp_connections_total") == 1
    assert value(b, "smtpsvc_smtp_connections_total") == 0
    assert value(b, "smtpsvc_smtp_commands_total", verb="MAIL") == 0
    assert value(b, "smtpsvc_delivery_attempts_total", result="deferred", transport="smtp") == 0
    assert value(b, "smtpsvc_dsn_sent_total", kind="delay") == 0
    assert value(b, "smtpsvc_event_loop_lag_seconds_count") == 0
    # nothing from the process-wide default registry (process_*, python_gc_*) leaks in
    assert all(name.startswith("smtpsvc_") for name, _ in a)


# -- counters from events ------------------------------------------------------------------------------
def test_events_drive_received_dsn_badmail_and_expiry_counters() -> None:
    reports = {"R1": envelope("R1", NOW, dsn_kind="delay"), "R2": envelope("R2", NOW, dsn_kind="failure")}
    metrics = Metrics(queue_lookup=reports.get)
    log = EventLog(None, stream=None)
    log.subscribe(metrics.on_event)
    log.emit(queued_event("M1", "smtp", 1000))
    log.emit(queued_event("M2", "smtp", 500))
    log.emit(queued_event("M3", "pickup", 70))
    log.emit(queued_event("R1", "dsn", 300))
    log.emit(queued_event("R2", "dsn", 400))
    log.emit(queued_event("R3", "dsn", 400))  # not found by the lookup: kind unknown, still counted
    log.emit(Event(events.NDR_SENT, "expired", queue_id="M1", status="4.4.7", cause="expired"))
    log.emit(Event(events.NDR_SENT, "Delivery to x failed permanently", queue_id="M1", status="5.1.1"))
    log.emit(Event(events.BADMAIL_WRITTEN, "Undeliverable report R9 written", queue_id="R9"))
    log.emit(Event(events.BADMAIL_WRITTEN, "Pickup file f moved", cause="pickup-invalid"))
    log.emit(Event(events.BADMAIL_WRITTEN, "over max_size", cause="badmail-cap"))
    s = scrape(metrics)
    assert value(s, "smtpsvc_messages_received_total", source="smtp") == 2
    assert value(s, "smtpsvc_received_bytes_total", source="smtp") == 1500
    assert value(s, "smtpsvc_messages_received_total", source="pickup") == 1
    assert value(s, "smtpsvc_messages_received_total", source="dsn") == 3
    assert value(s, "smtpsvc_messages_received_total", source="replay") == 0
    assert value(s, "smtpsvc_pickup_files_total", result="queued") == 1
    assert value(s, "smtpsvc_pickup_files_total", result="invalid") == 1
    assert value(s, "smtpsvc_dsn_sent_total", kind="delay") == 1
    assert value(s, "smtpsvc_dsn_sent_total", kind="failure") == 1
    assert value(s, "smtpsvc_dsn_sent_total", kind="unknown") == 1
    assert value(s, "smtpsvc_dsn_sent_total", kind="success") == 0
    assert value(s, "smtpsvc_recipients_expired_total") == 1  # the permanent failure is not an expiry
    assert value(s, "smtpsvc_badmail_writes_total", reason="undeliverable-report") == 1
    assert value(s, "smtpsvc_badmail_writes_total", reason="pickup-invalid") == 1
    assert value(s, "smtpsvc_badmail_trims_total") == 1
    assert value(s, "smtpsvc_events_total", id="3001") == 6
    assert value(s, "smtpsvc_events_total", id="3004") == 2
    assert value(s, "smtpsvc_events_total", id="3005") == 3


def test_a_failing_subscriber_never_breaks_emit_and_unsubscribe_stops_delivery(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, stream=None)
    metrics = Metrics()

    def broken(event: Event) -> None:
        raise RuntimeError("observer bug")

    log.subscribe(broken)
    unsubscribe = log.subscribe(metrics.on_event)
    log.emit(queued_event("M1", "smtp", 10))  # must not raise
    unsubscribe()
    log.emit(queued_event("M2", "smtp", 10))
    log.close()
    assert value(scrape(metrics), "smtpsvc_messages_received_total", source="smtp") == 1
    assert len(path.read_text().splitlines()) == 2  # both events were written all the same


# -- the session and scheduler hooks -------------------------------------------------------------------
def test_session_hook_counts_connections_commands_by_bounded_verb_replies_and_accept_time() -> None:
    metrics = Metrics()
    metrics.session_opened()
    metrics.session_opened()
    metrics.session_closed()
    for event in (
        Ehlo("client.test"),
        Mail("a@local.test"),
        Rcpt("b@local.test"),
        Rcpt("c@local.test"),
        Data(),
        DataEnd(),  # the end of the data is not a command
        Bdat(10, last=True),
        BdatEnd(last=True),  # nor is the end of a chunk
        AuthResponse("dGVzdA=="),  # nor an AUTH continuation line
        Rejected(replies.UNRECOGNIZED, "FROBNICATE"),  # unknown verbs share one label
        Rejected(replies.UNRECOGNIZED, "?"),
        Rejected(replies.BAD_SEQUENCE, "MAIL"),  # a refused known verb keeps its name
        Quit(),
    ):
        metrics.protocol_event(event)
    for code in (250, 250, 354, 550, 421):
        metrics.reply(code)
    metrics.message_accepted(0.004)
    s = scrape(metrics)
    assert value(s, "smtpsvc_smtp_connections_total") == 2
    assert value(s, "smtpsvc_smtp_sessions") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="EHLO") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="MAIL") == 2
    assert value(s, "smtpsvc_smtp_commands_total", verb="RCPT") == 2
    assert value(s, "smtpsvc_smtp_commands_total", verb="DATA") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="BDAT") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="QUIT") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="other") == 2
    assert not any(dict(labels).get("verb") == "FROBNICATE" for _, labels in s)
    assert sum(v for (name, _), v in s.items() if name == "smtpsvc_smtp_commands_total") == 10
    assert value(s, "smtpsvc_smtp_replies_total", **{"class": "2xx"}) == 2
    assert value(s, "smtpsvc_smtp_replies_total", **{"class": "3xx"}) == 1
    assert value(s, "smtpsvc_smtp_replies_total", **{"class": "4xx"}) == 1
    assert value(s, "smtpsvc_smtp_replies_total", **{"class": "5xx"}) == 1
    assert value(s, "smtpsvc_smtp_accept_duration_seconds_count") == 1
    assert value(s, "smtpsvc_smtp_accept_duration_seconds_bucket", le="0.005") == 1
    assert value(s, "smtpsvc_smtp_accept_duration_seconds_bucket", le="0.0025") == 0


def test_delivery_hook_counts_each_recipient_result_and_times_the_group() -> None:
    metrics = Metrics()
    ok = DeliveryResult("a@x.test", ok=True, permanent=False, reply="250 ok", status="2.0.0")
    later = DeliveryResult("b@x.test", ok=False, permanent=False, reply="451 busy", status="4.3.0")
    bounced = DeliveryResult("c@x.test", ok=False, permanent=True, reply="550 no", status="5.1.1")
    metrics.delivery_group("smtp", [ok, later, bounced, later], 1.5)
    metrics.delivery_group("drop", [ok], 0.002)
    s = scrape(metrics)
    assert value(s, "smtpsvc_delivery_attempts_total", result="delivered", transport="smtp") == 1
    assert value(s, "smtpsvc_delivery_attempts_total", result="deferred", transport="smtp") == 2
    assert value(s, "smtpsvc_delivery_attempts_total", result="failed", transport="smtp") == 1
    assert value(s, "smtpsvc_delivery_attempts_total", result="delivered", transport="drop") == 1
    assert value(s, "smtpsvc_delivery_duration_seconds_count", transport="smtp") == 1
    assert value(s, "smtpsvc_delivery_duration_seconds_sum", transport="smtp") == 1.5
    assert value(s, "smtpsvc_delivery_duration_seconds_bucket", transport="drop", le="0.005") == 1


# -- the queue collector -------------------------------------------------------------------------------
def pending(address: str, route: str, attempts: int = 0) -> Recipient:
    return Recipient(address=address, route=route, attempts=attempts)


def test_queue_gauges_by_state_and_link_agree_with_the_queue_summary() -> None:
    delivered = Recipient(address="d@remote.test", state=RecipientState.DELIVERED, route="remote.test")
    unreported = Recipient(address="f@gone.test", state=RecipientState.FAILED, route="gone.test")
    queue = [
        envelope("A", NOW - 10, pending("b@local.test", "drop"), size=1000),
        envelope("B", NOW - 100, pending("x@remote.test", "remote.test", attempts=2), delivered, size=2000),
        envelope(
            "C",
            NOW - 50,
            pending("y@remote.test", "remote.test"),
            pending("z@remote.test", "remote.test"),
            frozen=True,
            size=3000,
        ),
        envelope("D", NOW - 5, unreported, size=4000),  # only a report to make: ready, on no link
        envelope("E", NOW - 1, pending("h@held.test", "held.test", attempts=1), size=5000),  # a frozen link
    ]
    frozen = frozenset({"held.test", "idle.test"})
    metrics = Metrics(lambda: summary_of(queue, frozen), frozen_links=lambda: frozen, clock=lambda: NOW)
    s = scrape(metrics)
    assert value(s, "smtpsvc_queue_messages", state="ready") == 2
    assert value(s, "smtpsvc_queue_messages", state="retry") == 1
    assert value(s, "smtpsvc_queue_messages", state="frozen") == 2
    assert value(s, "smtpsvc_queue_oldest_message_age_seconds") == 100
    assert value(s, "smtpsvc_queue_bytes") == 15_000
    assert value(s, "smtpsvc_queue_frozen_links") == 2
    entries = [QueueEntry(e, frozen) for e in queue]
    # the same words as `smtpsvc queue list`
    assert [e.status(NOW).state for e in entries] == ["ready", "retry", "frozen", "ready", "frozen"]
    for link in summarize(entries, NOW, frozen):
        if not link.messages:
            continue  # a frozen link with nothing queued: no series (the frozen-links gauge counts it)
        assert value(s, "smtpsvc_queue_link_messages", link=link.link) == link.messages
        assert value(s, "smtpsvc_queue_link_recipients", link=link.link) == link.recipients
        assert value(s, "smtpsvc_queue_link_oldest_age_seconds", link=link.link) == link.oldest_age
    assert value(s, "smtpsvc_queue_link_messages", link="remote.test") == 2
    assert value(s, "smtpsvc_queue_link_recipients", link="remote.test") == 3
    assert value(s, "smtpsvc_queue_link_messages", link="gone.test") is None  # no pending recipient there

    queue.clear()  # read at every scrape: the gauges follow the queue
    s = scrape(metrics)
    assert value(s, "smtpsvc_queue_messages", state="ready") == 0
    assert value(s, "smtpsvc_queue_oldest_message_age_seconds") == 0
    assert value(s, "smtpsvc_queue_link_messages", link="drop") is None


def test_queue_links_beyond_the_cap_are_summed_as_other() -> None:
    queue = [
        envelope("A", NOW - 1, pending("a@one.test", "one.test"), pending("b@two.test", "two.test")),
        envelope("B", NOW - 2, pending("a@one.test", "one.test"), pending("b@three.test", "three.test")),
        envelope("C", NOW - 30, pending("a@four.test", "four.test"), pending("b@five.test", "five.test")),
    ]
    s = scrape(Metrics(lambda: summary_of(queue), clock=lambda: NOW, max_links=2))
    links = {dict(labels)["link"] for name, labels in s if name == "smtpsvc_queue_link_messages"}
    assert links == {"one.test", "five.test", "(other)"}  # busiest first, ties by name
    # The summary counts per link: "(other)" sums them (three, four, two: one message each).
    assert value(s, "smtpsvc_queue_link_messages", link="(other)") == 3
    assert value(s, "smtpsvc_queue_link_recipients", link="(other)") == 3
    assert value(s, "smtpsvc_queue_link_oldest_age_seconds", link="(other)") == 30


def test_a_queue_that_cannot_be_read_leaves_the_rest_of_the_scrape_intact() -> None:
    def broken() -> QueueSummary:
        raise RuntimeError("the queue cannot be read")

    metrics = Metrics(broken)
    metrics.session_opened()
    s = scrape(metrics)
    assert value(s, "smtpsvc_smtp_connections_total") == 1
    assert not any(name.startswith("smtpsvc_queue_") for name, _ in s)


# -- event-loop lag ------------------------------------------------------------------------------------
BLOCK = 0.3  # seconds the tests hold the loop on purpose


def hold_the_loop(seconds: float) -> None:
    """The block under test: a synchronous wait, so the calling event loop runs nothing meanwhile."""
    time.sleep(seconds)


async def test_loop_lag_monitor_reports_a_blocked_loop_and_no_negative_lag() -> None:
    samples: list[float] = []
    monitor = LoopLagMonitor(samples.append, interval=0.01)
    task = monitor.start()
    try:
        await wait_until(lambda: len(samples) >= 3, what="the monitor's first wake-ups")
        hold_the_loop(BLOCK)
        # It was asleep when the block began, so it wakes at least BLOCK - interval late.
        await wait_until(
            lambda: max(samples) >= BLOCK - 0.05, what="the block to show up as one late wake-up"
        )
    finally:
        monitor.stop()
    with_deadline = asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 5)
    assert isinstance((await with_deadline)[0], asyncio.CancelledError)
    assert min(samples) >= 0.0


async def test_the_service_exports_the_event_loop_lag_histogram(start_service: StartService) -> None:
    service = await start_service()
    await wait_until(
        lambda: (value(scrape(service.metrics), "smtpsvc_event_loop_lag_seconds_count") or 0) >= 2,
        what="the service's monitor to record its first wake-ups",
    )
    before = scrape(service.metrics)
    hold_the_loop(BLOCK)  # the service's own event loop

    def late_wake_ups() -> float:
        s = scrape(service.metrics)
        total = value(s, "smtpsvc_event_loop_lag_seconds_count") or 0
        within = value(s, "smtpsvc_event_loop_lag_seconds_bucket", le="0.1") or 0
        return total - within

    await wait_until(lambda: late_wake_ups() >= 1, what="a wake-up later than 100 ms in the histogram")
    after = scrape(service.metrics)
    lag_sum = (value(after, "smtpsvc_event_loop_lag_seconds_sum") or 0) - (
        value(before, "smtpsvc_event_loop_lag_seconds_sum") or 0
    )
    assert lag_sum >= BLOCK - 0.06
    body, _ = await service._render_metrics()  # what GET /metrics serves
    assert b"smtpsvc_event_loop_lag_seconds_bucket" in body


# -- end to end ----------------------------------------------------------------------------------------
def wire(service: Service) -> Metrics:
    """What app.py does: the same four lines."""
    spool = service.queue
    assert isinstance(spool, LocalSpool)
    metrics = Metrics(
        lambda: summary_of(spool.list(), spool.frozen_links), spool.get, lambda: spool.frozen_links
    )
    service.events.subscribe(metrics.on_event)
    service.smtp.context.metrics = metrics
    service.scheduler.delivery_observer = metrics.delivery_group
    return metrics


async def test_end_to_end_relay_to_a_smart_host_moves_the_counters(
    start_service: StartService, sink: Sink
) -> None:
    # One process: `wire` hooks a Metrics into this process's sessions (with SMTP workers, /metrics adds
    # theirs up: tests/admin/test_api.py test_metrics_parse_and_move_when_mail_flows).
    service = await start_service(server={"workers": 1}, delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    metrics = wire(service)
    await send(service, "alice@local.test", ["dave@remote.test", "erin@remote.test"])
    await wait_until(lambda: sink.messages, what="delivery to the smart host")
    await wait_until(
        lambda: (
            value(scrape(metrics), "smtpsvc_delivery_attempts_total", result="delivered", transport="smtp")
            == 2
        ),
        what="two delivered attempts counted",
    )
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")
    await wait_until(lambda: value(scrape(metrics), "smtpsvc_smtp_sessions") == 0, what="the session to end")
    s = scrape(metrics)
    assert value(s, "smtpsvc_smtp_connections_total") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="EHLO") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="MAIL") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="RCPT") == 2
    assert value(s, "smtpsvc_smtp_commands_total", verb="DATA") == 1
    assert value(s, "smtpsvc_smtp_commands_total", verb="QUIT") == 1
    assert value(s, "smtpsvc_smtp_replies_total", **{"class": "3xx"}) == 1  # 354
    assert value(s, "smtpsvc_smtp_replies_total", **{"class": "5xx"}) == 0
    assert value(s, "smtpsvc_messages_received_total", source="smtp") == 1
    received = value(s, "smtpsvc_received_bytes_total", source="smtp")
    assert received is not None and received > 0
    assert value(s, "smtpsvc_smtp_accept_duration_seconds_count") == 1
    assert value(s, "smtpsvc_delivery_attempts_total", result="deferred", transport="smtp") == 0
    assert value(s, "smtpsvc_delivery_duration_seconds_count", transport="smtp") == 1  # one route group
    assert value(s, "smtpsvc_events_total", id="3002") == 2
    assert value(s, "smtpsvc_queue_messages", state="ready") == 0
    assert value(s, "smtpsvc_queue_oldest_message_age_seconds") == 0


async def test_end_to_end_success_report_is_counted_by_kind(start_service: StartService) -> None:
    service = await start_service()
    metrics = wire(service)
    await send(service, "alice@local.test", ["bob@local.test"], rcpt_options=["NOTIFY=SUCCESS"])
    await wait_until(lambda: len(drop_files(service)) == 2, what="the message and its success report in Drop")
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")
    s = scrape(metrics)
    assert value(s, "smtpsvc_messages_received_total", source="dsn") == 1
    assert value(s, "smtpsvc_dsn_sent_total", kind="success") == 1
    assert value(s, "smtpsvc_delivery_attempts_total", result="delivered", transport="drop") == 2
    assert value(s, "smtpsvc_queue_messages", state="ready") == 0


def test_the_queue_state_words_of_a_real_envelope_round_trip() -> None:
    # The collector reads envelopes as the queue keeps them; one rebuilt from its .env JSON reads the same.
    original = envelope("A", time.time() - 60, pending("x@remote.test", "remote.test", attempts=1))
    rebuilt = Envelope.from_json(original.to_json())
    assert rebuilt.source is Source.SMTP
    s = scrape(Metrics(lambda: summary_of([rebuilt])))
    assert value(s, "smtpsvc_queue_messages", state="retry") == 1
    age = value(s, "smtpsvc_queue_oldest_message_age_seconds")
    assert age is not None and 59 <= age < 120
