"""The one submission path ("cleanup" in Postfix terms): every message, from SMTP, Pickup, a replay or a
report we generated, becomes queued mail here: Received header, categorization, durable commit, event 3001,
and a wake-up for the scheduler. Nothing enters the queue any other way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from smtpsvc import events
from smtpsvc.config import Config, LiveConfig
from smtpsvc.events import EventLog
from smtpsvc.model import Envelope, Recipient, Source, rfc5322_date
from smtpsvc.queue.base import Intake, MessageWriter
from smtpsvc.routing.categorizer import route_for


def received_header(
    *,
    hostname: str,
    queue_id: str,
    helo: str = "",
    client_ip: str = "",
    protocol: str = "ESMTP",
    unverified: bool = False,
    auth_user: str = "",
    now: float | None = None,
) -> bytes:
    """RFC 5321 §4.4 trace header; `protocol` per RFC 3848 (SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA)."""
    stamp = rfc5322_date(time.time() if now is None else now)
    if client_ip:
        origin = f"from {_clean(helo) or 'unknown'} ([{client_ip}]{' unverified' if unverified else ''})"
    else:
        origin = f"from {_clean(helo) or 'localhost'}"
    authenticated = f"\r\n\t(Authenticated sender: {_clean(auth_user)})" if auth_user else ""
    by = f"\r\n\tby {hostname} with {protocol} id {queue_id};\r\n\t{stamp}\r\n"
    return f"Received: {origin}{authenticated}{by}".encode()


def _clean(text: str) -> str:
    """A HELO argument is client-controlled: keep it printable and short before it goes into a header."""
    if text.isascii() and text.isprintable() and " " not in text and "(" not in text and ")" not in text:
        return text[:255]  # the usual name: every character is kept (printable ASCII is 32..126)
    return "".join(c for c in text if 32 < ord(c) < 127 and c not in "()")[:255]


class Ingest:
    def __init__(
        self,
        queue: Intake,
        live: LiveConfig,
        event_log: EventLog,
        on_queued: Callable[[], None] = lambda: None,
    ) -> None:
        self.queue = queue
        self.live = live  # the service's configuration holder: a reload reaches this part too
        self.events = event_log
        self._on_queued = on_queued

    @property
    def config(self) -> Config:
        return self.live.current

    def begin(self) -> MessageWriter:
        """A writer for a new message; raises QueueError when the spool cannot take one."""
        return self.queue.create_writer()

    async def commit(self, writer: MessageWriter, envelope_fields: EnvelopeFields) -> Envelope:
        """Categorize, make durable, log, wake delivery. Raises QueueError (the caller answers 4xx)."""
        now = time.time()
        config = self.config
        recipients = []
        seen: set[str] = set()
        for rcpt in envelope_fields.recipients:
            key = rcpt.address.lower()
            if key in seen:
                continue  # the same recipient twice (RCPT repeated, To and Cc) gets one copy
            seen.add(key)
            rcpt.route = route_for(rcpt.address, config).link
            recipients.append(rcpt)
        envelope = Envelope(
            id=writer.id,
            sender=envelope_fields.sender,
            recipients=recipients,
            received_at=now,
            source=envelope_fields.source,
            client_ip=envelope_fields.client_ip,
            helo=envelope_fields.helo,
            auth_user=envelope_fields.auth_user,
            body=envelope_fields.body,
            ret=envelope_fields.ret,
            envid=envelope_fields.envid,
            smtputf8=envelope_fields.smtputf8,
            dsn_kind=envelope_fields.dsn_kind,
            original_id=envelope_fields.original_id,
            xexch50=len(envelope_fields.xexch50),
        )
        if envelope_fields.xexch50:
            writer.attach_xexch50(envelope_fields.xexch50)
        await self.queue.put(writer, envelope)
        source = envelope.source.value
        self.events.emit(
            events.Event(
                events.MESSAGE_QUEUED,
                f"Message queued from {source}"
                f"{' client ' + envelope.client_ip if envelope.client_ip else ''}",
                queue_id=envelope.id,
                track=(
                    f"from=<{envelope.sender}>, size={envelope.size}, nrcpt={len(recipients)}, "
                    f"source={source}"
                    + (f", sasl_username={envelope.auth_user}" if envelope.auth_user else "")
                ),
            )
        )
        self._on_queued()
        return envelope

    async def submit_bytes(self, message: bytes, fields: EnvelopeFields) -> Envelope:
        """Queue a message held in memory (reports we generate, small replays)."""
        writer = self.begin()
        try:
            writer.write(message)
        except BaseException:
            writer.abort()
            raise
        return await self.commit(writer, fields)


@dataclass(slots=True)
class EnvelopeFields:
    """What a submitter knows about a message before it is queued (the queue adds id, time, routes)."""

    sender: str
    recipients: list[Recipient]
    source: Source
    client_ip: str = ""
    helo: str = ""
    auth_user: str = ""
    body: str = ""
    ret: str = ""
    envid: str = ""
    smtputf8: bool = False
    dsn_kind: str = ""
    original_id: str = ""
    xexch50: bytes = b""  # Exchange XEXCH50 blob received with the message (opaque)
