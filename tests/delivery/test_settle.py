"""settle(): what follows an attempt, as plain tables (delivery/settle.py)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from smtpsvc.config import DeliveryConfig, load_config
from smtpsvc.delivery.settle import EXPIRED_TEXT, HISTORY_KEPT, apply, report_retry_time, settle
from smtpsvc.model import Attempt, DeliveryResult, Envelope, Recipient, RecipientState

NOW = 1_000_000.0
HOUR = 3600.0
DELIVERY: DeliveryConfig = load_config(None, env={}).delivery  # the defaults: 15m 30m 60m 240m, 12h, 2d


def envelope(*rcpts: Recipient, age: float = 60.0, sender: str = "s@a.test", **fields: object) -> Envelope:
    env = Envelope("Q1", sender, list(rcpts), received_at=NOW - age)
    for name, value in fields.items():
        setattr(env, name, value)
    return env


def ok(address: str, passed_on: bool = False) -> DeliveryResult:
    return DeliveryResult(address, True, False, "250 2.0.0 OK", "2.0.0", "mx[1.2.3.4]:25", passed_on)


def soft(address: str) -> DeliveryResult:
    return DeliveryResult(address, False, False, "451 4.3.0 try later", "4.3.0", "mx[1.2.3.4]:25")


def hard(address: str) -> DeliveryResult:
    return DeliveryResult(address, False, True, "550 5.1.1 no such user", "5.1.1", "mx[1.2.3.4]:25")


def rng() -> random.Random:
    return random.Random(1)


@pytest.mark.parametrize(
    ("result", "state", "attempts", "status"),
    [
        (ok("a@b.test"), RecipientState.DELIVERED, 1, "2.0.0"),
        (hard("a@b.test"), RecipientState.FAILED, 1, "5.1.1"),
        (soft("a@b.test"), RecipientState.PENDING, 1, "4.3.0"),
    ],
)
def test_a_result_counts_one_attempt_and_decides_the_state(
    result: DeliveryResult, state: RecipientState, attempts: int, status: str
) -> None:
    env = envelope(Recipient("a@b.test"))
    [after] = settle(env, [result], NOW, DELIVERY, rng()).recipients
    assert (after.state, after.attempts, after.status, after.last_reply) == (
        state,
        attempts,
        status,
        result.reply,
    )
    assert after.history == [Attempt(NOW, result.reply, result.remote_mta)]


def test_settle_does_not_touch_the_envelope_until_apply() -> None:
    env = envelope(Recipient("a@b.test"))
    settlement = settle(env, [ok("a@b.test")], NOW, DELIVERY, rng())
    assert env.recipients[0].state is RecipientState.PENDING and env.recipients[0].attempts == 0
    apply(env, settlement)
    assert env.recipients[0].state is RecipientState.DELIVERED


@pytest.mark.parametrize(
    ("attempts_before", "base"), [(0, 900.0), (1, 1800.0), (2, 3600.0), (3, 14400.0), (9, 14400.0)]
)
def test_a_transient_failure_waits_for_the_next_retry_interval(attempts_before: int, base: float) -> None:
    env = envelope(Recipient("a@b.test", attempts=attempts_before))
    [after] = settle(env, [soft("a@b.test")], NOW, DELIVERY, rng()).recipients
    assert 0.9 * base <= after.next_attempt - NOW <= 1.1 * base


def test_a_retry_is_moved_forward_to_the_delay_report_point() -> None:
    # 11h55m old: the next interval (4h) would pass the 12h delay report; it wakes up for it instead.
    env = envelope(Recipient("a@b.test", attempts=5), age=12 * HOUR - 300)
    [after] = settle(env, [soft("a@b.test")], NOW, DELIVERY, rng()).recipients
    assert after.next_attempt == env.received_at + DELIVERY.delay_notification


def test_a_retry_is_never_later_than_the_expiration() -> None:
    env = envelope(Recipient("a@b.test", attempts=5), age=2 * 24 * HOUR - 600, delay_notified=True)
    [after] = settle(env, [soft("a@b.test")], NOW, DELIVERY, rng()).recipients
    assert after.next_attempt == env.received_at + DELIVERY.expiration


@pytest.mark.parametrize(
    ("age", "expired"), [(2 * 24 * HOUR - 1, False), (2 * 24 * HOUR, True), (3 * 24 * HOUR, True)]
)
def test_recipients_still_pending_at_the_expiration_fail_with_4_4_7(age: float, expired: bool) -> None:
    env = envelope(Recipient("a@b.test", last_reply="451 4.3.0 busy"), Recipient("c@d.test"), age=age)
    settlement = settle(env, [soft("a@b.test")], NOW, DELIVERY, rng())
    states = [r.state for r in settlement.recipients]
    assert states == ([RecipientState.FAILED] * 2 if expired else [RecipientState.PENDING] * 2)
    assert len(settlement.expired) == (2 if expired else 0)
    if expired:
        first, second = settlement.recipients
        assert (
            first.status == "4.4.7" and first.last_reply == f"{EXPIRED_TEXT} Last error: 451 4.3.0 try later"
        )
        assert second.last_reply == EXPIRED_TEXT  # never tried: no last error to quote
        assert settlement.report_failure == settlement.recipients


@pytest.mark.parametrize(
    ("notify", "passed_on", "sender", "reported"),
    [
        (("SUCCESS",), False, "s@a.test", True),
        (("SUCCESS",), True, "s@a.test", False),  # the next hop took the DSN request over
        (("FAILURE",), False, "s@a.test", False),
        ((), False, "s@a.test", False),
        (("SUCCESS",), False, "", False),  # never a report to <>
    ],
)
def test_a_success_report_is_due_only_when_asked_and_not_passed_on(
    notify: tuple[str, ...], passed_on: bool, sender: str, reported: bool
) -> None:
    env = envelope(Recipient("a@b.test", notify=notify), sender=sender)
    settlement = settle(env, [ok("a@b.test", passed_on)], NOW, DELIVERY, rng())
    assert bool(settlement.report_success) is reported


@pytest.mark.parametrize(
    ("age", "delay_notified", "sender", "result", "due"),
    [
        (12 * HOUR, False, "s@a.test", "soft", True),
        (12 * HOUR - 1, False, "s@a.test", "soft", False),
        (12 * HOUR, True, "s@a.test", "soft", False),  # once per message
        (12 * HOUR, False, "", "soft", False),  # never to <>
        (12 * HOUR, False, "s@a.test", "ok", False),  # nothing pending any more
    ],
)
def test_a_delay_report_is_due_once_for_a_message_still_pending_after_delay_notification(
    age: float, delay_notified: bool, sender: str, result: str, due: bool
) -> None:
    env = envelope(Recipient("a@b.test"), age=age, sender=sender, delay_notified=delay_notified)
    outcome = soft("a@b.test") if result == "soft" else ok("a@b.test")
    assert settle(env, [outcome], NOW, DELIVERY, rng()).report_delay is due


def test_failed_recipients_not_yet_reported_are_due_for_an_ndr_and_reported_ones_are_not() -> None:
    old = Recipient("old@b.test", state=RecipientState.FAILED, notified=True)
    unreported = Recipient("was@b.test", state=RecipientState.FAILED, notified=False)
    env = envelope(old, unreported, Recipient("new@b.test"))
    settlement = settle(env, [hard("new@b.test")], NOW, DELIVERY, rng())
    assert [r.address for r in settlement.report_failure] == ["was@b.test", "new@b.test"]
    assert [r.address for r, _ in settlement.bounced] == ["new@b.test"]


def test_a_postponed_recipient_waits_without_an_attempt_on_its_count() -> None:
    env = envelope(Recipient("a@b.test", attempts=2), Recipient("c@d.test"))
    settlement = settle(env, [ok("c@d.test")], NOW, DELIVERY, rng(), postponed={"a@b.test": NOW + 500})
    waiting, done = settlement.recipients
    assert (waiting.attempts, waiting.next_attempt, waiting.history) == (2, NOW + 500, [])
    assert done.state is RecipientState.DELIVERED


def test_results_for_recipients_that_are_no_longer_pending_are_ignored() -> None:
    delivered = Recipient("a@b.test", state=RecipientState.DELIVERED, attempts=1)
    env = envelope(delivered)
    [after] = settle(env, [hard("a@b.test")], NOW, DELIVERY, rng()).recipients
    assert after is delivered


def test_history_keeps_the_last_attempts_only() -> None:
    history = [Attempt(float(n), "451", "h") for n in range(HISTORY_KEPT)]
    env = envelope(Recipient("a@b.test", attempts=HISTORY_KEPT, history=history))
    [after] = settle(env, [soft("a@b.test")], NOW, DELIVERY, rng()).recipients
    assert len(after.history) == HISTORY_KEPT and after.history[-1].time == NOW
    assert after.history[0].time == 1.0


def test_a_report_that_cannot_be_made_is_retried_after_the_first_interval() -> None:
    delay = report_retry_time(NOW, replace(DELIVERY, retry=(600.0, 3600.0)), rng()) - NOW
    assert 540 <= delay <= 660
