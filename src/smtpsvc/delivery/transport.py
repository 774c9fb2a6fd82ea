"""The one interface between the scheduler and the ways mail leaves: a `Transport` takes one route group
(the recipients of one message that share a route) and says, per recipient, delivered, transient or
permanent. The scheduler decides what and when; a transport knows how (Drop folder, SMTP; an HTTP API
later). It never touches the queue's state: the scheduler settles the results (`delivery/settle.py`).

A transport may also say that it did not try at all (`postponed_until`: the destination is known to be
down, so the recipients wait without an attempt on their count), and give the scheduler what its routing
decisions need: whether no host of the route could be reached (`unreachable`, for connector failover and the
per-destination backoff) or DNS cannot find the destination (`not_found`, for `after_direct`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol

from smtpsvc.model import DeliveryResult, Envelope, Recipient
from smtpsvc.routing.connectors import RouteChoice


class MessageSource(Protocol):
    """The queued message, opened only when a transport is ready to send it (a job waiting for a connection
    holds no file handle)."""

    async def open(self) -> BinaryIO:
        """The message bytes, seekable, from the start; the caller closes it. One handle per reader."""
        ...

    async def xexch50(self) -> bytes | None:
        """The Exchange XEXCH50 blob received with the message, or None."""
        ...


@dataclass(slots=True)
class Outcome:
    """What one transport call did for its recipients."""

    results: list[DeliveryResult] = field(default_factory=list)  # one per recipient, unless postponed
    transcript: list[str] = field(default_factory=list)  # the conversation, when there was one
    postponed_until: float = 0.0  # > 0: nothing was tried; the recipients wait until then, no attempt counted
    retry_at: float = (
        0.0  # > 0: deferred recipients are tried again then (quota, Retry-After), not by schedule
    )
    unreachable: bool = False  # every host of the route failed before a mail transaction (transiently)
    dns: bool = False  # the destination could not be resolved (results say whether for good)
    not_found: bool = False  # DNS says the destination does not exist (NXDOMAIN, or no address)
    dns_host: str = ""  # the smart host whose name DNS failed (then not the recipient domain's fault)
    reason: str = ""  # IIS-worded why, for event 4000 when the whole group is deferred
    cause: str = ""  # the event `cause` of that reason


class Transport(Protocol):
    async def deliver(
        self, route: RouteChoice, envelope: Envelope, recipients: Sequence[Recipient], message: MessageSource
    ) -> Outcome:
        """Deliver `envelope`'s message to `recipients` (all routed to `route`); never raises for a delivery
        failure, only for a bug or a cancellation."""
        ...

    def revive(self, links: set[str] | frozenset[str] | None) -> None:
        """The operator forced a retry (ETRN, `queue retry`): forget that destinations of these links (None:
        every link) failed lately, so they are tried at once."""
        ...

    async def close(self) -> None:
        """Stop: close idle connections."""
        ...
