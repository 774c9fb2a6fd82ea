"""The providers' limits as plain tables (delivery/budget.py, units.parse_rate): a rate's text, the sliding
window of sends, the daily recipient budget, what a quota reply is, and how a restart keeps the count."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from smtpsvc.config import load_config
from smtpsvc.delivery.budget import (
    Budget,
    Budgets,
    Limits,
    SendLog,
    is_quota_reply,
    limits_of,
    quota_pause,
)
from smtpsvc.delivery.settle import settle
from smtpsvc.model import DeliveryResult, Envelope, Recipient
from smtpsvc.units import DAY, Rate, parse_rate

NOW = 1_000_000.0
PER_MIN = Limits(Rate(30, "min"))


@pytest.mark.parametrize(
    ("text", "rate", "seconds"),
    [
        ("30/min", Rate(30, "min"), 60.0),
        ("1/s", Rate(1, "s"), 1.0),
        (" 500 / h ", Rate(500, "h"), 3600.0),
        ("10000/day", Rate(10000, "day"), DAY),
        ("30/MIN", Rate(30, "min"), 60.0),
    ],
)
def test_a_rate_is_a_count_per_unit(text: str, rate: Rate, seconds: float) -> None:
    parsed = parse_rate(text)
    assert parsed == rate
    assert parsed is not None and parsed.seconds == seconds
    assert parse_rate(str(parsed)) == parsed  # shown back as it is read


def test_an_empty_rate_is_no_limit() -> None:
    assert parse_rate("") is None
    assert parse_rate("  ") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("30", r'expected "N/unit" with unit s, min, h or day \(e\.g\. "30/min"\)'),
        ("30/minute", r'unknown unit "minute"; use s, min, h or day'),
        ("30/m", r'unknown unit "m"'),
        ("0/min", "it allows nothing; the count must be at least 1"),
        ("-1/min", 'expected "N/unit"'),
        ("1.5/s", 'expected "N/unit"'),
        ("min/30", 'expected "N/unit"'),
        (30, 'expected "N/unit"'),
        (None, 'expected "N/unit"'),
    ],
)
def test_a_rate_that_is_not_one_says_what_is_expected(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(value)


# -- the sliding window --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("sent", "inflight", "now", "weight", "free_at"),
    [
        ([], 0, NOW, 1, NOW),  # nothing sent: at once
        ([(NOW - 10, 29)], 0, NOW, 1, NOW),  # 29 of 30 used: room for one
        ([(NOW - 10, 30)], 0, NOW, 1, NOW + 50),  # full: when the sends of 10 s ago leave
        ([(NOW - 50, 10), (NOW - 10, 20)], 0, NOW, 1, NOW + 10),  # the oldest leave first
        ([(NOW - 50, 10), (NOW - 10, 20)], 0, NOW, 11, NOW + 50),  # 11 need the newer ones gone too
        ([(NOW - 60, 30)], 0, NOW, 1, NOW),  # exactly one interval ago: out of the window
        ([(NOW - 59.5, 30)], 0, NOW, 1, NOW + 0.5),
        ([], 30, NOW, 1, NOW + 60),  # all in flight: not before one interval after now
        ([(NOW - 30, 1)], 29, NOW, 1, NOW + 30),  # the logged one leaves first
        ([(NOW - 30, 1)], 29, NOW, 2, NOW + 60),  # two need an in-flight one gone
        ([], 0, NOW, 45, NOW),  # more than the limit at once goes when the window is empty...
        ([(NOW - 10, 1)], 0, NOW, 45, NOW + 50),  # ...and only then
    ],
)
def test_free_at_is_when_the_window_has_room(
    sent: list[tuple[float, int]], inflight: int, now: float, weight: int, free_at: float
) -> None:
    log = SendLog(sent)
    log.reserve(inflight)
    assert log.free_at(now, 30, 60.0, weight) == free_at


def test_sends_close_together_share_one_entry_stamped_with_the_later_time() -> None:
    log = SendLog()
    log.log(NOW, 0, 1, 60.0)
    log.log(NOW + 0.01, 0, 1, 60.0)  # within 60 s / 1000
    log.log(NOW + 1, 0, 1, 60.0)
    assert list(log.entries) == [(NOW + 0.01, 2), (NOW + 1, 1)]
    assert log.used(NOW + 60.005, 60.0) == 3  # the shared entry leaves with its later send, never before
    assert log.used(NOW + 60.01, 60.0) == 1


def simulate(limit: int, interval: float, messages: int, took: float, seed: int) -> list[float]:
    """`messages` all due at NOW, each trying again when the budget says; a send takes up to `took`
    seconds (connection, transaction). Returns when each reached the provider."""
    rng = random.Random(seed)
    budget, limits = Budget(), Limits(Rate(limit, "min") if interval == 60 else None)
    assert limits.rate is not None and limits.rate.seconds == interval
    due = [NOW + rng.uniform(0, 1) for _ in range(messages)]
    arrivals: list[float] = []
    inflight: list[tuple[float, float]] = []  # (returns at, arrived at)
    clock = NOW
    while due or inflight:
        clock = min([*due, *(r for r, _ in inflight)])
        for returned in [f for f in inflight if f[0] <= clock]:
            inflight.remove(returned)
            budget.done(returned[0], limits, 1, 1)
        for when in sorted(d for d in due if d <= clock):
            due.remove(when)
            wait = budget.take(clock, limits, 1)
            if wait:
                due.append(wait + rng.uniform(0, 0.1 * (wait - clock)))
            else:
                arrived = clock + rng.uniform(0, took)
                inflight.append((arrived + rng.uniform(0, took), arrived))
                arrivals.append(arrived)
    return sorted(arrivals)


@pytest.mark.parametrize("seed", range(20))
def test_no_more_than_the_rate_in_any_interval_and_all_go(seed: int) -> None:
    arrivals = simulate(30, 60.0, 100, took=2.0, seed=seed)
    assert len(arrivals) == 100
    for first, later in zip(arrivals, arrivals[30:], strict=False):
        assert later - first >= 60.0  # the 31st after any send comes a whole interval later
    assert arrivals[-1] - arrivals[0] < 4 * 60 + 30  # and the budget is used: 100 in about 3 intervals


def test_a_backlog_comes_due_a_window_at_a_time() -> None:
    budget = Budget(SendLog([(NOW - 10, 30)]))
    dues = [budget.take(NOW, PER_MIN, 1) for _ in range(70)]
    assert dues == [NOW + 50] * 30 + [NOW + 110] * 30 + [NOW + 170] * 10
    # Only a hint: the window decides. The first 30 find room when they come, and the 31st does not.
    assert [budget.take(NOW + 50, PER_MIN, 1) for _ in range(30)] == [0.0] * 30
    assert budget.take(NOW + 50, PER_MIN, 1) > NOW + 50


def test_recipients_per_day_counts_what_was_delivered_over_a_rolling_day() -> None:
    budget, limits = Budget(), Limits(recipients_per_day=100)
    assert budget.take(NOW, limits, 60) == 0.0
    budget.done(NOW + 1, limits, 60, 50)  # 10 refused: not counted
    assert budget.take(NOW + 100, limits, 50) == 0.0
    budget.done(NOW + 101, limits, 50, 50)
    assert budget.view("m365", NOW + 102, limits).recipients_used == 100
    assert budget.take(NOW + 102, limits, 1) == NOW + 1 + DAY  # the first 50 leave a day after they went
    assert budget.take(NOW + 1 + DAY, limits, 50) == 0.0
    assert budget.take(NOW + 1 + DAY, limits, 1) == NOW + 101 + DAY


def test_a_failed_send_gives_its_reservation_back() -> None:
    budget, limits = Budget(), Limits(Rate(1, "min"), recipients_per_day=10)
    assert budget.take(NOW, limits, 3) == 0.0
    assert budget.take(NOW, limits, 3) == NOW + 60  # the one message of the minute is in flight
    budget.done(NOW + 1, limits, 3, 0)  # nothing accepted (connection refused, 4xx to every RCPT)
    assert budget.take(NOW + 1, limits, 3) == 0.0


@pytest.mark.parametrize(
    "reply",
    [
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message "
        "due to a permanent exception with message Cannot submit message.",
        "554 5.2.2 mailbox full; STOREDRV.Submit.Exception:SubmissionQuotaExceededException",
        "452 4.3.2 Submission quota exceeded",
        "450 4.3.2 sender quota exceeded, try later",
        "550 5.2.2 Submission quota exceeded for relay@contoso.com",
        "451 4.7.0 Your submission quota is exceeded",
    ],
)
def test_a_providers_quota_reply_is_recognised(reply: str) -> None:
    assert is_quota_reply(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "552 5.2.2 <bob@example.org> Quota exceeded (mailbox for user is full)",  # the recipient's: a bounce
        "452 4.2.2 Mailbox full",
        "432 4.3.2 System not accepting network messages",
        "550 5.7.30 Basic authentication is not supported for Client Submission",
        "250 2.0.0 OK quota",
    ],
)
def test_a_full_mailbox_or_another_refusal_is_not_a_providers_quota(reply: str) -> None:
    assert not is_quota_reply(reply)


@pytest.mark.parametrize(
    ("limits", "sent", "pause"),
    [
        (PER_MIN, [(NOW - 10, 3)], NOW + 60),  # a whole interval: the provider's window is clear then
        (Limits(recipients_per_day=10000), [(NOW - 3600, 5), (NOW - 60, 5)], NOW - 3600 + DAY),
        (Limits(recipients_per_day=10000), [], 0.0),  # nothing counted: the retry schedule decides
        (Limits(), [], 0.0),
    ],
)
def test_a_quota_reply_pauses_the_link_until_its_budget_frees(
    limits: Limits, sent: list[tuple[float, int]], pause: float
) -> None:
    budget = Budget(recipients=SendLog(sent))
    assert quota_pause(NOW, limits, budget) == pause
    if pause:
        budget.pause(pause)
        assert budget.take(NOW + 1, limits, 1) == pause


def test_a_deferral_with_a_retry_time_waits_until_then_and_counts_an_attempt() -> None:
    delivery = load_config(None, env={}).delivery
    env = Envelope("Q1", "s@a.test", [Recipient("a@b.test")], received_at=NOW - 60, delay_notified=True)
    result = DeliveryResult("a@b.test", False, False, "452 4.3.2 Submission quota exceeded", "4.3.2")
    [after] = settle(
        env, [result], NOW, delivery, random.Random(1), retry_at={"a@b.test": NOW + 42}
    ).recipients
    assert (after.next_attempt, after.attempts, after.pending) == (NOW + 42, 1, True)
    late = {"a@b.test": NOW + 10 * DAY}  # never past the expiration
    [after] = settle(env, [result], NOW, delivery, random.Random(1), retry_at=late).recipients
    assert after.next_attempt == env.received_at + delivery.expiration


def test_the_summary_text_says_what_is_used_and_when_the_next_goes() -> None:
    budget, limits = (
        Budget(SendLog([(NOW - 52, 30)]), SendLog([(NOW - 52, 340)])),
        Limits(Rate(30, "min"), 10000),
    )
    view = budget.view("m365", NOW, limits)
    assert (view.rate_used, view.rate_limit, view.recipients_used) == (30, 30, 340)
    assert view.text(NOW) == "rate 30/min: 30 used, next free in 8s; recipients 340/10000 per day"
    assert Budget().view("m365", NOW, limits).text(NOW) == "rate 30/min: 0 used; recipients 0/10000 per day"


def test_the_counts_survive_a_restart_through_the_state_file_data() -> None:
    limits = {"m365": Limits(Rate(30, "min"), 10000), "gone": PER_MIN}
    budgets = Budgets()
    budgets.get("m365").recipients.log(NOW - 2 * DAY, 0, 7, DAY)  # out of the day: not kept
    budgets.get("m365").recipients.log(NOW - 10, 0, 5, DAY)
    budgets.get("m365").messages.log(NOW - 10, 0, 1, 60.0)
    budgets.get("gone").messages.log(NOW - 10, 0, 1, 60.0)
    data = json.loads(json.dumps(budgets.dump(NOW, {"m365": limits["m365"]})))  # "gone" lost its limits
    restarted = Budgets()
    restarted.load(data)
    [view] = restarted.views(NOW, {"m365": limits["m365"]})
    assert (view.rate_used, view.recipients_used) == (1, 5)


@pytest.mark.parametrize(
    "data", [None, [], {"links": 3}, {"links": {"m365": {"messages": [["x", 1], [1.0]]}}}]
)
def test_state_file_data_of_another_shape_starts_afresh(data: object) -> None:
    budgets = Budgets()
    budgets.load(data)
    assert budgets.get("m365").view("m365", NOW, PER_MIN).rate_used == 0


def test_limits_come_from_connectors_and_the_default_smart_host(tmp_path: Path) -> None:
    path = tmp_path / "smtpsvc.toml"
    path.write_text(
        '[delivery]\nsmart_host = "relay.test"\nsmart_host_rate = "10/s"\n\n'
        '[[connector]]\nname = "m365"\naddress_spaces = ["*"]\nrate = "30/min"\n'
        "recipients_per_day = 10000\n\n"
        '[[connector]]\nname = "plain"\naddress_spaces = ["plain.test"]\n',
        encoding="utf-8",
    )
    assert limits_of(load_config(str(path), env={})) == {
        "smarthost": Limits(Rate(10, "s")),
        "m365": Limits(Rate(30, "min"), 10000),
    }
