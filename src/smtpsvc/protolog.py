"""The SMTP protocol log: every command and reply, in and out, as IIS writes it (W3C extended log format).

One line per command or reply, the fields of `FIELDS`, space-separated, `-` for an empty value and `+` for a
space inside one, under a `#Software:` / `#Version:` / `#Date:` / `#Fields:` header at the top of each file.
Inbound lines name the client in `c-ip` and its HELO name in `cs-username`, as IIS 6 does; outbound lines name
the remote host in `c-ip` and say `OutboundConnectionCommand` / `OutboundConnectionResponse` in
`cs-username`, as IIS 6 does. `x-queue-id` (ours) is the message's queue id, which is what `smtpsvc track`
joins on. AUTH arguments and responses are never logged (`***`).

Cost (issue 18: CPU per message): a line is one f-string appended to a list; the list is written with one
`os.write` when it reaches 64 KiB and once a second (the owner's flush timer), never fsynced: like the event
log it is diagnostic, the queue files are the truth.

Several processes write it (the SMTP workers, `server.workers` > 1, and the main process): every process
appends whole lines to the same file with O_APPEND writes, so lines never interleave. Only the main process
rotates (`rotate=True`): at a flush that would take the file past `max_size` it renames it to
`smtp-<UTC time>.log`, puts a new file with its header in place (made aside and linked in, so no writer can
append before the header) and removes the oldest rotated files beyond `max_files`. The other processes see
at their next flush that the path names another file and reopen it; meanwhile their lines land at the end of
the rotated file, where they belong in time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from smtpsvc.protocol import (
    Auth,
    AuthResponse,
    Bdat,
    BdatEnd,
    Data,
    DataEnd,
    Ehlo,
    Etrn,
    Expn,
    Helo,
    Help,
    Mail,
    Noop,
    Quit,
    Rcpt,
    Rejected,
    Rset,
    StartTls,
    Vrfy,
    Xexch50,
    Xexch50Blob,
    XLink2State,
)

SOFTWARE = "smtpsvc"
ACTIVE_NAME = "smtp.log"  # the file being written; rotated ones are smtp-YYYYMMDD-HHMMSS-ffffff.log
ROTATED_PREFIX = "smtp-"
FIELDS = (
    "date",
    "time",
    "c-ip",
    "cs-username",
    "s-computername",
    "s-ip",
    "s-port",
    "cs-method",
    "cs-uri-query",
    "sc-status",
    "sc-bytes",
    "cs-bytes",
    "time-taken",
    "x-queue-id",
)
OUTBOUND_COMMAND = "OutboundConnectionCommand"
OUTBOUND_RESPONSE = "OutboundConnectionResponse"
SECRET = "***"
FLUSH_BYTES = 64 * 1024
_SECRET_VERBS = frozenset({"AUTH"})


def field(value: str) -> str:
    """A value as W3C writes it: `-` when empty, `+` for each space (IIS's escape), no line breaks."""
    if not value:
        return "-"
    if " " in value or "\r" in value or "\n" in value or "\t" in value:
        value = value.replace("\r", "").replace("\n", "+").replace("\t", "+").replace(" ", "+")
    return value


def unfield(value: str) -> str:
    """A logged value back as text (`+` was a space: addresses and replies rarely hold a real `+` where it
    matters to a reader, and IIS's own logs have the same ambiguity)."""
    return "" if value == "-" else value.replace("+", " ")


def redact(verb: str, arg: str) -> str:
    """The argument as logged: AUTH keeps its mechanism name, the rest (an initial response) becomes ***."""
    if verb.upper() in _SECRET_VERBS:
        mechanism, _, rest = arg.partition(" ")
        return f"{mechanism} {SECRET}" if rest else mechanism
    return arg


def header(now: float) -> str:
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return f"#Software: {SOFTWARE}\n#Version: 1.0\n#Date: {stamp}\n#Fields: {' '.join(FIELDS)}\n"


_last_second: tuple[int, str] = (-1, "")


def _stamp(now: float) -> str:
    """`date time` in UTC (W3C), formatted once per second."""
    global _last_second
    second = int(now)
    if _last_second[0] != second:
        _last_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S"))
    return _last_second[1]


def line(
    now: float,
    *,
    client_ip: str,
    username: str,
    computer: str,
    server_ip: str,
    server_port: int | str,
    method: str,
    query: str,
    status: int | str,
    sc_bytes: int,
    cs_bytes: int,
    taken_ms: int,
    queue_id: str,
) -> str:
    """One log line (with its newline), every field escaped."""
    return (
        f"{_stamp(now)} {field(client_ip)} {field(username)} {field(computer)} {field(server_ip)} "
        f"{field(str(server_port))} {field(method)} {field(query)} {status or 0} {sc_bytes} {cs_bytes} "
        f"{taken_ms} {field(queue_id)}\n"
    )


@dataclass(frozen=True, slots=True)
class ProtocolLogSettings:
    """What `[protocol_log]` says, resolved: the folder, the size at which a file is rotated, how many
    rotated files are kept."""

    directory: Path
    max_size: int
    max_files: int


class ProtocolLog:
    """The writer of one process; `rotate` in the main process only (see the module's docstring)."""

    def __init__(self, settings: ProtocolLogSettings, *, rotate: bool, computer: str) -> None:
        self.settings = settings
        self.computer = computer
        self._rotate = rotate
        self._path = settings.directory / ACTIVE_NAME
        self._lines: list[str] = []
        self._buffered = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ino = -1
        self.lost = 0  # lines the disk did not take (full, I/O error): counted, never retried
        settings.directory.mkdir(parents=True, exist_ok=True)
        with self._lock:  # the file, with its header, from the start (its #Date: is the service's start)
            self._current_fd()

    # -- writing -------------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        """Buffer one line (from `line`); written at the next flush."""
        self._lines.append(text)
        self._buffered += len(text)
        if self._buffered >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if not self._lines:
                if self._rotate:  # the workers' lines make the file grow too: rotate it for them
                    self._rotate_if_full(0)
                return
            lines, self._lines, self._buffered = self._lines, [], 0
            try:
                for batch in self._batches(lines) if self._rotate else [lines]:
                    data = "".join(batch).encode("utf-8", "backslashreplace")
                    if self._rotate:
                        self._rotate_if_full(len(data))
                    self._append(data)
            except OSError:  # a full disk, an I/O error: the lines are dropped (counted), mail flows on
                self.lost += len(lines)

    def _batches(self, lines: list[str]) -> list[list[str]]:
        """The lines cut where the file reaches max_size (the main process rotates between the batches),
        so a busy second does not make one file much larger than max_size."""
        try:
            size = os.stat(self._path).st_size
        except OSError:
            size = 0
        batches: list[list[str]] = [[]]
        floor = len(header(0))
        for text in lines:
            length = len(text)  # characters: bytes for the ASCII the lines nearly always are
            if size + length > self.settings.max_size and size > floor and batches[-1]:
                batches.append([])
                size = floor
            batches[-1].append(text)
            size += length
        return batches

    def _append(self, data: bytes) -> None:
        fd = self._current_fd()
        view = memoryview(data)
        written = 0
        while written < len(data):
            written += os.write(fd, view[written:])

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None

    def _current_fd(self) -> int:
        """The descriptor of the file now at the path: reopened when another process has rotated it."""
        try:
            ino = os.stat(self._path).st_ino
        except FileNotFoundError:
            ino = self._create()
        if self._fd is None or ino != self._ino:
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            self._ino = os.fstat(self._fd).st_ino
        return self._fd

    def _create(self) -> int:
        """A new active file with its header: written aside, then linked into place, so that the header is
        its first line whoever appends at the same moment (another process may win: then its file is used)."""
        aside = self._path.with_name(f".{ACTIVE_NAME}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, header(time.time()).encode("ascii"))
        finally:
            os.close(fd)
        try:
            os.link(aside, self._path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(aside)
        return os.stat(self._path).st_ino

    def _rotate_if_full(self, adding: int) -> None:
        try:
            size = os.stat(self._path).st_size
        except OSError:  # none yet (the next write makes it), or the folder is gone: nothing to rotate
            return
        if size <= len(header(0)) or size + adding <= self.settings.max_size:
            return
        rotated = self._path.with_name(
            ROTATED_PREFIX + datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f") + ".log"
        )
        try:
            os.rename(self._path, rotated)
        except OSError:
            return
        with contextlib.suppress(OSError):  # else the next write makes it
            self._create()
        self._trim()

    def _trim(self) -> None:
        """Remove the oldest rotated files beyond max_files (their names sort by time)."""
        old = sorted(p for p in rotated_files(self.settings.directory))
        for path in old[: max(0, len(old) - self.settings.max_files)]:
            with contextlib.suppress(OSError):
                path.unlink()


def rotated_files(directory: Path) -> list[Path]:
    try:
        return [
            p
            for p in directory.iterdir()
            if p.name.startswith(ROTATED_PREFIX) and p.name.endswith(".log") and p.is_file()
        ]
    except OSError:
        return []


def log_files(directory: Path) -> list[Path]:
    """Every protocol log file in `directory`, oldest first (the active one last)."""
    files = sorted(rotated_files(directory))
    active = directory / ACTIVE_NAME
    if active.is_file():
        files.append(active)
    return files


@dataclass(frozen=True, slots=True)
class LogLine:
    """One parsed line: the W3C fields by name, as written (escaped: `raw`) and as text (`get`)."""

    fields: dict[str, str]

    def get(self, name: str) -> str:
        return unfield(self.fields.get(name, "-"))

    def raw(self, name: str) -> str:
        """The value as written: `+` for a space, `-` for empty (a `+` in an address survives here)."""
        return self.fields.get(name, "-")

    @property
    def when(self) -> str:
        """`date time`, as written (UTC)."""
        return f"{self.get('date')} {self.get('time')}".strip()

    @property
    def outbound(self) -> bool:
        return self.get("cs-username") in (OUTBOUND_COMMAND, OUTBOUND_RESPONSE)


def parse_lines(text: Iterator[str] | list[str]) -> list[LogLine]:
    """The lines of a W3C log, read by the `#Fields:` directive in force (a file may hold several)."""
    names: tuple[str, ...] = FIELDS
    out: list[LogLine] = []
    for raw in text:
        raw = raw.rstrip("\r\n")
        if not raw:
            continue
        if raw.startswith("#"):
            if raw.startswith("#Fields:"):
                names = tuple(raw[len("#Fields:") :].split())
            continue
        values = raw.split(" ")
        if len(values) != len(names):
            continue  # a line cut by a crash or a full disk
        out.append(LogLine(dict(zip(names, values, strict=True))))
    return out


def read_log(directory: Path) -> list[LogLine]:
    """Every line of every protocol log file in `directory`, oldest file first."""
    out: list[LogLine] = []
    for path in log_files(directory):
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                out.extend(parse_lines(iter(fh)))
        except OSError:
            continue
    return out


def logged_command(event: object) -> tuple[str, str, int]:
    """An inbound protocol event as the log shows it: (cs-method, cs-uri-query, cs-bytes). The bytes are
    those of the command line as the client sent it (verb, argument, CRLF); AUTH's secrets are `***`."""
    match event:
        case Ehlo(name=name):
            return _cmd("EHLO", name)
        case Helo(name=name):
            return _cmd("HELO", name)
        case Mail(address=address, params=params):
            return _cmd("MAIL", f"FROM:<{address}>{_params(params)}")
        case Rcpt(address=address, params=params):
            return _cmd("RCPT", f"TO:<{address}>{_params(params)}")
        case Data() | DataEnd():
            return "DATA", "", 6
        case Bdat(size=size) | Xexch50(size=size):
            return _cmd("BDAT" if isinstance(event, Bdat) else "XEXCH50", str(size))
        case BdatEnd(last=last):
            return "BDAT", "LAST" if last else "", 0
        case Auth(mechanism=mechanism, initial=initial):
            method, query, size = _cmd("AUTH", mechanism if initial is None else f"{mechanism} {initial}")
            return method, redact("AUTH", query), size
        case AuthResponse(data=data):
            return "AUTH", SECRET, len(data) + 2
        case Help(arg=arg) | Vrfy(arg=arg) | Expn(arg=arg) | Etrn(arg=arg) | XLink2State(arg=arg):
            return _cmd(_VERBS[type(event)], arg)
        case Xexch50Blob(data=data):
            return "XEXCH50", "", len(data)
        case Rejected(verb=verb):
            return verb.upper() or "-", "", 0
    return _cmd(_VERBS.get(type(event), type(event).__name__.upper()), "")


def _cmd(verb: str, arg: str) -> tuple[str, str, int]:
    return verb, arg, len(verb) + (len(arg) + 1 if arg else 0) + 2


def _params(params: dict[str, str | None]) -> str:
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())


_VERBS: dict[type, str] = {
    Rset: "RSET",
    Noop: "NOOP",
    Quit: "QUIT",
    StartTls: "STARTTLS",
    Help: "HELP",
    Vrfy: "VRFY",
    Expn: "EXPN",
    Etrn: "ETRN",
    XLink2State: "X-LINK2STATE",
}
