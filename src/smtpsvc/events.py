"""The event log: `log/events.jsonl` (one JSON object a line) plus a text line on stderr.

Event IDs and wording follow the IIS SMTP service (SPEC 1.4) so an operator who knew the Windows
Application log recognises them. Message-tracking records also carry a Postfix-shaped `track` line
(`to=<r>, relay=host[ip]:port, delay=, dsn=, status=sent (...)`) for existing log tooling.

Writes are buffered and flushed on a short timer (or when the buffer is large), not per event: the event
log is diagnostic, the queue files are the truth, so it need not be fsynced on the hot path.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) uses for a str
from pathlib import Path
from typing import Any, TextIO

# IIS-compatible event IDs (SPEC 1.4).
CONNECTION_LIMIT = 402
MAILROOT_UNUSABLE = 429
MESSAGE_QUEUED = 3001
MESSAGE_DELIVERED = 3002
DELAY_DSN_SENT = 3003
NDR_SENT = 3004
BADMAIL_WRITTEN = 3005
SELF_HEALING = 3010
REMOTE_DOMAIN_FAILED = 4000
REMOTE_HOST_FAILED = 4006
REMOTE_REJECTED_COMMAND = 7004
CLIENT_COMMAND_REJECTED = 7010

LEVELS = {
    CONNECTION_LIMIT: "error",
    MAILROOT_UNUSABLE: "error",
    MESSAGE_QUEUED: "info",
    MESSAGE_DELIVERED: "info",
    DELAY_DSN_SENT: "warning",
    NDR_SENT: "error",
    BADMAIL_WRITTEN: "error",
    SELF_HEALING: "info",
    REMOTE_DOMAIN_FAILED: "warning",
    REMOTE_HOST_FAILED: "warning",
    REMOTE_REJECTED_COMMAND: "error",
    CLIENT_COMMAND_REJECTED: "error",
}

# Extra, non-IIS events get ids outside the IIS ranges so tools can tell them apart.
QUEUE_FILE_CORRUPT = 9001
SERVICE_STARTED = 9002
SERVICE_STOPPED = 9003
PICKUP_REJECTED = 9004
RECATEGORIZED = 9005
QUEUE_ADMIN = 9006  # an operator changed the queue (freeze, thaw, retry, delete, recategorize), CLI or web
LEVELS.update(
    {QUEUE_FILE_CORRUPT: "error", SERVICE_STARTED: "info", SERVICE_STOPPED: "info", PICKUP_REJECTED: "error"}
)
TASK_STOPPED = 9007  # a part of the service (Pickup, the scheduler, ...) stopped with an error; restarted
LEVELS[TASK_STOPPED] = "error"


def remote_domain_failed_text(domain: str, reason: str) -> str:
    return f"Message delivery to the remote domain '{domain}' failed for the following reason: {reason}"


def remote_host_failed_text(ip: str, domain: str, reason: str) -> str:
    return (
        f"Message delivery to the host '{ip}' failed while delivering to the remote domain "
        f"'{domain}' for the following reason: {reason}"
    )


def remote_rejected_text(host: str, verb: str, reply: str, command: str) -> str:
    return (
        f'The remote host "{host}" responded to the SMTP command "{verb}" with "{reply}". '
        f'The full command sent was "{command}".'
    )


def connection_limit_text(limit: int) -> str:
    return f"The maximum number of allowed inbound connections ({limit}) has been reached."


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    text: str
    queue_id: str = ""
    domain: str = ""
    host: str = ""
    status: str = ""
    cause: str = ""
    track: str = ""
    level: str = ""  # "": the id's level (LEVELS); set when one event of an id needs more attention

    def to_json(self, now: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": _iso_time(now),
            "id": self.id,
            "level": self.level or LEVELS.get(self.id, "info"),
            "source": "smtpsvc",
            "text": self.text,
        }
        for key in ("queue_id", "domain", "host", "status", "cause", "track"):
            value = getattr(self, key)
            if value:
                record[key] = value
        return record


def _json_line(event: Event, now: float) -> tuple[str, str, str]:
    """`json.dumps(event.to_json(now), ensure_ascii=False, separators=(",", ":")) + "\\n"`, byte for byte,
    without the dict and the encoder's calls (one line per event, several events per message); with the time
    and level it holds, for the text copy."""
    when = _iso_time(now)
    level = event.level or LEVELS.get(event.id, "info")
    try:
        if type(event.id) is not int:
            raise TypeError  # a bool or an int subclass: json.dumps knows how it looks
        line = (  # encode_basestring raises TypeError for what is not a str, as the fields should be
            f'{{"time":{encode_basestring(when)},"id":{event.id},"level":{encode_basestring(level)},'
            f'"source":"smtpsvc","text":{encode_basestring(event.text)}'
        )
        if event.queue_id:
            line += f',"queue_id":{encode_basestring(event.queue_id)}'
        if event.domain:
            line += f',"domain":{encode_basestring(event.domain)}'
        if event.host:
            line += f',"host":{encode_basestring(event.host)}'
        if event.status:
            line += f',"status":{encode_basestring(event.status)}'
        if event.cause:
            line += f',"cause":{encode_basestring(event.cause)}'
        if event.track:
            line += f',"track":{encode_basestring(event.track)}'
    except TypeError:
        record = event.to_json(now)
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n", when, level
    return line + "}\n", when, level


_last_second: tuple[int, str] = (-1, "")


def _iso_time(epoch: float) -> str:
    """`datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")`, with the date and time of
    day formatted once per second (a busy server writes many events a second)."""
    global _last_second
    fraction, whole = math.modf(epoch)  # the rounding datetime.fromtimestamp does
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    if _last_second[0] != second:
        _last_second = (second, datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")[:-6])
    return f"{_last_second[1]}.{micros // 1000:03d}+00:00"


class EventLog:
    """Appends events to `events.jsonl`; thread-safe (the pickup scanner and CLI tools may share it)."""

    def __init__(self, path: Path | None, stream: TextIO | None = sys.stderr, flush_bytes: int = 64 * 1024):
        self._path = path
        self._stream = stream
        self._flush_bytes = flush_bytes
        self._buffer: list[str] = []
        self._buffered = 0
        # The text copy for the stream: written at once to a terminal (someone is watching), else with the
        # file's flushes (journald or a log file gets the lines within a second, not one write() per event).
        self._stream_lines: list[str] = []
        self._stream_now = _is_terminal(stream)
        self._lock = threading.Lock()
        self._file: Any = None
        # Observers (metrics): a tuple replaced on subscribe, so emit reads it without taking the lock.
        self._subscribers: tuple[Callable[[Event], None], ...] = ()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the service's life

    def emit(self, event: Event, now: float | None = None) -> None:
        stamp = time.time() if now is None else now
        line, when, level = _json_line(event, stamp)
        text = ""
        if self._stream is not None:
            text = f"{when} {level} {event.id} {event.text}"
            extra = [f"queue_id={event.queue_id}"] if event.queue_id else []
            if event.cause:
                extra.append(f"cause={event.cause}")
            if event.status:
                extra.append(f"status={event.status}")
            text += f" {' '.join(extra)}\n" if extra else "\n"
        with self._lock:
            self._buffer.append(line)
            self._buffered += len(line)
            if self._buffered >= self._flush_bytes:
                self._flush_locked()
            if text and not self._stream_now:
                self._stream_lines.append(text)  # after the flush above, as it was written before
        if text and self._stream_now:
            self._write_stream(text)
        for callback in self._subscribers:  # observer hook (metrics)
            try:  # noqa: SIM105 - contextlib.suppress would add three calls per event
                callback(event)
            except Exception:  # an observer's bug must never stop logging or mail flow
                pass

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback(event)` after every emitted event, in the emitting thread; it should be quick and
        its exceptions are ignored. Returns a function that unsubscribes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(c for c in self._subscribers if c is not callback)

        return unsubscribe

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _write_stream(self, text: str) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError, ValueError):  # a closed stderr must never stop mail flow
                self._stream.write(text)
                self._stream.flush()

    def _flush_locked(self) -> None:
        if self._stream_lines:
            self._write_stream("".join(self._stream_lines))
            self._stream_lines.clear()
        if self._file is not None and self._buffer:
            try:
                self._file.write("".join(self._buffer))
                self._file.flush()
            except OSError:
                # Disk full or similar: keep going; the queue files remain the truth.
                pass
        self._buffer.clear()
        self._buffered = 0

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def read_events(path: Path) -> list[dict[str, Any]]:
    """All events in an event log file; lines that do not parse are skipped (a crash may cut the last)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append(record)
    return out
