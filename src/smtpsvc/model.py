"""Value objects of the mail pipeline: Envelope, Recipient, Route, DeliveryResult. Pure, no I/O.

The envelope is what the queue's `<id>.env` file holds (as JSON); every stage reads and updates it.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from email.utils import format_datetime
from enum import StrEnum
from typing import Any


class RecipientState(StrEnum):
    PENDING = "pending"  # still to deliver (first try or retry)
    DELIVERED = "delivered"  # a 2xx from the next hop, or written to Drop
    FAILED = "failed"  # permanent failure or expired; an NDR covers it


class Source(StrEnum):
    SMTP = "smtp"
    PICKUP = "pickup"
    DSN = "dsn"  # a report we generated (NDR, delay DSN)
    REPLAY = "replay"  # Badmail replay / admin resubmission


@dataclass(slots=True)
class Attempt:
    """One delivery attempt for one recipient, kept in its history."""

    time: float
    reply: str  # "250 2.0.0 OK", "450 4.2.0 busy", or our own diagnosis
    host: str = ""  # "mx.example.test[127.0.0.1]:25", "drop"


@dataclass(slots=True)
class Recipient:
    address: str
    state: RecipientState = RecipientState.PENDING
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY values; empty = not given (default FAILURE,DELAY)
    orcpt: str = ""  # RFC 3461 ORCPT, "rfc822;addr" form, empty when not given
    attempts: int = 0
    next_attempt: float = 0.0  # epoch seconds; 0 = now
    last_reply: str = ""  # last reply or diagnosis ("451 4.3.0 ...")
    status: str = ""  # enhanced status of the last result ("5.1.1")
    remote_mta: str = ""  # host that gave the last reply
    route: str = ""  # link name of the last routing decision
    notified: bool = False  # failed recipients: the NDR is queued, Badmail written, or no report was due
    history: list[Attempt] = field(default_factory=list)

    @property
    def domain(self) -> str:
        return domain_of(self.address)

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _RECIPIENT_FIELDS}
        data["notify"] = list(self.notify)
        data["history"] = [{"time": a.time, "reply": a.reply, "host": a.host} for a in self.history]
        return data

    @property
    def pending(self) -> bool:
        return self.state is RecipientState.PENDING

    @property
    def outstanding(self) -> bool:
        """Work remains: still to deliver, or failed and its report not yet made."""
        failed_unreported = self.state is RecipientState.FAILED and not self.notified
        return self.state is RecipientState.PENDING or failed_unreported


@dataclass(slots=True)
class Envelope:
    """The SMTP (P1) envelope of one queued message plus its delivery state."""

    id: str
    sender: str  # "" is the null reverse-path <>
    recipients: list[Recipient]
    received_at: float
    source: Source = Source.SMTP
    client_ip: str = ""
    helo: str = ""
    auth_user: str = ""  # the SMTP AUTH identity of the submitting client, "" when none
    body: str = ""  # BODY= parameter as given ("7BIT", "8BITMIME") or ""
    size: int = 0  # bytes of the stored message file
    crc32: int = 0  # CRC-32 of that file, then of the XEXCH50 blob: recovery checks a commit cut short
    ret: str = ""  # RFC 3461 RET (FULL|HDRS) or ""
    envid: str = ""  # RFC 3461 ENVID or ""
    smtputf8: bool = False
    frozen: bool = False
    xexch50: int = 0  # size of the XEXCH50 blob kept as queue/<id>.x50; 0 = none
    delay_notified: bool = False
    dsn_kind: str = ""  # for reports we made: "failure" | "delay"; "" for ordinary mail
    original_id: str = ""  # for reports: the queue id of the message reported on
    spool: str = ""  # id of the spool that last wrote it: another spool's message is adopted (KB306043)
    transcripts: list[list[str]] = field(
        default_factory=list
    )  # last SMTP conversations (no bodies, no secrets)

    @property
    def is_report(self) -> bool:
        return self.dsn_kind != ""

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.pending]

    @property
    def outstanding(self) -> bool:
        return any(r.outstanding for r in self.recipients)

    def next_due(self, frozen_links: frozenset[str] = frozenset()) -> float | None:
        """Earliest next attempt among recipients with work left; None when the message is done or all that
        is left waits on a frozen link (a failed recipient's report is still due whatever its link)."""
        times = [
            r.next_attempt
            for r in self.recipients
            if r.outstanding and not (r.pending and r.route in frozen_links)
        ]
        return min(times) if times else None

    def to_json(self) -> dict[str, Any]:
        """What `asdict` gives (same keys, same order), built by hand: it runs for every queue write, and
        `asdict`'s generic deep copy was a tenth of the event loop's time under load."""
        data = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        data["recipients"] = [r.to_json() for r in self.recipients]
        data["transcripts"] = [list(t) for t in self.transcripts]
        data["version"] = 1
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        """Rebuild an envelope from `to_json` output; raises ValueError/KeyError/TypeError when malformed."""
        if data.get("version") != 1:
            raise ValueError(f"unsupported envelope version {data.get('version')!r}")
        rcpts = []
        for r in data["recipients"]:
            rcpts.append(
                Recipient(
                    address=str(r["address"]),
                    state=RecipientState(r["state"]),
                    notify=tuple(str(n) for n in r.get("notify", ())),
                    orcpt=str(r.get("orcpt", "")),
                    attempts=int(r.get("attempts", 0)),
                    next_attempt=float(r.get("next_attempt", 0.0)),
                    last_reply=str(r.get("last_reply", "")),
                    status=str(r.get("status", "")),
                    remote_mta=str(r.get("remote_mta", "")),
                    route=str(r.get("route", "")),
                    notified=bool(r.get("notified", False)),
                    history=[
                        Attempt(float(a["time"]), str(a["reply"]), str(a.get("host", "")))
                        for a in r.get("history", [])
                    ],
                )
            )
        if not isinstance(data["id"], str) or not data["id"]:
            raise ValueError("envelope without id")
        return cls(
            id=data["id"],
            sender=str(data["sender"]),
            recipients=rcpts,
            received_at=float(data["received_at"]),
            source=Source(data.get("source", "smtp")),
            client_ip=str(data.get("client_ip", "")),
            helo=str(data.get("helo", "")),
            auth_user=str(data.get("auth_user", "")),
            body=str(data.get("body", "")),
            size=int(data.get("size", 0)),
            crc32=int(data.get("crc32", 0)),
            ret=str(data.get("ret", "")),
            envid=str(data.get("envid", "")),
            smtputf8=bool(data.get("smtputf8", False)),
            frozen=bool(data.get("frozen", False)),
            xexch50=int(data.get("xexch50", 0)),
            delay_notified=bool(data.get("delay_notified", False)),
            dsn_kind=str(data.get("dsn_kind", "")),
            original_id=str(data.get("original_id", "")),
            spool=str(data.get("spool", "")),
            transcripts=[[str(line) for line in t] for t in data.get("transcripts", [])],
        )


_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))
_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))


@dataclass(frozen=True, slots=True)
class Route:
    """Where a recipient goes next. `link` names the queue the operator sees (Exchange "link")."""

    kind: str  # "drop" | "smtp" | "graph"
    link: str  # "drop", "smarthost", or the recipient domain for MX routing
    hosts: tuple[tuple[str, int], ...] = ()  # explicit next hops (smart host); empty = look up MX
    mx_domain: str = ""  # domain whose MX to resolve when hosts is empty
    port: int = 25  # port for MX-resolved hosts


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """The outcome for one recipient of one attempt: the transient/permanent bit is the API."""

    address: str
    ok: bool
    permanent: bool  # meaningful when not ok
    reply: str  # the reply text as received, or our diagnosis
    status: str  # enhanced status code, e.g. "5.1.1"
    remote_mta: str = ""
    dsn_passed_on: bool = False  # the next hop took the DSN request (it advertised DSN): we report no success


QUEUE_STATES = ("ready", "retry", "frozen")
NO_LINK = "-"  # the link shown for a recipient that has no route recorded yet


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """A message's state in the queue and its next attempt (None: frozen, or nothing left to do)."""

    state: str
    next_attempt: float | None


def queue_status_of(frozen: bool, tried: bool, next_due: float | None, now: float) -> QueueStatus:
    """THE rule every view of the queue applies (`queue list` and `queue summary`, the web viewer, the API,
    the metrics), in the Exchange Queue Viewer's words; the queue backends feed it what they index:

    frozen  the message, or every link it waits for: nothing is tried until it is thawed
    retry   tried before, or held until a later time without an attempt of its own: its link backs off
            after another message to it failed (the destination is down for a while), or the link's
            sending budget is used up. Its next attempt is that time.
    ready   never tried, and due now.

    `frozen`: the message is, or all its pending recipients wait on frozen links; `tried`: a pending
    recipient has an attempt; `next_due`: `Envelope.next_due(frozen_links)`."""
    if frozen:
        return QueueStatus("frozen", None)
    if tried or (next_due is not None and next_due > now):
        return QueueStatus("retry", next_due)
    return QueueStatus("ready", next_due)


def queue_status(envelope: Envelope, frozen_links: frozenset[str], now: float) -> QueueStatus:
    """`queue_status_of` for one envelope."""
    pending = envelope.pending
    frozen = envelope.frozen or (bool(pending) and all(r.route in frozen_links for r in pending))
    tried = any(r.attempts for r in pending)
    return queue_status_of(frozen, tried, envelope.next_due(frozen_links), now)


def queue_state(envelope: Envelope, frozen_links: frozenset[str], now: float) -> str:
    """The state of `queue_status`: shared by the queue commands (admin), the backends' reference summary
    and the metrics, so all name a message's state alike."""
    return queue_status(envelope, frozen_links, now).state


def pending_by_link(envelope: Envelope) -> dict[str, int]:
    """How many of the message's pending recipients wait for each link (next hop), by route name."""
    counts: dict[str, int] = {}
    for rcpt in envelope.pending:
        link = rcpt.route or NO_LINK
        counts[link] = counts.get(link, 0) + 1
    return counts


def domain_of(address: str) -> str:
    """The lower-cased domain of an address, without a trailing dot; "" when there is none."""
    _, at, domain = address.rpartition("@")
    return domain.rstrip(".").lower() if at else ""


_counter = 0
# The random suffix keeps ids of different processes (SMTP workers, a spool copied from another server)
# apart; it needs to be unpredictable to no one, so a generator seeded from the OS once per process does,
# instead of a getrandom() system call per message.
_suffix = random.Random(os.urandom(16))


def new_queue_id(now: float | None = None) -> str:
    """A sortable, unique queue id: microsecond timestamp, process-local counter, random suffix (hex)."""
    global _counter
    _counter = (_counter + 1) & 0xFFFF
    stamp = int((time.time() if now is None else now) * 1_000_000)
    return f"{stamp:014X}{_counter:04X}{_suffix.getrandbits(24):06X}"


_last_date: tuple[int, str] = (-1, "")


def rfc5322_date(epoch: float) -> str:
    """A Date/Received timestamp in UTC with "+0000" (RFC 5322 reads "-0000" as "zone unknown")."""
    global _last_date
    second = int(epoch)
    if _last_date[0] != second:  # one Received header per message: format each second once
        _last_date = (second, format_datetime(datetime.fromtimestamp(second, UTC)))
    return _last_date[1]
