"""Message tracking: "what happened to this mail?", answered from the event log and the protocol log.

Pure: `track` joins what the two logs say by queue id and filters by sender, recipient, queue id and time;
the admin service layer reads the files and says which messages are still queued. The event log gives the
facts (3001 queued, with the sender; 3002 delivered and 3004 failed, per recipient; 4000/4006/7004 attempts
that failed; 3003 delay and 3004 non-delivery reports; 9006 an administrator's action); the protocol log, when
`[protocol_log]` is on, adds the conversations: the client's (MAIL FROM, RCPT TO, DATA) and each of ours with
the next hop.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from smtpsvc import events
from smtpsvc.protolog import OUTBOUND_COMMAND, LogLine

# Message states, in Exchange's message tracking words where it has them.
DELIVERED = "delivered"  # every recipient delivered (to Drop, or taken by the next hop)
BOUNCED = "bounced"  # every recipient failed, and a non-delivery report went to the sender
FAILED = "failed"  # every recipient failed, no report (a null sender: Badmail; NOTIFY=NEVER)
PARTLY = "partly delivered"  # some delivered, the rest failed
QUEUED = "still queued"  # recipients left to try, and the message is in the queue
DELETED = "deleted"  # an administrator deleted it from the queue
REFUSED = "refused"  # the client sent it, we did not take it (the DATA reply was not 250)
UNKNOWN = "unknown"  # recipients left and it is not in the queue (the logs were cut or rotated away)

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)", re.IGNORECASE)
_UNIT = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_ANGLE = re.compile(r"<([^<>]*)>")
_TRACK_FIELD = re.compile(r"(\w+)=(<[^>]*>|[^,]*)")
_STATUS_TEXT = re.compile(r"status=\w+ \((.*)\)$")


def parse_since(text: str, now: float) -> float:
    """`--since`: a time ago (`30m`, `2h`, `1d`, `1w`) or an ISO 8601 time (`2026-12-05T10:00`, UTC
    when it names no zone). Raises ValueError with a message for the operator."""
    value = text.strip()
    relative = _RELATIVE.fullmatch(value)
    if relative:
        return now - float(relative.group(1)) * _UNIT[relative.group(2).lower()]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected a time ago (30m, 2h, 1d, 1w) or an ISO time (2026-12-05T10:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True, slots=True)
class TrackQuery:
    """What to look for; every field given must match. Addresses match case-insensitively anywhere in the
    address (a domain finds all its mail); a queue id matches by its beginning."""

    sender: str = ""
    recipient: str = ""
    queue_id: str = ""
    since: float | None = None  # received at or after (epoch seconds)

    def empty(self) -> bool:
        return not (self.sender or self.recipient or self.queue_id or self.since is not None)


@dataclass(slots=True)
class Attempt:
    """One of our conversations with a next hop about the message (from the protocol log)."""

    host: str  # address:port
    started: str  # "YYYY-MM-DD HH:MM:SS" UTC
    lines: list[str] = field(default_factory=list)  # "> EHLO relay.test", "< 250 OK"
    mail_sent: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "started": self.started, "conversation": self.lines}


_OpenAttempts = dict[tuple[str, str, str], Attempt]  # (queue id, remote address, port) -> its conversation


@dataclass(slots=True)
class TrackedMessage:
    id: str
    sender: str = ""
    recipients: dict[str, str] = field(default_factory=dict)  # address -> its state and last word
    received: str = ""  # when it was queued (or offered), UTC
    client: str = ""  # "SMTP client 192.0.2.1 (EHLO name)", "Pickup", ...
    size: int | None = None
    inbound: list[str] = field(default_factory=list)  # the client's conversation about it
    attempts: list[Attempt] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # its events, one line each
    state: str = UNKNOWN
    queued_event: bool = False
    data_reply: int = 0  # the client's DATA/BDAT reply code (protocol log)
    report_sent: bool = False
    deleted: bool = False
    _epoch: float | None = None  # the received time, for --since

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "sender": self.sender,
            "recipients": [{"address": a, "result": r} for a, r in self.recipients.items()],
            "received": self.received,
            "client": self.client,
            "size": self.size,
            "inbound": self.inbound,
            "attempts": [a.to_json() for a in self.attempts],
            "events": self.history,
        }


def track(
    event_records: Iterable[Mapping[str, Any]],
    log_lines: Iterable[LogLine],
    query: TrackQuery,
    queued: Container[str],
    limit: int = 100,
) -> list[TrackedMessage]:
    """The messages the logs know of that match `query`, the newest first (at most `limit`). `queued`:
    the ids now in the queue (a message with recipients left is "still queued" only when it is there)."""
    messages: dict[str, TrackedMessage] = {}

    def message(queue_id: str) -> TrackedMessage:
        found = messages.get(queue_id)
        if found is None:
            found = messages[queue_id] = TrackedMessage(queue_id)
        return found

    for record in event_records:
        queue_id = record.get("queue_id")
        if isinstance(queue_id, str) and queue_id:
            _apply_event(message(queue_id), record)
    open_attempts: _OpenAttempts = {}
    for entry in log_lines:
        queue_id = entry.get("x-queue-id")
        if queue_id:
            _apply_line(message(queue_id), entry, open_attempts)
    out = []
    for msg in messages.values():
        msg.state = _state(msg, queued)
        if _matches(msg, query):
            out.append(msg)
    out.sort(key=lambda m: (m.received, m.id), reverse=True)
    return out[:limit]


def _apply_event(msg: TrackedMessage, record: Mapping[str, Any]) -> None:
    when = _event_time(record)
    event_id = record.get("id")
    text = str(record.get("text", ""))
    fields = _track_fields(str(record.get("track", "")))
    msg.history.append(f"{when} {event_id} {text}")
    if event_id == events.MESSAGE_QUEUED:
        msg.queued_event = True
        msg.sender = fields.get("from", msg.sender)
        msg.received = when
        msg._epoch = _epoch(str(record.get("time", "")))
        if fields.get("size", "").isdigit():
            msg.size = int(fields["size"])
        msg.client = text.removeprefix("Message queued from ").strip() or msg.client
    elif event_id in (events.MESSAGE_DELIVERED, events.NDR_SENT) and "to" in fields:
        outcome = fields.get("status", "")
        word = DELIVERED if event_id == events.MESSAGE_DELIVERED else outcome or FAILED
        detail = _STATUS_TEXT.search(str(record.get("track", "")))
        relay = fields.get("relay", "")
        result = word + (f" ({detail.group(1)})" if detail else "")
        if relay and relay != "none":
            result += f" by {relay}"
        msg.recipients[fields["to"]] = result
    elif event_id == events.NDR_SENT and text.startswith("Non-delivery report"):
        msg.report_sent = True
    elif event_id == events.QUEUE_ADMIN and "delete" in text.lower():
        msg.deleted = True


def _apply_line(
    msg: TrackedMessage, entry: LogLine, open_attempts: dict[tuple[str, str, str], Attempt]
) -> None:
    method, status = entry.get("cs-method"), entry.get("sc-status")
    if not entry.outbound:
        query = entry.raw("cs-uri-query")
        arg = entry.get("cs-uri-query")
        msg.inbound.append(f"{entry.when} {method}{' ' + arg if arg else ''} -> {status}")
        if not msg.received:
            msg.received = entry.when
            msg._epoch = _epoch(entry.when.replace(" ", "T") + "+00:00")
        helo = entry.get("cs-username")
        if helo or not msg.client:  # the client's HELO name: only the protocol log knows it
            msg.client = f"SMTP client {entry.get('c-ip')}" + (f" (HELO {helo})" if helo else "")
        if method == "MAIL" and status == "250":
            address = _ANGLE.search(query)
            if address and not msg.sender:
                msg.sender = address.group(1)
        elif method == "RCPT" and status == "250":
            address = _ANGLE.search(query)
            if address:
                msg.recipients.setdefault(address.group(1), "")
        elif method in ("DATA", "BDAT") and status != "354":
            msg.data_reply = int(status) if status.isdigit() else 0
        return
    key = (msg.id, entry.get("c-ip"), entry.get("s-port"))
    command = entry.get("cs-username") == OUTBOUND_COMMAND
    attempt = open_attempts.get(key)
    greeting = not command and status == "220" and not (attempt and attempt.lines[-1:] == ["> STARTTLS"])
    if attempt is None or greeting or (command and method == "MAIL" and attempt.mail_sent):
        attempt = Attempt(f"{entry.get('c-ip')}:{entry.get('s-port')}", entry.when)
        open_attempts[key] = attempt
        msg.attempts.append(attempt)
    if command:
        attempt.mail_sent = attempt.mail_sent or method == "MAIL"
        arg = entry.get("cs-uri-query")
        if method == ".":  # the message itself, ended by the dot: shown as the transcript shows it
            attempt.lines.append(f"> <{arg}> .")
        else:
            attempt.lines.append(f"> {method} {arg}".rstrip())
    else:
        attempt.lines.append(f"< {entry.get('cs-uri-query')}")


def _state(msg: TrackedMessage, queued: Container[str]) -> str:
    if not msg.queued_event and msg.data_reply and msg.data_reply != 250:
        return REFUSED
    results = list(msg.recipients.values())
    done = [r for r in results if r]
    if results and len(done) == len(results):
        delivered = sum(r.startswith(DELIVERED) for r in done)
        if delivered == len(done):
            return DELIVERED
        if delivered:
            return PARTLY
        return BOUNCED if msg.report_sent else FAILED
    if msg.id in queued:
        return QUEUED
    if msg.deleted:
        return DELETED
    return UNKNOWN


def _matches(msg: TrackedMessage, query: TrackQuery) -> bool:
    if query.queue_id and not msg.id.lower().startswith(query.queue_id.lower()):
        return False
    if query.sender and query.sender.lower().strip("<>") not in msg.sender.lower():
        return False
    if query.recipient:
        wanted = query.recipient.lower().strip("<>")
        if not any(wanted in r.lower() for r in msg.recipients):
            return False
    return not (query.since is not None and (msg._epoch is None or msg._epoch < query.since))


def _track_fields(text: str) -> dict[str, str]:
    """The Postfix-shaped `track` line of an event as fields: to, from, relay, status, size, ..."""
    fields = {k: v.strip().strip("<>") for k, v in _TRACK_FIELD.findall(text)}
    if "status" in fields:  # "sent (250 2.0.0 Ok)": the word; the reply is read by _STATUS_TEXT
        fields["status"] = fields["status"].split(" ", 1)[0]
    return fields


def _event_time(record: Mapping[str, Any]) -> str:
    raw = str(record.get("time", ""))
    epoch = _epoch(raw)
    if epoch is None:
        return raw
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _epoch(iso: str) -> float | None:
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def render_documents(messages: list[dict[str, Any]]) -> str:
    """The text `smtpsvc track` prints for the messages of a track document (`TrackedMessage.to_json`):
    per message its facts, the client's conversation, each delivery attempt's, then its events."""
    out: list[str] = []
    for msg in messages:
        out.append(f"Message {msg.get('id')}: {msg.get('state')}")
        out.append(f"  from       <{msg.get('sender', '')}>")
        for rcpt in msg.get("recipients", []):
            out.append(f"  to         <{rcpt.get('address')}>  {rcpt.get('result') or 'not delivered yet'}")
        size = f", {msg['size']} bytes" if msg.get("size") is not None else ""
        if msg.get("received"):
            out.append(f"  received   {msg['received']} UTC from {msg.get('client') or '?'}{size}")
        if msg.get("inbound"):
            out.append("  the client's conversation:")
            out.extend(f"      {line}" for line in msg["inbound"])
        for number, attempt in enumerate(msg.get("attempts", []), 1):
            out.append(f"  delivery attempt {number}: {attempt.get('started')} UTC to {attempt.get('host')}")
            out.extend(f"      {line}" for line in attempt.get("conversation", []))
        if msg.get("events"):
            out.append("  events:")
            out.extend(f"      {line}" for line in msg["events"])
        out.append("")
    return "\n".join(out) + ("\n" if out else "")
