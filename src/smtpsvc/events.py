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
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring  # what json.dumps(ensure_ascii=False) uses for a str
from pathlib import Path
from typing import Any, TextIO

from smtpsvc.diskspace import FULL_ERRNOS

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
TASK_STOPPED = 9007  # a part of the service (Pickup, the scheduler, ...) stopped with an error; restarted
DISK_FULL = 9010  # a write failed for lack of space (ENOSPC, EDQUOT): once per episode and what (queue, Drop)
DISK_SPACE_AVAILABLE = 9011  # that file system has room again; also: events the log file could not take
LEVELS.update(
    {
        QUEUE_FILE_CORRUPT: "error",
        SERVICE_STARTED: "info",
        SERVICE_STOPPED: "info",
        PICKUP_REJECTED: "error",
        DISK_FULL: "error",
        DISK_SPACE_AVAILABLE: "info",
        TASK_STOPPED: "error",
    }
)


def disk_space_event(full: bool, text: str) -> Event:
    """Event 9010 (the disk is full) or 9011 (space again), as `diskspace.SpaceWatcher.report` says."""
    if full:
        return Event(DISK_FULL, text, cause="disk-full")
    return Event(DISK_SPACE_AVAILABLE, text, cause="disk-space-available")


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
        # The file, as a descriptor opened for appending (O_APPEND: the SMTP workers append to it too). Not
        # a Python file object: one of those keeps what a full disk refused in its buffer and raises it
        # again at every flush and at close; here what cannot be written is counted (`_lost`) and dropped.
        self._fd: int | None = None
        self._lost = 0  # events the file could not take since it last could
        self._lost_why = ""
        self._cut = False  # a write stopped inside a line: the next one starts on a line of its own
        self._closed = False  # after close: events go to the stream only, as they always did
        # Observers (metrics): a tuple replaced on subscribe, so emit reads it without taking the lock.
        self._subscribers: tuple[Callable[[Event], None], ...] = ()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._fd = _open_append(path)
            except OSError as exc:
                if exc.errno not in FULL_ERRNOS:
                    raise
                # A full disk (a new events.jsonl needs an inode): start anyway, on stderr; the file is
                # opened at a later flush once there is room.
                self._lost_why = exc.strerror or str(exc)

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
        if self._path is not None and self._buffer and not self._closed:
            lines, self._buffer = self._buffer, []
            notice = self._lost > 0
            if notice:
                lines.insert(0, _json_line(self._lost_event(), time.time())[0])
            self._write_file(lines, notice)
        self._buffer.clear()
        self._buffered = 0

    def _write_file(self, lines: list[str], notice: bool) -> None:
        """Append `lines` to the file (the first is the notice of earlier losses when `notice`). What it
        cannot take (disk full, I/O error) is counted, not kept: the event log must never stop mail flow,
        and the queue files are the truth. A line cut by a failure is left as it is (readers skip it) and
        the next write begins on a new line."""
        data = "".join(lines).encode("utf-8", "backslashreplace")  # a lone surrogate cannot stop a write
        starts_cut = self._cut
        if starts_cut:
            data = b"\n" + data
        written = 0
        try:
            if self._fd is None:
                assert self._path is not None
                self._fd = _open_append(self._path)
            view = memoryview(data)
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            if written:  # else the file ends as it did: cut or not
                self._cut = data[written - 1] != 0x0A
            done = data[:written].count(b"\n") - (1 if starts_cut and written else 0)  # whole lines
            if notice and done == 0:
                self._lost += len(lines) - 1  # the earlier losses are still to be told
            else:
                self._lost = len(lines) - done
            self._lost_why = exc.strerror or str(exc)
            return
        self._cut = False
        self._lost = 0

    def _lost_event(self) -> Event:
        where = " (they went to the standard error stream only)" if self._stream is not None else ""
        return Event(
            DISK_SPACE_AVAILABLE,
            f"{self._lost} event(s) could not be written to {self._path} ({self._lost_why}){where}",
            cause="events-not-written",
            level="warning",
        )

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._lost and self._stream is not None:  # the file never took them: say so where we can
                event = self._lost_event()
                self._write_stream(f"{_iso_time(time.time())} warning {event.id} {event.text}\n")
            if self._fd is not None:
                with contextlib.suppress(OSError):  # nothing is buffered here: close cannot lose an event
                    os.close(self._fd)
                self._fd = None
            self._closed = True


def _open_append(path: Path) -> int:
    """The event log file, opened for appending (created with the mode `open(path, "a")` gives; like
    every descriptor Python opens, not inherited by child processes)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)


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
