"""A message's state in the queue and its next attempt: one rule (`model.queue_status_of`) for every view
(`queue list`, `queue summary`, the web viewer, the API, the metrics). Through the running service, with a
next hop that refuses: tests/admin/test_queue_state.py."""

from __future__ import annotations

import pytest

from smtpsvc.model import Envelope, QueueStatus, Recipient, RecipientState, queue_status, queue_status_of

NOW = 1_800_000_000.0
LATER = NOW + 600


@pytest.mark.parametrize(
    ("frozen", "tried", "next_due", "expected"),
    [
        (False, False, NOW, QueueStatus("ready", NOW)),  # new mail, due now
        (False, False, NOW - 5, QueueStatus("ready", NOW - 5)),  # due a while ago, not picked up yet
        (False, False, None, QueueStatus("ready", None)),  # nothing left to do (being finished)
        (False, True, LATER, QueueStatus("retry", LATER)),  # deferred, waits for its retry
        (False, True, NOW - 5, QueueStatus("retry", NOW - 5)),  # deferred, and its retry time has come
        # held without an attempt of its own: the link backs off after another message failed, or its
        # sending budget is used up. `queue list` once said "ready ... next now" for it.
        (False, False, LATER, QueueStatus("retry", LATER)),
        (True, False, NOW, QueueStatus("frozen", None)),
        (True, True, LATER, QueueStatus("frozen", None)),  # frozen: no next attempt, whatever is stored
    ],
)
def test_queue_status_of(frozen: bool, tried: bool, next_due: float | None, expected: QueueStatus) -> None:
    assert queue_status_of(frozen, tried, next_due, NOW) == expected


def envelope(*recipients: Recipient, frozen: bool = False) -> Envelope:
    return Envelope("ID", "a@local.test", list(recipients), NOW - 60, frozen=frozen)


@pytest.mark.parametrize(
    ("message", "frozen_links", "expected"),
    [
        (envelope(Recipient("a@x.test", route="x", next_attempt=NOW)), frozenset(), "ready"),
        (envelope(Recipient("a@x.test", route="x", next_attempt=LATER)), frozenset(), "retry"),
        (envelope(Recipient("a@x.test", route="x", attempts=1, next_attempt=LATER)), frozenset(), "retry"),
        (envelope(Recipient("a@x.test", route="x"), frozen=True), frozenset(), "frozen"),
        (envelope(Recipient("a@x.test", route="x")), frozenset({"x"}), "frozen"),  # its only link
        # one recipient due now, one held: the message is tried now
        (
            envelope(
                Recipient("a@x.test", route="x", next_attempt=NOW),
                Recipient("b@y.test", route="y", next_attempt=LATER),
            ),
            frozenset(),
            "ready",
        ),
        # the one due now waits on a frozen link: what is left is held
        (
            envelope(
                Recipient("a@x.test", route="x", next_attempt=NOW),
                Recipient("b@y.test", route="y", next_attempt=LATER),
            ),
            frozenset({"x"}),
            "retry",
        ),
        # only a failure report to make (no pending recipient): due now
        (
            envelope(Recipient("a@x.test", state=RecipientState.FAILED, next_attempt=NOW)),
            frozenset(),
            "ready",
        ),
    ],
)
def test_queue_status_of_an_envelope(message: Envelope, frozen_links: frozenset[str], expected: str) -> None:
    assert queue_status(message, frozen_links, NOW).state == expected
