#!/usr/bin/env python3
"""Accept throughput of smtpsvc: messages per second acknowledged with ``250`` after DATA.

Runs ``python -m smtpsvc serve`` on a temporary mailroot (listening on 127.0.0.1, port chosen by the kernel)
and drives it with N concurrent SMTP sessions from an asyncio load generator that speaks SMTP over raw
streams (MAIL+RCPT+DATA pipelined in one write, then the body). Reports msgs/s, the end-of-DATA → 250
latency and the server's CPU time per message. A benchmark, not a test: it asserts nothing about speed.

Sequence: a conditioning pass ages the new mailroot (not counted); then for each session count a new
service process on the same mailroot, with the earlier mail parked elsewhere, a short warm-up, and --runs
measured runs, each followed by a wait until delivery has caught up and the server is idle.

    .venv/bin/python bench/accept.py [--sessions 1,10,50] [--messages 2000] [--size 1024] [--runs 3]
                                     [--max-seconds 60] [--no-delivery] [--condition N] [--no-uvloop]
                                     [--keep]

See bench/README.md for what the numbers include and how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO, TypeVar

import common

HOSTNAME = "bench.test"
LOCAL_DOMAIN = "local.test"
REMOTE_DOMAIN = "remote.test"
CLOSED_PORT = 9  # --no-delivery smart host: nothing listens here, so each attempt is one refused connect
SENDER = "sender@client.test"

STARTUP_TIMEOUT = 30.0  # wait for event 9002 "listening on ..."
STOP_TIMEOUT = 30.0  # SIGTERM → exit, else SIGKILL
CONNECT_TIMEOUT = 10.0  # connect + banner + EHLO of all sessions of a run
REPLY_GRACE = 15.0  # after --max-seconds, how long an in-flight message may still wait for its reply
QUIT_TIMEOUT = 5.0
SETTLE_TIMEOUT = 60.0  # between runs: wait for delivery to catch up and the server to go idle
SETTLE_POLL = 0.25
IDLE_WINDOW = 0.5  # the server is idle when it used at most IDLE_TICKS clock ticks in this window
IDLE_TICKS = 2
# Before the first run of each configuration: max(2 per session, min(200, --messages)) un-measured messages.
WARMUP_PER_SESSION = 2
WARMUP_MESSAGES = 200
CONDITION_SESSIONS = 10  # the conditioning pass (--condition) that ages a new mailroot before measuring
FAILURE_SAMPLES = 5  # distinct failure reasons printed per configuration
READ_LIMIT = 64 * 1024

MESSAGE_NUMBERS = itertools.count(1)  # Message-ID numbers, unique over the whole benchmark
LISTENING_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on (the service did not start, a port is in use, ...)."""


class Stop(BaseException):
    """SIGTERM/SIGHUP to the benchmark: unwind like Ctrl-C so every child is stopped."""


# --------------------------------------------------------------------------------------------- the service


def config_text(root: Path, no_delivery: bool) -> str:
    lines = [
        "[server]",
        f"hostname = {json.dumps(HOSTNAME)}",
        f"root = {json.dumps(str(root))}",
        'listen = ["127.0.0.1:0"]',
        "max_connections = 2000",
        'max_message_size = "64MB"',
        "",
        "[domains]",
        f"local = [{json.dumps(LOCAL_DOMAIN)}]",
        "",
        "[delivery]",
        'retry = ["15m"]',
    ]
    if no_delivery:
        lines.append(f'smart_host = "[127.0.0.1]:{CLOSED_PORT}"')
    lines += ["", "[admin]", 'listen = ""  # no admin HTTP API: it would bind 127.0.0.1:8025']
    return "\n".join(lines) + "\n"


def proc_cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process, all its threads, in clock ticks, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), counted from "state" = 3


def server_ticks(pid: int | None) -> tuple[int, int]:
    return proc_cpu_ticks(pid) if pid is not None else (0, 0)


def count_drop_files(drop: Path) -> int:
    try:
        with os.scandir(drop) as entries:
            return sum(1 for e in entries if e.name.endswith(".eml") and not e.name.startswith("."))
    except FileNotFoundError:
        return 0


class Service:
    """One `smtpsvc serve` child on its own mailroot; always stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, workdir: Path, name: str, no_delivery: bool) -> None:
        self.workdir = workdir
        self.root = workdir / "mailroot"  # shared by every Service of one benchmark (see clear_mail)
        self.config = workdir / "smtpsvc.toml"
        self.name = name
        self.stderr_path = workdir / f"serve-{name}.stderr"
        self.events_path = self.root / "log" / "events.jsonl"
        self.drop = self.root / "drop"
        self.queue = self.root / "queue"
        self.no_delivery = no_delivery
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._stderr: TextIO | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.config.write_text(config_text(self.root, self.no_delivery), encoding="utf-8")
        # SMTPSVC__SECTION__KEY variables would override the benchmark's configuration: drop them.
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMTPSVC__")}
        self._stderr = open(self.stderr_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        # Only events written after this start count (a reused mailroot holds an older 9002 line).
        start_offset = self.events_path.stat().st_size if self.events_path.exists() else 0
        # Own session: Ctrl-C reaches only the benchmark, which then stops the service itself, by PID.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpsvc", "serve", "-c", str(self.config)],
            cwd=self.workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            start_new_session=True,
        )
        self.port = self._wait_listening(start_offset)

    def _wait_listening(self, offset: int) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(
                    f"smtpsvc exited with {self.proc.returncode} at start:\n{self.stderr_tail()}"
                )
            with contextlib.suppress(FileNotFoundError):
                with open(self.events_path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.splitlines():
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict) and record.get("id") == 9002:
                            match = LISTENING_RE.search(str(record.get("text", "")))
                            if match:
                                return int(match.group(1))
            time.sleep(0.05)
        raise BenchError(f"no 'listening on 127.0.0.1:<port>' event within {STARTUP_TIMEOUT:g}s")

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.stderr_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no stderr)"
        return "\n".join(text.splitlines()[-lines:])

    def cpu_ticks(self) -> int:
        return sum(proc_cpu_ticks(self.pid))

    def settle(self, accepted: int) -> float:
        """Wait (bounded) until the server is idle and, with local delivery, `accepted` Drop files exist.

        Returns the seconds waited. Between runs only, so a run does not pay for the previous run's backlog.
        """
        start = time.monotonic()
        deadline = start + SETTLE_TIMEOUT
        samples: list[tuple[float, int]] = []
        while time.monotonic() < deadline:
            now, ticks = time.monotonic(), self.cpu_ticks()
            samples.append((now, ticks))
            delivered = self.no_delivery or count_drop_files(self.drop) >= accepted
            older = [tick for when, tick in samples if when <= now - IDLE_WINDOW]
            idle = bool(older) and ticks - older[-1] <= IDLE_TICKS
            if delivered and idle:
                return now - start
            time.sleep(SETTLE_POLL)
        print(f"  warning: the server did not settle within {SETTLE_TIMEOUT:g}s", file=sys.stderr)
        return time.monotonic() - start

    def park_mail(self) -> int:
        """After stop(): move this service's mail out of drop/ and queue/ (with --no-delivery every message
        stays queued) to <tmp>/parked/<name>/, so the next service starts on an empty queue and Drop folder.

        Moved, not deleted: unlinking thousands of files on this machine's ext4 (mounted with `discard`)
        made the next ~6000 messages 10-20% slower (measured, see README); a rename frees no blocks.
        """
        assert self.proc is not None and self.proc.poll() is not None, "park_mail() runs after stop()"
        parked = self.workdir / "parked" / self.name
        moved = 0
        for folder, suffixes in ((self.drop, (".eml",)), (self.queue, (".env", ".eml"))):
            with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file() and entry.name.endswith(suffixes) and not entry.name.startswith("."):
                        target = parked / folder.name
                        target.mkdir(parents=True, exist_ok=True)
                        os.rename(entry.path, target / entry.name)
                        moved += 1
        return moved

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                print(
                    f"  smtpsvc (pid {proc.pid}) ignored SIGTERM for {STOP_TIMEOUT:g}s: SIGKILL",
                    file=sys.stderr,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# --------------------------------------------------------------------------------------------- the load


class ReplyError(Exception):
    def __init__(self, stage: str, code: int, text: str) -> None:
        super().__init__(f"{stage}: {code} {text}".strip())
        self.code = code


@dataclass(slots=True)
class RunStats:
    target: int = 0  # messages the run was asked to send
    accepted: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)  # end of DATA -> 250
    transactions_ms: list[float] = field(default_factory=list)  # MAIL FROM written -> 250 after DATA
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    server_cpu: float = 0.0  # seconds, user + system
    server_sys: float = 0.0  # seconds of it in the kernel (syscalls: socket I/O, writes, fsyncs, renames)
    client_cpu: float = 0.0  # seconds
    backlog: int | None = None  # accepted but not yet in drop/ when the run ended
    settle: float = 0.0

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def server_load(self) -> float:
        """Server CPU time over wall time, in % of one core (100 = one core busy all the run)."""
        return 100.0 * self.server_cpu / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(slots=True)
class Shared:
    remaining: int
    soft_deadline: float  # loop time: no new message after this
    stats: RunStats


class Message:
    """The bytes one transaction sends: a pipelined MAIL/RCPT/DATA and a body of exactly `size` bytes."""

    def __init__(self, size: int, recipient: str) -> None:
        self.envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{recipient}>\r\nDATA\r\n".encode()
        self.mail = f"MAIL FROM:<{SENDER}>\r\n".encode()
        self.rcpt = f"RCPT TO:<{recipient}>\r\n".encode()
        head = (
            f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: smtpsvc accept benchmark\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
        ).encode()
        self.id_prefix, self.id_suffix = b"Message-ID: <", b"@bench.test>\r\n"
        fixed = len(head) + len(self.id_prefix) + 12 + len(self.id_suffix) + 2  # 12-digit number, blank line
        if size < fixed + 2:
            raise BenchError(f"--size must be at least {fixed + 2} bytes (the header block and one line)")
        self.rest = head + b"\r\n" + filler(size - fixed)
        self.size = size

    def body(self, number: int) -> bytes:
        return b"%s%012d%s%s" % (self.id_prefix, number, self.id_suffix, self.rest)


def filler(n: int) -> bytes:
    """`n` bytes of CRLF-terminated 76-character lines (no line starts with '.')."""
    line = (b"abcdefghijklmnopqrstuvwxyz0123456789" * 3)[:76] + b"\r\n"
    whole, part = divmod(n, len(line))
    out = line * whole
    if part == 1:  # a lone byte cannot end in CRLF: widen the previous line instead (n >= 2 here)
        out = out[:-2] + b"x\r\n"
    elif part:
        out += b"y" * (part - 2) + b"\r\n"
    return out


class Client:
    """One SMTP session over asyncio streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.pipelining = False
        self.alive = True

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=READ_LIMIT)
        client = cls(reader, writer)
        await client.expect("banner", 220)
        writer.write(b"EHLO client.test\r\n")
        lines = await client.expect("EHLO", 250)
        client.pipelining = any(line[4:].strip().upper() == b"PIPELINING" for line in lines)
        return client

    async def reply(self) -> tuple[int, list[bytes]]:
        lines: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                raise ConnectionError("connection closed by the server")
            lines.append(line)
            if line[3:4] != b"-":
                break
        try:
            return int(lines[-1][:3]), lines
        except ValueError:
            raise ConnectionError(f"malformed reply {lines[-1]!r}") from None

    async def expect(self, stage: str, code: int) -> list[bytes]:
        got, lines = await self.reply()
        if got != code:
            raise ReplyError(stage, got, lines[-1][4:].decode("ascii", "replace").strip())
        return lines

    async def send(self, msg: Message, number: int, stats: RunStats) -> None:
        """One transaction. Counts it accepted only on a 250 after the final dot; else failed."""
        began = time.perf_counter()
        if self.pipelining:
            self.writer.write(msg.envelope)
            codes = [(await self.reply())[0] for _ in range(3)]
        else:
            codes = []
            for command, ok in ((msg.mail, 250), (msg.rcpt, 250), (b"DATA\r\n", 354)):
                self.writer.write(command)
                codes.append((await self.reply())[0])
                if codes[-1] != ok:
                    break
        if codes != [250, 250, 354]:
            stats.failed += 1
            stats.errors[f"MAIL/RCPT/DATA replied {'/'.join(map(str, codes))}"] += 1
            if 421 in codes:
                raise ReplyError("transaction", 421, "service closing")
            if codes[-1:] == [354]:  # cannot happen with a sane server; abort the message cleanly
                self.writer.write(b".\r\n")
                await self.reply()
            self.writer.write(b"RSET\r\n")
            await self.expect("RSET", 250)
            return
        self.writer.write(msg.body(number))
        await self.writer.drain()
        sent = time.perf_counter()
        self.writer.write(b".\r\n")
        code, lines = await self.reply()
        if code == 250:
            done = time.perf_counter()
            stats.latencies_ms.append((done - sent) * 1000.0)
            stats.transactions_ms.append((done - began) * 1000.0)
            stats.accepted += 1
            return
        stats.failed += 1
        stats.errors[f"end of DATA: {lines[-1].decode('ascii', 'replace').strip()}"] += 1
        if code == 421:
            raise ReplyError("end of DATA", code, "service closing")

    async def quit(self) -> None:
        if self.alive:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(QUIT_TIMEOUT):
                    self.writer.write(b"QUIT\r\n")
                    await self.reply()
        await self.close()

    async def close(self) -> None:
        self.alive = False
        with contextlib.suppress(Exception):
            self.writer.close()
            async with asyncio.timeout(QUIT_TIMEOUT):
                await self.writer.wait_closed()


async def session_loop(client: Client, msg: Message, shared: Shared, hard_deadline: float) -> None:
    loop = asyncio.get_running_loop()
    stats = shared.stats
    in_flight = False
    try:
        async with asyncio.timeout_at(hard_deadline):
            while shared.remaining > 0 and loop.time() < shared.soft_deadline:
                shared.remaining -= 1
                in_flight = True
                await client.send(msg, next(MESSAGE_NUMBERS), stats)
                in_flight = False
    except Exception as exc:
        # the message that was on the wire is lost for this run (a timeout, a 421, a closed connection)
        if in_flight and not isinstance(exc, ReplyError):
            stats.failed += 1
        kind = "no reply before the deadline" if isinstance(exc, TimeoutError) else f"{exc}"
        stats.errors[f"session ended: {type(exc).__name__}: {kind}"] += 1
        await client.close()


async def run_load(
    port: int,
    sessions: int,
    messages: int,
    max_seconds: float,
    msg: Message,
    pid: int | None,
    drop: Path | None,
) -> RunStats:
    """Connect `sessions` clients, then send `messages` in all (or stop after `max_seconds`), then QUIT.

    `pid`: the server process whose CPU time to measure; None measures none (bench/compare.py uses this
    client against Postfix too, whose work is spread over several processes).
    """
    loop = asyncio.get_running_loop()
    stats = RunStats(target=messages)
    clients: list[Client] = []
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            results = await asyncio.gather(
                *(Client.connect(port) for _ in range(sessions)), return_exceptions=True
            )
    except TimeoutError:
        raise BenchError(
            f"{sessions} sessions could not connect and EHLO within {CONNECT_TIMEOUT:g}s"
        ) from None
    for result in results:
        if isinstance(result, Client):
            clients.append(result)
        else:
            stats.errors[f"connect: {type(result).__name__}: {result}"] += 1
    if not clients:
        reasons = "; ".join(f"{n} x {why}" for why, n in stats.errors.most_common(FAILURE_SAMPLES))
        raise BenchError(f"no session could connect to 127.0.0.1:{port}: {reasons}")
    try:
        drop_before = count_drop_files(drop) if drop is not None else 0
        (user0, sys0), client0, t0 = server_ticks(pid), time.process_time(), time.perf_counter()
        soft = loop.time() + max_seconds
        shared = Shared(remaining=messages, soft_deadline=soft, stats=stats)
        await asyncio.gather(*(session_loop(c, msg, shared, soft + REPLY_GRACE) for c in clients))
        stats.elapsed = time.perf_counter() - t0
        stats.client_cpu = time.process_time() - client0
        user1, sys1 = server_ticks(pid)
        stats.server_cpu = (user1 + sys1 - user0 - sys0) / CLK_TCK
        stats.server_sys = (sys1 - sys0) / CLK_TCK
        if drop is not None:
            stats.backlog = stats.accepted - (count_drop_files(drop) - drop_before)
    finally:
        await asyncio.gather(*(c.quit() for c in clients), return_exceptions=True)
    return stats


# --------------------------------------------------------------------------------------------- reporting


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def fmt_ms(value: float) -> str:
    return "-" if value != value else f"{value:.2f}"  # NaN: no latency sample


@dataclass(slots=True)
class ConfigResult:
    sessions: int
    runs: list[RunStats]

    def row(self) -> list[str]:
        rates = [r.rate for r in self.runs]
        lat = sorted(x for r in self.runs for x in r.latencies_ms)
        accepted = sum(r.accepted for r in self.runs)
        server = sum(r.server_cpu for r in self.runs)
        client = sum(r.client_cpu for r in self.runs)

        def per(seconds: float) -> str:
            return f"{seconds * 1000 / accepted:.2f}" if accepted else "-"

        return [
            str(self.sessions),
            str(len(self.runs)),
            f"{statistics.median(rates):.0f}",
            f"{min(rates):.0f}-{max(rates):.0f}",
            fmt_ms(percentile(lat, 50)),
            fmt_ms(percentile(lat, 99)),
            per(server),
            f"{statistics.median(r.server_load for r in self.runs):.0f}",
            per(client),
            str(sum(r.failed for r in self.runs)),
        ]


HEADERS = [
    "sessions",
    "runs",
    "msgs/s (median)",
    "min-max",
    "p50 ms",
    "p99 ms",
    "server CPU ms/msg",
    "server CPU %",
    "client CPU ms/msg",
    "failed",
]


def table(results: Sequence[ConfigResult]) -> str:
    rows = [HEADERS] + [r.row() for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def run_summary(stats: RunStats) -> str:
    lat = sorted(stats.latencies_ms)
    cpu = "-"
    if stats.accepted:
        per, sys_per = (1000 * x / stats.accepted for x in (stats.server_cpu, stats.server_sys))
        cpu = f"{per:.2f} (sys {sys_per:.2f})"
    backlog = "" if stats.backlog is None else f", {stats.backlog} not yet in Drop at the end"
    unsent = stats.target - stats.accepted - stats.failed
    return (
        f"{stats.accepted} accepted, {stats.failed} failed"
        f"{f', {unsent} not sent (time limit or lost sessions)' if unsent else ''} in {stats.elapsed:.2f}s "
        f"= {stats.rate:.0f} msgs/s; "
        f"p50 {fmt_ms(percentile(lat, 50))} ms, p99 {fmt_ms(percentile(lat, 99))} ms; "
        f"server CPU {cpu} ms/msg ({stats.server_load:.0f}% of a core){backlog}; "
        f"settled in {stats.settle:.1f}s"
    )


def load_average() -> str:
    """The 1/5/15-minute load averages: other work on the machine skews every number here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def filesystem_of(path: Path) -> str:
    """'ext4 on /dev/vda' for the mount holding `path` (longest mount-point prefix in /proc/mounts)."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            mount = parts[1]
            inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[0]):
                best = (mount, parts[2], parts[0])
    return f"{best[1]} on {best[2]} (mounted at {best[0] or '?'})"


def machine_line(use_uvloop: bool, tmp: Path) -> str:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    uv = "off"
    if use_uvloop:
        uv = f"on ({importlib.metadata.version('uvloop')})"
    try:
        from smtpsvc import __version__ as svc_version
    except ImportError:
        svc_version = "?"
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: nproc {affinity}, {model}, Linux {platform.release()}; "
        f"python {platform.python_version()} ({sys.executable}); client uvloop {uv}; "
        f"smtpsvc {svc_version}; mailroot on {filesystem_of(tmp)}"
    )


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Accept throughput of smtpsvc (messages/s acknowledged with 250 after DATA)."
    )

    def session_list(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like 1,10,50, got {text!r}") from None
        if not values or any(not 1 <= v <= 1000 for v in values):
            raise argparse.ArgumentTypeError("session counts must be between 1 and 1000")
        return values

    def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
        def convert(text: str) -> Any:
            value = kind(text)
            if value <= 0:
                raise argparse.ArgumentTypeError(f"must be positive, got {text}")
            return value

        return convert

    def non_negative(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value

    parser.add_argument(
        "--sessions",
        type=session_list,
        default=[1, 10, 50],
        help="comma-separated concurrent session counts (default 1,10,50)",
    )
    parser.add_argument(
        "--messages",
        type=positive(int),
        default=2000,
        help="messages per run, over all sessions (default 2000)",
    )
    parser.add_argument(
        "--size",
        type=positive(int),
        default=1024,
        help="message size in bytes, headers included (default 1024)",
    )
    parser.add_argument("--runs", type=positive(int), default=3, help="runs per session count (default 3)")
    parser.add_argument(
        "--max-seconds",
        type=positive(float),
        default=60.0,
        help="time limit of one run; it ends early with fewer messages (default 60)",
    )
    parser.add_argument(
        "--no-delivery",
        action="store_true",
        help=f"address {REMOTE_DOMAIN} via a closed smart host: messages stay queued "
        "(one refused connect each) instead of being delivered to Drop",
    )
    parser.add_argument(
        "--condition",
        type=non_negative,
        default=6000,
        metavar="N",
        help="before measuring, push N messages (not counted) through the new mailroot so its folders are "
        "no longer brand-new directories; 0 measures a fresh mailroot (default 6000)",
    )
    parser.add_argument("--no-uvloop", action="store_true", help="run the load generator on plain asyncio")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser.parse_args(argv)


def check_closed_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", CLOSED_PORT)) == 0:
            raise BenchError(
                f"--no-delivery needs 127.0.0.1:{CLOSED_PORT} closed, but something listens there"
            )


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
T = TypeVar("T")


def on_signal(signum: int, frame: FrameType | None) -> None:
    """Outside the event loop: SIGTERM/SIGHUP unwind the benchmark like Ctrl-C does."""
    raise Stop(signal.Signals(signum).name)


async def interruptible(work: Coroutine[Any, Any, T]) -> T:
    """Inside the event loop a Python signal handler's exception would be logged and lost (uvloop), so
    SIGTERM/SIGHUP cancel the load instead and surface as Stop; SIGINT is the runner's KeyboardInterrupt."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await work
    except asyncio.CancelledError:
        if received:
            raise Stop(received[0].name) from None
        raise
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, on_signal)


Runner = Callable[[Coroutine[Any, Any, RunStats]], RunStats]


def measure(
    runner: Runner, service: Service, sessions: int, count: int, seconds: float, msg: Message
) -> RunStats:
    """One run on its own event loop (a fresh loop per run: nothing carries over between runs)."""
    drop = None if service.no_delivery else service.drop
    return runner(interruptible(run_load(service.port, sessions, count, seconds, msg, service.pid, drop)))


def require_some(stats: RunStats, service: Service, what: str) -> None:
    if not stats.accepted:
        reasons = "\n".join(f"  {n} x {why}" for why, n in stats.errors.most_common(FAILURE_SAMPLES))
        raise BenchError(
            f"the service accepted none of the {what} messages:\n{reasons}\n"
            f"smtpsvc stderr (last lines):\n{service.stderr_tail()}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("smtpsvc") is None:
        print(
            f"smtpsvc is not importable by {sys.executable}; run this with .venv/bin/python", file=sys.stderr
        )
        return 2
    use_uvloop = not args.no_uvloop and importlib.util.find_spec("uvloop") is not None
    runner: Runner = asyncio.run
    if use_uvloop:
        import uvloop

        runner = uvloop.run
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)

    recipient = f"bench@{REMOTE_DOMAIN if args.no_delivery else LOCAL_DOMAIN}"
    try:
        msg = Message(args.size, recipient)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-bench-"))
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(machine_line(use_uvloop, tmp))
    mode = (
        f"no delivery (to {recipient}, smart host [127.0.0.1]:{CLOSED_PORT} closed: stays queued)"
        if args.no_delivery
        else f"local delivery (to {recipient}: Drop folder, fsynced)"
    )
    print(
        f"load: {args.messages} messages of {msg.size} bytes per run, {args.runs} run(s) per session count, "
        f"max {args.max_seconds:g}s per run; {mode}"
    )
    print(
        f"temp dir: {tmp}{' (kept)' if args.keep else ''}; load average at start {load_average()}", flush=True
    )

    results: list[ConfigResult] = []
    service: Service | None = None
    status = 0
    try:
        if args.no_delivery:
            check_closed_port()
        if args.condition:
            service = Service(tmp, "condition", args.no_delivery)
            service.start()
            print(f"\nconditioning: smtpsvc pid {service.pid} on 127.0.0.1:{service.port}", flush=True)
            stats = measure(runner, service, CONDITION_SESSIONS, args.condition, args.max_seconds, msg)
            stats.settle = service.settle(stats.accepted)
            print(f"  {CONDITION_SESSIONS} sessions (not counted): {run_summary(stats)}", flush=True)
            require_some(stats, service, "conditioning")
            service.stop()
            service.park_mail()
            service = None
        for index, sessions in enumerate(args.sessions):
            name = f"{sessions}-sessions" + (f"-{index + 1}" if args.sessions.count(sessions) > 1 else "")
            service = Service(tmp, name, args.no_delivery)
            service.start()
            print(
                f"\n{sessions} session(s): smtpsvc pid {service.pid} on 127.0.0.1:{service.port}", flush=True
            )
            warm = max(WARMUP_PER_SESSION * sessions, min(WARMUP_MESSAGES, args.messages))
            warmup = measure(runner, service, sessions, warm, args.max_seconds, msg)
            delivered = warmup.accepted
            service.settle(delivered)
            print(f"  warm-up: {warmup.accepted} accepted, {warmup.failed} failed (not counted)", flush=True)
            require_some(warmup, service, "warm-up")
            runs: list[RunStats] = []
            for number in range(1, args.runs + 1):
                stats = measure(runner, service, sessions, args.messages, args.max_seconds, msg)
                delivered += stats.accepted
                stats.settle = service.settle(delivered)
                runs.append(stats)
                print(f"  run {number}: {run_summary(stats)}", flush=True)
            results.append(ConfigResult(sessions, runs))
            errors = sum((r.errors for r in runs), Counter[str]())
            for reason, count in errors.most_common(FAILURE_SAMPLES):
                print(f"  failure x{count}: {reason}")
            service.stop()
            service.park_mail()
            service = None
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, Stop) as exc:
        print(f"\ninterrupted ({type(exc).__name__} {exc}); stopping", file=sys.stderr)
        status = 130
    finally:
        with common.shielded():  # a second Ctrl-C must not skip the cleanup
            if service is not None:
                service.stop()
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)

    if results:
        print(f"\nload average at the end {load_average()}")
        print(table(results))
        if any(r.failed or r.errors for c in results for r in c.runs):
            status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
