"""The admin service layer for the queue: list, show, freeze, thaw, retry (Force Connection), delete.

It works on the spool files of a STOPPED service, taking the same lock the service holds, so the two can
never change the queue at the same time. While the service runs it holds the lock, and these operations
say so (the way to reach a running service, the admin HTTP API, is not built yet). The CLI is a thin
printer over this module; nothing here prints.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpsvc.config import Config
from smtpsvc.dsn import split_headers
from smtpsvc.model import Envelope, RecipientState
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.local import LocalSpool
from smtpsvc.routing.categorizer import route_for

HEADER_LIMIT = 64 * 1024


class AdminError(Exception):
    """The operation cannot be done; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    envelope: Envelope

    @property
    def state(self) -> str:
        """Exchange Queue Viewer words: frozen, retry (failed before, waiting), ready (not tried yet)."""
        env = self.envelope
        if env.frozen:
            return "frozen"
        if any(r.pending and r.attempts for r in env.recipients):
            return "retry"
        return "ready"

    def to_json(self, now: float) -> dict[str, Any]:
        env = self.envelope
        due = env.next_due()
        return {
            "id": env.id,
            "state": self.state,
            "age_seconds": round(now - env.received_at, 1),
            "size": env.size,
            "sender": env.sender,
            "source": env.source.value,
            "next_attempt": due,
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
    state: str  # "frozen" when all its messages are, "retry" when any failed before, else "ready"
    next_attempt: float | None


def summarize(entries: list[QueueEntry], now: float) -> list[LinkSummary]:
    """Pending recipients grouped by link, busiest first (like Postfix's qshape)."""
    groups: dict[str, list[tuple[QueueEntry, int]]] = {}
    for entry in entries:
        counts: dict[str, int] = {}
        for rcpt in entry.envelope.pending:
            counts[rcpt.route or "-"] = counts.get(rcpt.route or "-", 0) + 1
        for link, n in counts.items():
            groups.setdefault(link, []).append((entry, n))
    out = []
    for link, members in groups.items():
        states = {entry.state for entry, _ in members}
        dues = [
            d
            for entry, _ in members
            if (d := entry.envelope.next_due()) is not None and not entry.envelope.frozen
        ]
        out.append(
            LinkSummary(
                link=link,
                messages=len(members),
                recipients=sum(n for _, n in members),
                oldest_age=max(now - entry.envelope.received_at for entry, _ in members),
                state="frozen" if states == {"frozen"} else ("retry" if "retry" in states else "ready"),
                next_attempt=min(dues) if dues else None,
            )
        )
    return sorted(out, key=lambda s: (-s.messages, s.link))


class QueueAdmin:
    def __init__(self, spool: LocalSpool) -> None:
        self.spool = spool

    @classmethod
    @contextmanager
    def offline(cls, config: Config) -> Iterator[QueueAdmin]:
        """Open the queue of a stopped service (with its lock) for the duration of the block."""
        spool = LocalSpool(Path(config.server.root) / "queue")
        try:
            spool.open()
        except QueueError as exc:
            raise AdminError(
                f"{exc}. The service is running: stop it to work on the queue files (queue commands through "
                "a running service come with the admin API, which is not built yet)."
            ) from None
        except OSError as exc:
            raise AdminError(f"cannot open the queue folder {spool.dir}: {exc.strerror or exc}") from None
        try:
            yield cls(spool)
        finally:
            spool.close()

    def entries(self, state: str = "", to: str = "", domain: str = "") -> list[QueueEntry]:
        """Queued messages, oldest first, filtered by message state, recipient address or domain."""
        out = []
        for envelope in self.spool.list():
            entry = QueueEntry(envelope)
            if state and entry.state != state:
                continue
            if to and not any(r.address.lower() == to.lower() for r in envelope.recipients):
                continue
            if domain and not any(r.domain == domain.lower().rstrip(".") for r in envelope.recipients):
                continue
            out.append(entry)
        return out

    def get(self, queue_id: str) -> Envelope:
        envelope = self.spool.get(queue_id)
        if envelope is None:
            raise AdminError(f"no message {queue_id!r} in the queue (see `smtpsvc queue list`)")
        return envelope

    def headers(self, queue_id: str) -> bytes:
        self.get(queue_id)
        with self.spool.open_message(queue_id) as fh:
            return split_headers(fh.read(HEADER_LIMIT))

    async def freeze(self, queue_id: str) -> Envelope:
        """Hold a message: it is kept, and not delivered, until thawed (Exchange Queue Viewer Freeze)."""
        envelope = self.get(queue_id)
        envelope.frozen = True
        await self.spool.save(envelope)
        return envelope

    async def thaw(self, queue_id: str) -> Envelope:
        envelope = self.get(queue_id)
        envelope.frozen = False
        await self.spool.save(envelope)
        return envelope

    async def retry(self, queue_id: str) -> Envelope:
        """Force Connection: every pending recipient is due now (at the next start of the service)."""
        envelope = self.get(queue_id)
        now = time.time()
        for rcpt in envelope.recipients:
            if rcpt.state is RecipientState.PENDING:
                rcpt.next_attempt = now
        await self.spool.save(envelope)
        return envelope

    async def recategorize(self, config: Config, queue_id: str = "") -> int:
        """ResetMessageStatus by hand: recompute every pending recipient's route from `config` and make the
        message due now (one message, or all). Returns how many messages changed."""
        envelopes = [self.get(queue_id)] if queue_id else self.spool.list()
        now = time.time()
        for envelope in envelopes:
            for rcpt in envelope.pending:
                rcpt.route = route_for(rcpt.address, config).link
                rcpt.next_attempt = now
            await self.spool.save(envelope)
        return len(envelopes)

    async def delete(self, queue_id: str) -> None:
        """Remove a message without a report (the operator's decision; `--ndr` needs the running service)."""
        self.get(queue_id)
        await self.spool.complete(queue_id)
