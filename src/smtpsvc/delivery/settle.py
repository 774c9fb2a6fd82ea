"""What follows a delivery attempt, as a pure function: `settle(envelope, results, now, config)` says how each
recipient's state changes (delivered, failed, retry at, expired) and which reports are due (NDR, delay,
success). No I/O, no clock, no events: the scheduler applies what it returns (`apply`), writes the events
and makes the reports. Tested with plain tables (tests/delivery/test_settle.py).

The rules (docs/delivery.md §3, §4):
- each result counts one attempt for its recipient (history kept to HISTORY_KEPT entries); a 2xx is
  delivered, a 5xx failed, anything else waits for the next `delivery.retry` interval (jittered, never past
  the expiration), moved forward to the delay-report point when that report is still to come;
- a recipient postponed by the scheduler (its destination is down) waits without an attempt on its count;
- a deferred recipient given a retry time (a provider's quota: when its budget frees) waits until then
  instead of the next interval, never past the expiration;
- once the message is `delivery.expiration` old, every recipient still pending fails with 4.4.7;
- an NDR is due for every failed recipient whose report is not made yet; a success report for delivered
  recipients that asked NOTIFY=SUCCESS when the next hop did not take the request over; one delay report per
  message once it has been pending `delivery.delay_notification`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from smtpsvc.config import DeliveryConfig
from smtpsvc.delivery.schedule import expired, next_attempt_time, retry_delay
from smtpsvc.model import Attempt, DeliveryResult, Envelope, Recipient, RecipientState

HISTORY_KEPT = 20  # attempts remembered per recipient
EXPIRED_STATUS = "4.4.7"
EXPIRED_TEXT = (
    "Could not deliver the message in the time limit specified. Please retry or contact your administrator."
)


@dataclass(frozen=True, slots=True)
class Settlement:
    """The envelope's recipients after the attempt (changed ones are new objects; the envelope itself is
    untouched until `apply`) and what the scheduler must do about them."""

    recipients: tuple[Recipient, ...]
    delivered: tuple[tuple[Recipient, DeliveryResult], ...] = ()  # event 3002 each
    bounced: tuple[tuple[Recipient, DeliveryResult], ...] = ()  # failed permanently now: event 3004 each
    expired: tuple[Recipient, ...] = ()  # failed now with 4.4.7: event 3004 `expired` each
    report_failure: tuple[Recipient, ...] = ()  # failed and not yet reported: NDR (or Badmail) due
    report_success: tuple[tuple[Recipient, DeliveryResult], ...] = ()
    report_delay: bool = False


def settle(
    envelope: Envelope,
    results: Sequence[DeliveryResult],
    now: float,
    config: DeliveryConfig,
    rng: random.Random,
    postponed: Mapping[str, float] | None = None,
    retry_at: Mapping[str, float] | None = None,
) -> Settlement:
    """See the module docstring. `postponed`: address -> when a recipient is due, without an attempt;
    `retry_at`: address -> when a deferred recipient is tried again."""
    by_address = {result.address: result for result in results}
    delivered: list[tuple[Recipient, DeliveryResult]] = []
    bounced: list[tuple[Recipient, DeliveryResult]] = []
    success: list[tuple[Recipient, DeliveryResult]] = []
    after: list[Recipient] = []
    for rcpt in envelope.recipients:
        result = by_address.get(rcpt.address) if rcpt.pending else None
        if result is not None:
            rcpt = _attempted(
                envelope, rcpt, result, now, config, rng, (retry_at or {}).get(rcpt.address, 0.0)
            )
            if result.ok:
                delivered.append((rcpt, result))
                if "SUCCESS" in rcpt.notify and not result.dsn_passed_on:
                    success.append((rcpt, result))
            elif result.permanent:
                bounced.append((rcpt, result))
        elif postponed and rcpt.pending and rcpt.address in postponed:
            rcpt = replace(rcpt, history=list(rcpt.history), next_attempt=postponed[rcpt.address])
        after.append(rcpt)
    gone: list[Recipient] = []
    if expired(now, envelope.received_at, config.expiration):
        for index, rcpt in enumerate(after):
            if rcpt.pending:
                after[index] = rcpt = _expire(rcpt)
                gone.append(rcpt)
    delay = (  # the cheap test that is usually false first
        now - envelope.received_at >= config.delay_notification
        and not envelope.delay_notified
        and bool(envelope.sender)
        and any(r.pending for r in after)
    )
    return Settlement(
        recipients=tuple(after),
        delivered=tuple(delivered),
        bounced=tuple(bounced),
        expired=tuple(gone),
        report_failure=tuple(r for r in after if r.state is RecipientState.FAILED and not r.notified),
        report_success=tuple(success) if envelope.sender else (),
        report_delay=delay,
    )


def apply(envelope: Envelope, settlement: Settlement) -> None:
    envelope.recipients = list(settlement.recipients)


def report_retry_time(now: float, config: DeliveryConfig, rng: random.Random) -> float:
    """When a report that could not be made now (disk full, say) is tried again: after the first retry
    interval. Expiration does not apply to it: the message has already failed."""
    return now + retry_delay(1, config.retry, rng)


def _attempted(
    envelope: Envelope,
    rcpt: Recipient,
    result: DeliveryResult,
    now: float,
    config: DeliveryConfig,
    rng: random.Random,
    retry_at: float = 0.0,
) -> Recipient:
    attempts = rcpt.attempts + 1
    history = [*rcpt.history[-(HISTORY_KEPT - 1) :], Attempt(now, result.reply, result.remote_mta)]
    changed = replace(
        rcpt,
        attempts=attempts,
        last_reply=result.reply,
        status=result.status,
        remote_mta=result.remote_mta,
        history=history,
    )
    if result.ok:
        changed.state = RecipientState.DELIVERED
    elif result.permanent:
        changed.state = RecipientState.FAILED
    else:
        if retry_at:
            retry_at = min(retry_at, envelope.received_at + config.expiration)
        else:
            retry_at = next_attempt_time(
                now, attempts, envelope.received_at, config.expiration, config.retry, rng
            )
        delay_at = envelope.received_at + config.delay_notification
        if not envelope.delay_notified and envelope.sender and now < delay_at < retry_at:
            retry_at = delay_at  # be awake when the delay notification falls due
        changed.next_attempt = retry_at
    return changed


def _expire(rcpt: Recipient) -> Recipient:
    text = f"{EXPIRED_TEXT} Last error: {rcpt.last_reply}" if rcpt.last_reply else EXPIRED_TEXT
    return replace(
        rcpt, history=list(rcpt.history), state=RecipientState.FAILED, status=EXPIRED_STATUS, last_reply=text
    )
