"""A provider's sending limits, kept by shaping (pure): a connector (or the default smart host) with
`rate = "30/min"` sends no more than 30 messages in ANY 60 seconds, and with `recipients_per_day = 10000` no
more than 10,000 recipients in any 24 hours (rolling), as Exchange Online counts them per sending mailbox.
Past them the provider answers `4.3.2`/`5.2.2` "submission quota exceeded"; smtpsvc waits in its own queue
instead.

Why a sliding-window log and not a token bucket: "no more than N in any interval" is what the provider
enforces and what a test can check, and a log of send times is the only honest way to say it (a bucket
refills continuously and allows bursts a window forbids). The log is bounded: sends closer together than
1/1000 of the interval share one entry, stamped with the later time (so an entry never leaves earlier than
its sends would have).

A send is counted in two steps. `Budget.take` reserves it before the transport is called (in flight: it
counts, but has no time yet), `Budget.done` logs it at the time the transport returned, which is never
earlier than the moment the provider received it; nothing the provider did not accept (no recipient
delivered) is logged. So two messages are never logged closer than the provider saw them, whatever the
connection set-up took.

A quota reply (`is_quota_reply`) pauses the budget: `quota_pause` says until when.

No I/O and no clock: the scheduler passes the time, keeps one `Budget` per link (`Budgets`) and saves
their logs to a small state file (`Budgets.dump`/`load`) so the daily count survives a restart.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from smtpsvc.config import Config
from smtpsvc.routing.connectors import SMART_HOST_LINK
from smtpsvc.units import DAY, Rate

GRAIN = 1000  # an entry of the log covers at most interval / GRAIN seconds of sends


@dataclass(frozen=True, slots=True)
class Limits:
    """A link's limits: messages per `rate`, recipients in any 24 hours (0: no limit)."""

    rate: Rate | None = None
    recipients_per_day: int = 0

    def __bool__(self) -> bool:
        return self.rate is not None or self.recipients_per_day > 0


def limits_of(config: Config) -> dict[str, Limits]:
    """The links that have limits, by link name: each connector with `rate` or `recipients_per_day`, and
    the default smart host ("smarthost") with `delivery.smart_host_rate` / `_recipients_per_day`."""
    out: dict[str, Limits] = {}
    delivery = config.delivery
    smart = Limits(delivery.smart_host_rate, delivery.smart_host_recipients_per_day)
    if smart and delivery.smart_host:
        out[SMART_HOST_LINK] = smart
    for connector in config.connectors:
        limits = Limits(connector.rate, connector.recipients_per_day)
        if limits:
            out[connector.name] = limits
    return out


class SendLog:
    """Sends in the window: (time, weight) oldest first, plus the weight reserved and not yet logged."""

    __slots__ = ("entries", "inflight", "logged")

    def __init__(self, entries: Iterable[tuple[float, int]] = ()) -> None:
        self.entries: deque[tuple[float, int]] = deque(sorted(entries))
        self.logged = sum(weight for _, weight in self.entries)
        self.inflight = 0

    def prune(self, now: float, interval: float) -> None:
        """Forget what left the window: a send at t counts while now < t + interval."""
        while self.entries and self.entries[0][0] + interval <= now:
            self.logged -= self.entries.popleft()[1]

    def used(self, now: float, interval: float) -> int:
        self.prune(now, interval)
        return self.logged + self.inflight

    def free_at(self, now: float, limit: int, interval: float, weight: int) -> float:
        """When `weight` more fits under `limit` in any `interval`: `now`, or the time enough sends have
        left the window. More than `limit` at once (a message for more recipients than a day allows) goes
        when nothing else is in the window, or it would never go. What is in flight has no time yet: it
        leaves one interval after it is logged, so not before now + interval."""
        excess = self.used(now, interval) + min(weight, limit) - limit
        if excess <= 0:
            return now
        for stamp, entry_weight in self.entries:
            excess -= entry_weight
            if excess <= 0:
                return stamp + interval
        return now + interval

    def reserve(self, weight: int) -> None:
        self.inflight += weight

    def log(self, now: float, reserved: int, sent: int, interval: float) -> None:
        """A reservation ended: `sent` of its `reserved` weight reached the provider, at the latest `now`."""
        self.inflight = max(0, self.inflight - reserved)
        if sent <= 0:
            return
        if self.entries and now - self.entries[-1][0] < interval / GRAIN:
            stamp, weight = self.entries.pop()
            self.entries.append((max(now, stamp), weight + sent))
        else:
            self.entries.append((max(now, self.entries[-1][0]) if self.entries else now, sent))
        self.logged += sent


@dataclass(frozen=True, slots=True)
class BudgetView:
    """What `queue summary` and /metrics show of one link's budget."""

    link: str
    rate: str  # "30/min", "" without a rate
    rate_limit: int
    rate_used: int
    recipients_per_day: int  # 0 without a daily limit
    recipients_used: int
    next_free: float  # epoch seconds when the next message may go; <= now: now
    paused_until: float  # a quota reply paused the link until then (0: not paused)

    def text(self, now: float) -> str:
        """E.g. "rate 30/min: 12 used, next free in 8s; recipients 340/10000 per day"."""
        parts = []
        wait = max(0.0, self.next_free - now)
        free = f", next free in {math.ceil(wait)}s" if wait > 0 else ""
        if self.rate:
            parts.append(f"rate {self.rate}: {self.rate_used} used{free}")
            free = ""
        if self.recipients_per_day:
            parts.append(f"recipients {self.recipients_used}/{self.recipients_per_day} per day{free}")
        if self.paused_until > now:
            parts.append(f"paused by the provider's quota reply for {math.ceil(self.paused_until - now)}s")
        return "; ".join(parts)


class Budget:
    """One link's budget: its messages and its recipients, and a pause after a quota reply."""

    __slots__ = ("messages", "paused_until", "promised", "recipients")

    def __init__(self, messages: SendLog | None = None, recipients: SendLog | None = None) -> None:
        self.messages = messages or SendLog()
        self.recipients = recipients or SendLog()
        self.paused_until = 0.0
        self.promised: list[float] = []  # the times given to waiting messages, still to come, in order

    def ready_at(self, now: float, limits: Limits, recipients: int) -> float:
        """When a message for `recipients` recipients may go (`now`: at once)."""
        at = max(now, self.paused_until)
        if limits.rate is not None:
            at = max(at, self.messages.free_at(now, limits.rate.count, limits.rate.seconds, 1))
        if limits.recipients_per_day:
            at = max(at, self.recipients.free_at(now, limits.recipients_per_day, DAY, recipients))
        return at

    def take(self, now: float, limits: Limits, recipients: int) -> float:
        """Reserve a send now and return 0.0, or return when it may go (nothing reserved)."""
        at = self.ready_at(now, limits, recipients)
        if at > now:
            return self._appointment(now, at, limits)
        self.messages.reserve(1)
        self.recipients.reserve(recipients)
        return 0.0

    def _appointment(self, now: float, at: float, limits: Limits) -> float:
        """When a message that must wait comes due: the first `rate.count` waiting at `at`, the next ones one
        interval later, and so on. Only a hint (the window decides when it comes), but a backlog of
        thousands then comes due a window's worth at a time instead of all at once, each to be put back."""
        del self.promised[: bisect.bisect_right(self.promised, now)]
        if limits.rate is not None:
            at += (len(self.promised) // limits.rate.count) * limits.rate.seconds
        bisect.insort(self.promised, at)
        return at

    def done(self, now: float, limits: Limits, recipients: int, delivered: int) -> None:
        """The send `take` reserved ended at `now`; `delivered` recipients were accepted (0: nothing was
        submitted, so nothing counts)."""
        rate = limits.rate.seconds if limits.rate is not None else DAY
        self.messages.log(now, 1, 1 if delivered else 0, rate)
        self.recipients.log(now, recipients, delivered, DAY)

    def pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)

    def view(self, link: str, now: float, limits: Limits) -> BudgetView:
        rate = limits.rate
        return BudgetView(
            link=link,
            rate=str(rate) if rate else "",
            rate_limit=rate.count if rate else 0,
            rate_used=self.messages.used(now, rate.seconds) if rate else 0,
            recipients_per_day=limits.recipients_per_day,
            recipients_used=self.recipients.used(now, DAY),
            next_free=self.ready_at(now, limits, 1),
            paused_until=self.paused_until if self.paused_until > now else 0.0,
        )


def quota_pause(now: float, limits: Limits, budget: Budget) -> float:
    """After a quota reply: until when the link sends nothing (0.0: unknown, the retry schedule decides).
    With a rate, one whole interval: the provider's window is no longer than ours, so after an interval
    without sending it is clear whatever it counted. With only a daily limit, until the oldest recipient
    counted leaves the 24 hours (the provider counts a rolling day too)."""
    if limits.rate is not None:
        return now + limits.rate.seconds
    if limits.recipients_per_day:
        budget.recipients.prune(now, DAY)
        if budget.recipients.entries:
            return budget.recipients.entries[0][0] + DAY
    return 0.0


_QUOTA_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def is_quota_reply(reply: str) -> bool:
    """A provider's "you sent too much" (cause provider-quota): Exchange Online's `554 5.2.0
    STOREDRV.Submission.Exception:SubmissionQuotaExceededException`, any reply that says "submission
    quota", and a `4.3.2` or `5.2.2` that speaks of a quota and of sending or submission. Not a plain
    "5.2.2 quota exceeded": that is the recipient's mailbox being full, which must bounce."""
    text = reply.lower()
    if "submissionquota" in text or "submission quota" in text:
        return True
    if "quota" not in text:
        return False
    match = _QUOTA_STATUS.search(text)
    status = match.group(0) if match else ""
    if status == "4.3.2":
        return True
    return status == "5.2.2" and any(word in text for word in ("submission", "submit", "sending", "sender"))


class Budgets:
    """The budgets of the links that have limits, by link. Made on first use; a link whose limits were
    removed from the configuration is forgotten at the next `dump`."""

    def __init__(self) -> None:
        self._by_link: dict[str, Budget] = {}

    def get(self, link: str) -> Budget:
        budget = self._by_link.get(link)
        if budget is None:
            budget = self._by_link[link] = Budget()
        return budget

    def views(self, now: float, limits: Mapping[str, Limits]) -> list[BudgetView]:
        """Every link with limits, in name order."""
        return [self.get(link).view(link, now, limits[link]) for link in sorted(limits)]

    def dump(self, now: float, limits: Mapping[str, Limits]) -> dict[str, object]:
        """The logs as JSON-able data (what is still in a window), for the state file."""
        out: dict[str, object] = {}
        for link in list(self._by_link):
            if link not in limits:
                del self._by_link[link]
                continue
            budget, lim = self._by_link[link], limits[link]
            rate = lim.rate.seconds if lim.rate is not None else DAY
            budget.messages.prune(now, rate)
            budget.recipients.prune(now, DAY)
            out[link] = {
                "messages": [[t, w] for t, w in budget.messages.entries],
                "recipients": [[t, w] for t, w in budget.recipients.entries],
                "paused_until": budget.paused_until,
            }
        return {"version": 1, "links": out}

    def load(self, data: object) -> None:
        """Take the logs back from `dump`'s data; anything of another shape is ignored (a fresh count)."""
        links = data.get("links") if isinstance(data, dict) else None
        if not isinstance(links, dict):
            return
        for link, item in links.items():
            if not isinstance(link, str) or not isinstance(item, dict):
                continue
            budget = Budget(
                SendLog(_entries(item.get("messages"))), SendLog(_entries(item.get("recipients")))
            )
            paused = item.get("paused_until", 0.0)
            budget.paused_until = float(paused) if isinstance(paused, (int, float)) else 0.0
            self._by_link[link] = budget


def _entries(value: object) -> list[tuple[float, int]]:
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        if (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], (int, float))
            and isinstance(item[1], int)
            and item[1] > 0
        ):
            out.append((float(item[0]), item[1]))
    return out
