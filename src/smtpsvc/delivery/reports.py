"""Reports to senders: failure NDRs, delay and success DSNs (RFC 3464, built by `smtpsvc.dsn`), and Badmail
for what cannot be reported. Every report is queued through `ingest` like any message, with the null
sender, so a report about a report never happens. In a cluster, the node that makes the report writes the
Badmail item into its own badmail/ folder.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from smtpsvc import dsn, events
from smtpsvc.config import Config, LiveConfig
from smtpsvc.events import EventLog
from smtpsvc.folders.badmail import put_badmail
from smtpsvc.ingest import EnvelopeFields, Ingest
from smtpsvc.model import DeliveryResult, Envelope, Recipient, Source
from smtpsvc.queue.base import QueueError, QueueStore

HEADER_READ_LIMIT = 256 * 1024  # how much of a message we read to find its header block for a report


class Reporter:
    def __init__(
        self, queue: QueueStore, live: LiveConfig, ingest: Ingest, event_log: EventLog, badmail_dir: Path
    ) -> None:
        self.queue = queue
        self.live = live  # the service's configuration holder: a reload reaches this part too
        self.ingest = ingest
        self.events = event_log
        self.badmail_dir = badmail_dir

    @property
    def config(self) -> Config:
        return self.live.current

    async def failure(self, envelope: Envelope, failed: Sequence[Recipient]) -> None:
        """An NDR to the sender (and send_ndr_copy_to), or Badmail for a null sender. Raises QueueError or
        OSError when it cannot be made durable now: the caller keeps the message and tries again."""
        if not envelope.sender:
            await self._to_badmail(envelope, failed)
            return
        reported = [r for r in failed if dsn.should_report(envelope, r, "failure")]
        if not reported:
            return
        items = [_item(r, "failed", "5.0.0") for r in reported]
        copy_to = self.config.delivery.send_ndr_copy_to
        report = await self._queue(envelope, items, "failure", [copy_to] if copy_to else [])
        self.events.emit(
            events.Event(
                events.NDR_SENT,
                f"Non-delivery report {report.id} sent to {envelope.sender} for "
                + ", ".join(r.address for r in reported),
                queue_id=envelope.id,
                status=reported[0].status,
            )
        )

    async def delay(self, envelope: Envelope) -> bool:
        """One delay DSN (SmtpRemoteDelayExpireMinutes) for pending recipients whose NOTIFY allows it.
        Returns False when it could not be queued (the next attempt tries again)."""
        delayed = [r for r in envelope.pending if dsn.should_report(envelope, r, "delay")]
        if not delayed:
            return True
        until = envelope.received_at + self.config.delivery.expiration
        items = [_item(r, "delayed", "4.0.0", will_retry_until=until) for r in delayed]
        try:
            report = await self._queue(envelope, items, "delay")
        except QueueError:
            return False
        self.events.emit(
            events.Event(
                events.DELAY_DSN_SENT,
                f"Delay notification {report.id} sent to {envelope.sender} for "
                + ", ".join(r.address for r in delayed),
                queue_id=envelope.id,
                status=delayed[0].status,
            )
        )
        return True

    async def success(
        self, envelope: Envelope, succeeded: Sequence[tuple[Recipient, DeliveryResult]]
    ) -> None:
        """NOTIFY=SUCCESS (RFC 3461): "delivered" for Drop, "relayed" when the next hop did not take the
        DSN request over. Best effort: a report that cannot be queued is logged, not retried."""
        items = [
            dsn.ReportedRecipient(
                address=r.address,
                action="delivered" if result.remote_mta == "drop" else "relayed",
                status=result.status or "2.0.0",
                diagnostic=result.reply,
                remote_mta=host_name(result.remote_mta),
                orcpt=r.orcpt,
                last_attempt=time.time(),
            )
            for r, result in succeeded
        ]
        try:
            await self._queue(envelope, items, "success")
        except QueueError as exc:
            self.events.emit(
                events.Event(
                    events.NDR_SENT,
                    f"Cannot queue the success notification: {exc}",
                    queue_id=envelope.id,
                    cause="report-lost",
                )
            )

    async def _queue(
        self, envelope: Envelope, items: list[dsn.ReportedRecipient], kind: str, copies: Sequence[str] = ()
    ) -> Envelope:
        with await self.queue.open_message(envelope.id) as original:
            message = await asyncio.to_thread(self._build, envelope, items, kind, original)
        return await self.ingest.submit_bytes(
            message,
            EnvelopeFields(
                sender="",
                recipients=[Recipient(address=a) for a in (envelope.sender, *copies)],
                source=Source.DSN,
                dsn_kind=kind,
                original_id=envelope.id,
            ),
        )

    def _build(
        self, envelope: Envelope, items: list[dsn.ReportedRecipient], kind: str, original: BinaryIO
    ) -> bytes:
        """Worker thread: read the original's headers (the whole message for RET=FULL failures), build."""
        body: bytes | None = None
        original.seek(0)
        if envelope.ret == "FULL" and kind == "failure":
            whole = original.read()
            end = dsn.header_block_end(whole)
            headers, body = (whole[:end], whole[end:]) if end is not None else (whole, b"")
        else:
            headers = dsn.split_headers(original.read(HEADER_READ_LIMIT))
        hostname = self.config.server.hostname
        return dsn.build_report(
            reporting_mta=hostname,
            original=envelope,
            original_headers=headers,
            original_body=body,
            recipients=items,
            kind=kind,
            now=time.time(),
            message_id_domain=hostname,
            postmaster=f"postmaster@{hostname}",
        )

    async def _to_badmail(self, envelope: Envelope, failed: Sequence[Recipient]) -> None:
        reasons = [
            f"Unable to deliver this message because the following error was encountered: "
            f"This message is a delivery status notification that cannot be delivered. "
            f"Recipient {r.address}: {r.status} {r.last_reply}"
            for r in failed
        ]
        with await self.queue.open_message(envelope.id) as original:
            path = await put_badmail(
                self.events,
                self.badmail_dir,
                envelope.id,
                original,
                reasons,
                envelope.to_json(),
                self.config.badmail.max_size,
            )
        where = f"written to Badmail as {path.name}" if path else "discarded (badmail.max_size = 0)"
        self.events.emit(
            events.Event(
                events.BADMAIL_WRITTEN,
                f"Undeliverable report {envelope.id} {where}",
                queue_id=envelope.id,
                status=failed[0].status,
            )
        )


def _item(
    rcpt: Recipient, action: str, default_status: str, will_retry_until: float | None = None
) -> dsn.ReportedRecipient:
    """A report block from a queued recipient's last result."""
    return dsn.ReportedRecipient(
        address=rcpt.address,
        action=action,
        status=rcpt.status or default_status,
        diagnostic=rcpt.last_reply,
        remote_mta=host_name(rcpt.remote_mta),
        orcpt=rcpt.orcpt,
        last_attempt=rcpt.history[-1].time if rcpt.history else None,
        will_retry_until=will_retry_until,
    )


def host_name(remote_mta: str) -> str:
    """ "mx.example.test[127.0.0.1]:25" → "mx.example.test" for the Remote-MTA field."""
    return remote_mta.split("[", 1)[0] if remote_mta and remote_mta != "drop" else ""
