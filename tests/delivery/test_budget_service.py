"""A connector's provider limits through the real service (default delivery settings, a loopback SMTP peer
that is not our code): with `rate = "30/min"` a burst goes out no faster than 30 in any 60 seconds and all
of it arrives, the waiting mail counts no attempt, and `queue summary` and /metrics show the budget; a
provider's quota reply defers (cause provider-quota) until the budget frees; a restart keeps the count."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from smtpsvc.app import Service
from smtpsvc.model import RecipientState
from tests.conftest import events_of, smtp_port, toml_value, wait_until, write_config
from tests.delivery.test_delivery_core import start_in_process, submit
from tests.sink import Sink, SinkHandler
from tests.test_queue_cli import run
from tests.test_relay import send

QUOTA_REPLY = (
    "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Cannot submit message."
)


class TimedHandler(SinkHandler):
    """The sink, noting when each message arrived (its DATA done, before our 250)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[float] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.arrivals.append(time.time())
        return await super().handle_DATA(server, session, envelope)


class QuotaHandler(SinkHandler):
    """Exchange Online past the mailbox's submission quota."""

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        self.rcpt_attempts.append(address)
        return QUOTA_REPLY


def config_file(tmp_path: Path, port: int, **connector: Any) -> Path:
    """The service's defaults (retry 15 m, slow start ...); connector "m365" to the sink for remote.test."""
    sections: dict[str, dict[str, Any]] = {
        "server": {"hostname": "relay.test", "root": str(tmp_path / "mailroot"), "listen": ["127.0.0.1:0"]},
        "domains": {"local": ["local.test"]},
        "admin": {"listen": "127.0.0.1:0"},
    }
    path = write_config(tmp_path / "smtpsvc.toml", sections)
    table = {"name": "m365", "address_spaces": ["remote.test"], "smart_hosts": [f"[127.0.0.1]:{port}"]}
    lines = [f"{key} = {toml_value(value)}" for key, value in {**table, **connector}.items()]
    path.write_text(path.read_text() + "\n[[connector]]\n" + "\n".join(lines) + "\n")
    return path


def waiting(service: Service) -> list[Any]:
    return [e for e in service.queue.list() if e.pending]


async def summary(service: Service) -> str:
    code, out, err = await run("queue", "summary", "-c", str(service.config_path))
    assert code == 0, out + err
    return out


async def test_45_messages_queued_at_once_reach_the_peer_no_faster_than_30_in_any_60s_and_all_arrive(
    tmp_path: Path,
) -> None:
    sink = Sink()
    handler = sink.handler = TimedHandler()
    sink.start()
    service = await start_in_process(config_file(tmp_path, sink.port, rate="30/min"))
    try:
        await submit(smtp_port(service), 45)

        # The first 30 go; the other 15 wait in the queue for the window, without an attempt on their count.
        def postponed() -> list[Any]:
            return [e for e in waiting(service) if e.recipients[0].next_attempt > time.time()]

        await wait_until(
            lambda: len(handler.arrivals) == 30 and len(postponed()) == 15,
            timeout=60,
            what="30 sent, 15 waiting",
        )
        assert all(r.attempts == 0 for e in waiting(service) for r in e.recipients)
        out = await summary(service)
        assert "m365" in out and "rate 30/min: 30 used, next free in " in out, out
        body, _ = await service._render_metrics()  # what GET /metrics serves
        assert b'smtpsvc_connector_rate_used{link="m365"} 30.0' in body
        assert b'smtpsvc_connector_rate_limit{link="m365"} 30.0' in body
        await wait_until(lambda: len(handler.arrivals) == 45, timeout=180, what="all 45 messages at the peer")
        await wait_until(lambda: not service.queue.list(), timeout=30, what="an empty queue")
    finally:
        await service.stop()
        sink.stop()
    arrivals = sorted(handler.arrivals)
    for first, thirty_first in zip(arrivals, arrivals[30:], strict=False):
        assert thirty_first - first >= 60.0, arrivals  # never 31 in any 60 seconds
    assert not events_of(service, 4000)  # waiting for the budget is no failure


async def test_a_quota_reply_defers_with_cause_provider_quota_until_the_budget_frees(tmp_path: Path) -> None:
    sink = Sink()
    sink.handler = QuotaHandler()
    sink.start()
    service = await start_in_process(config_file(tmp_path, sink.port, rate="30/min"))
    try:
        before = time.time()
        await send(service, "alice@local.test", ["bob@remote.test"])
        [envelope] = await wait_until(
            lambda: [e for e in service.queue.list() if e.recipients[0].attempts], what="the refused attempt"
        )
        [rcpt] = envelope.recipients
        # Kept, not bounced; tried again when the connector's minute has passed, not on the retry schedule.
        assert rcpt.state is RecipientState.PENDING
        assert before + 60 <= rcpt.next_attempt <= time.time() + 60
        assert "SubmissionQuotaExceededException" in rcpt.last_reply
        assert time.strftime("%H:%M:%S UTC", time.gmtime(rcpt.next_attempt)) in rcpt.last_reply
        [event] = await wait_until(lambda: events_of(service, 4000), what="event 4000")
        assert event["cause"] == "provider-quota"
        assert "tried again then" in str(event)
        assert not events_of(service, 3004)  # no NDR
        # The connector is paused: the next message waits in the queue, untried, instead of being refused.
        await send(service, "alice@local.test", ["carol@remote.test"])
        [second] = await wait_until(
            lambda: [e for e in service.queue.list() if e.id != envelope.id and e.recipients[0].next_attempt],
            what="the second message postponed",
        )
        assert second.recipients[0].attempts == 0 and second.recipients[0].next_attempt > time.time()
        assert len(sink.handler.rcpt_attempts) == 1
        assert "paused by the provider's quota reply" in await summary(service)
    finally:
        await service.stop()
        sink.stop()


async def test_the_daily_recipient_count_survives_a_restart(tmp_path: Path) -> None:
    sink = Sink().start()
    path = config_file(tmp_path, sink.port, recipients_per_day=10000)
    service = await start_in_process(path)
    try:
        await send(service, "alice@local.test", ["a@remote.test", "b@remote.test", "c@remote.test"])
        await wait_until(lambda: len(sink.messages) == 1, what="the delivery")
        assert "recipients 3/10000 per day" in await summary(service)
    finally:
        await service.stop()
        sink.stop()
    service = await start_in_process(path)
    try:
        assert "recipients 3/10000 per day" in await summary(service)
    finally:
        await service.stop()


async def test_a_quota_reply_on_a_route_without_limits_is_deferred_not_bounced_and_says_what_to_set(
    tmp_path: Path,
) -> None:
    sink = Sink()
    sink.handler = QuotaHandler()
    sink.start()
    path = write_config(
        tmp_path / "smtpsvc.toml",
        {
            "server": {
                "hostname": "relay.test",
                "root": str(tmp_path / "mailroot"),
                "listen": ["127.0.0.1:0"],
            },
            "domains": {"local": ["local.test"]},
            "delivery": {"smart_host": f"[127.0.0.1]:{sink.port}"},
        },
    )
    service = await start_in_process(path)
    try:
        await send(service, "alice@local.test", ["bob@remote.test"])
        [envelope] = await wait_until(
            lambda: [e for e in service.queue.list() if e.recipients[0].attempts], what="the refused attempt"
        )
        [rcpt] = envelope.recipients
        assert rcpt.state is RecipientState.PENDING  # the 554 is the provider's quota: no NDR
        assert rcpt.next_attempt > time.time() + 600  # the retry schedule (15 m)
        assert "set delivery.smart_host_rate and delivery.smart_host_recipients_per_day" in rcpt.last_reply
        [event] = await wait_until(lambda: events_of(service, 4000), what="event 4000")
        assert event["cause"] == "provider-quota"
        assert not events_of(service, 3004)
    finally:
        await service.stop()
        sink.stop()
