#!/usr/bin/env python3
"""A large deferred queue: restart, memory, the retry wave and the drain, smtpsvc beside a private Postfix.

For each size N in --sizes (default 100 000 and 1 000 000; --quick: 100 000), 1 KiB messages for one smart
host that is down:

**smtpsvc**

1. **Fill.** A fresh temp mailroot and config (SMTP and the admin API on free loopback ports, smart host =
   a loopback port where nothing listens; the service's defaults otherwise). N messages are written straight
   into the spool, in the format of ``queue/local.py``: ``queue/<id>.eml`` (1024 bytes with a ``Received``
   header, CRLF) and ``queue/<id>.env`` (``Envelope.to_json()``: the ``size``, ``crc32`` and ``spool`` fields
   set, the recipient routed to the smart host's link, ``attempts = 1``, a refused connection as its last
   reply and history, ``next_attempt`` one hour ahead), ids from ``model.new_queue_id``, ``queue/spool.id``.
   No fsync per file, one ``sync`` at the end; --fill-procs processes (default: the cores) write in parallel.
2. **Check.** ``smtpsvc queue summary --json`` on the stopped service (the CLI opens the spool, with its
   recovery): the smart host link must hold N messages, and nothing may be in ``queue/corrupt/``.
3. **Restart.** ``smtpsvc serve`` is exec'd; its SMTP port is polled every 10 ms: the time to the first
   accepted TCP connection and to the first ``220``; then to the first ``/healthz`` answer. RSS (VmRSS) once
   the process is idle, and its peak (VmHWM) so far; one ``GET /api/queue/summary`` and one ``GET
   /metrics`` timed with the full queue.
4. **Retry wave and drain** (not with --no-drain). ``smtp-sink`` starts on the smart host's port;
   ``smtpsvc queue retry --all`` runs as an operator runs it (the CLI, through the running service's admin
   API), timed, with its exit status and output. From that moment until the sink has counted N messages,
   every 100 ms: ``GET /healthz`` and a new SMTP session to its ``220`` (``QUIT`` then); every
   --summary-interval seconds (30 s: it reads the whole queue on the event loop, so frequent polls would
   slow the drain they measure): ``GET /api/queue/summary``; the RSS. The p99 of
   ``smtpsvc_event_loop_lag_seconds`` over the wave comes from the difference of the histogram's buckets
   between the scrape of step 3 and one after the drain (interpolated within the bucket, as PromQL's
   ``histogram_quantile`` does). Events written to ``log/events.jsonl`` over the wave are counted, by id.
   Drain msgs/s = N / (start of ``queue retry --all`` -> the sink counted N), and from the first message at
   the sink on; the queue must then be empty too.

**Postfix** (root; skipped above --postfix-max, or with --no-postfix): a private instance (compare.py's),
relayhost = a loopback port where nothing listens, ``minimal_backoff_time = 3600s`` (deferred mail waits an
hour, as smtpsvc's does). N messages through ``smtp-source -d -s 20 -l 1024`` (slow: about 1000/s, progress
printed), then until all N wait in the deferred queue; ``postfix stop``/``postfix start``: the time to the
first ``220``. ``smtp-sink`` on the relay port, ``postqueue -f``, and the drain until the sink has counted N,
with the RSS of ``qmgr`` (and of all the instance's processes together) and the ``220`` latency sampled every
100 ms.

One table per N, with the targets of issue 13 beside the measures (first ``220`` <= 2 s and RSS <= 400 MB
with 1 000 000 queued; event-loop lag p99 <= 100 ms and admin API p99 <= 200 ms during the wave; drain rate
>= 1.0 x Postfix's). Disk space and inodes are checked first (about 12 KiB and 2.5 inodes per message, for
the larger of the two sides: they run one after the other and each removes its temp dir).

Everything on 127.0.0.1; every wait is bounded (the drain by max(1800 s, N / 100 s)); every process started
here is stopped by PID, also on an error, Ctrl-C, SIGTERM or SIGHUP, and the temp dirs are removed
(--keep keeps them).

    .venv/bin/python bench/queue_scale.py [--sizes 100000,1000000 | --quick] [--no-postfix] [--no-drain]
                                          [--postfix-max N] [--no-write | --markdown FILE] [--keep]

Appends the tables to bench/results/<YYYY-MM-DD>.md (or writes them to FILE: bench/suite.py, step
``scale``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import common
import compare
from compare import BenchError
from smtpsvc.config import load_config
from smtpsvc.model import Attempt, Envelope, Recipient, Source, new_queue_id, rfc5322_date
from smtpsvc.routing.categorizer import route_for

SIZES = (100_000, 1_000_000)
QUICK_SIZES = (100_000,)
MESSAGE_SIZE = 1024
SENDER = "bench@bench.test"
RECIPIENT = "x@remote.test"
DEFERRED_FOR = 3600.0  # next_attempt = now + this: nothing is due until the operator's retry
REFUSED = "The remote server did not respond to a connection attempt."  # what a refused connect records

POLL = 0.01  # the SMTP port during the restart
SAMPLE = 0.1  # /healthz, 220 and RSS during the drain
SUMMARY_EVERY = 30.0  # /api/queue/summary during the drain (--summary-interval): it costs O(queue)
PROGRESS_EVERY = 10.0
HTTP_TIMEOUT = 30.0  # one admin API request (as the CLI's own)
GREETING_TIMEOUT = 30.0  # one SMTP greeting during the drain
STOP_TIMEOUT = 60.0
SETTLE_TIMEOUT = 30.0  # after the start: wait until the process is idle before reading its RSS
PFX_SESSIONS = 20  # smtp-source -s for the Postfix fill

# issue 13's targets
TARGET_220 = 2.0
TARGET_RSS = 400 * 1000 * 1000
TARGET_AT = 1_000_000  # the start and memory targets are stated for this many queued messages
TARGET_LAG_P99 = 0.1
TARGET_ADMIN_P99 = 0.2
TARGET_RATIO = 1.0

# disk: per message (the larger side), then a margin
BYTES_PER_MESSAGE = 12 * 1024
INODES_PER_MESSAGE = 2.5
DISK_MARGIN = 2 * common.GIB
INODE_MARGIN = 10_000

EVENT_ID_RE = re.compile(rb'"id":(\d+)')


class Interrupted(Exception):
    pass


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ----------------------------------------------------------------------------------------------- helpers


def clean_env() -> dict[str, str]:
    """The environment for smtpsvc processes: SMTPSVC__SECTION__KEY variables would override the config."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("SMTPSVC__")}


def port_is_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def greeting(port: int, timeout: float) -> float:
    """One SMTP session to its 220 (then QUIT, not waiting for the 221); the seconds it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        read_greeting(sock)
        with contextlib.suppress(OSError):
            sock.sendall(b"QUIT\r\n")
    return time.monotonic() - start


def read_greeting(sock: socket.socket) -> None:
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("closed before the greeting")
        buf += chunk
        for line in buf.split(b"\n")[:-1]:
            if line.startswith(b"220 "):
                return
            if not line.startswith(b"220-"):
                raise OSError(f"greeting {line[:80]!r}")


def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def timed(request: Callable[[], bytes]) -> tuple[bytes | None, str]:
    """One admin API request: its body (None when it failed) and how long it took, as text."""
    began = time.monotonic()
    try:
        body = request()
    except (OSError, ValueError, urllib.error.URLError) as exc:
        return None, f"failed after {fmt_s(time.monotonic() - began)} ({exc})"
    return body, fmt_s(time.monotonic() - began)


def vm_status(pid: int) -> dict[str, int]:
    try:
        return common.proc_status(pid)
    except (OSError, ValueError):
        return {}


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int(compare.proc_stat(int(entry))[1]) == pid:
                    out.append(int(entry))
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}" if seconds < 10 else f"{seconds * 1000:.0f}"


def fmt_mib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / 1024:.0f} MiB"


def fmt_count(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


@dataclass
class Latencies:
    """Samples of one probe (seconds); a failure counts with the time it took to fail."""

    values: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    def text(self) -> str:
        if not self.values:
            return "-"
        failed = sum(self.failures.values())
        out = (
            f"p50 {fmt_ms(percentile(self.values, 50))} ms, p99 {fmt_ms(percentile(self.values, 99))} ms, "
            f"max {fmt_ms(max(self.values))} ms ({len(self.values)} samples"
        )
        if failed:
            why = "; ".join(f"{n} x {reason}" for reason, n in self.failures.most_common(2))
            out += f", {failed} failed: {why}"
        return out + ")"

    def p99(self) -> float | None:
        return percentile(self.values, 99) if self.values else None


class Prober(threading.Thread):
    """Calls `probe` every `interval` seconds (the next call waits for the previous one: never more than
    one in flight) until stopped; records each call's latency."""

    def __init__(self, name: str, probe: Callable[[], object], interval: float) -> None:
        super().__init__(name=name, daemon=True)
        self.probe = probe
        self.interval = interval
        self.samples = Latencies()
        self.last: object = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            start = time.monotonic()
            try:
                self.last = self.probe()
            except (OSError, ValueError, urllib.error.URLError) as exc:
                self.samples.failures[
                    type(exc).__name__ + (": timed out" if "timed out" in str(exc) else "")
                ] += 1
            elapsed = time.monotonic() - start
            self.samples.values.append(elapsed)
            self._halt.wait(max(0.0, self.interval - elapsed))

    def stop(self) -> None:
        self._halt.set()
        self.join(HTTP_TIMEOUT + 5)


def rss_of(pid: int) -> int:
    return vm_status(pid).get("VmRSS", 0)


def pss_of(pid: int) -> int:
    """The proportional set size (KiB): pages shared by several processes are split among them, so a sum
    over processes counts the shared libraries once (a sum of VmRSS would count them in every process)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RssSampler(threading.Thread):
    """The memory of `pids()` (VmRSS, or with `measure=pss_of` the PSS) summed, every SAMPLE seconds: the
    largest sum seen."""

    def __init__(self, pids: Callable[[], list[int]], measure: Callable[[int], int] = rss_of) -> None:
        super().__init__(name="rss", daemon=True)
        self.pids = pids
        self.measure = measure
        self.peak_kib = 0
        self.last_kib = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.last_kib = sum(self.measure(pid) for pid in self.pids())
                self.peak_kib = max(self.peak_kib, self.last_kib)
            self._halt.wait(SAMPLE)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


class FixedPortSink(compare.Sink):
    """compare.py's smtp-sink, on the port the relay was configured with (no other port if it is taken)."""

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir)
        self.port = port

    def start(self) -> None:
        planned = self.port
        super().start()
        if self.port != planned:
            self.stop()
            raise BenchError(
                f"127.0.0.1:{planned} was taken by another process before smtp-sink could bind it"
            )


class Command(threading.Thread):
    """An operator's command (`smtpsvc queue retry --all`, `postqueue -f`), run while the drain is watched:
    its exit status, output and duration. Killed at `timeout`, or by stop()."""

    def __init__(self, argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> None:
        super().__init__(name="command", daemon=True)
        self.argv = list(argv)
        self.timeout = timeout
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.status = "not finished"
        self.output = ""
        self.seconds: float | None = None

    def run(self) -> None:
        began = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            try:
                out, _ = self.proc.communicate(timeout=self.timeout)
                self.status = f"exit {self.proc.returncode}"
            except subprocess.TimeoutExpired:
                self.stop()
                out, _ = self.proc.communicate()
                self.status = f"killed after {self.timeout:g} s"
            self.output = " ".join(out.split())
        except OSError as exc:
            self.status = f"could not run: {exc}"
        self.seconds = time.monotonic() - began

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def finish(self) -> None:
        """Stop it if it still runs, and wait for the thread (bounded)."""
        self.stop()
        self.join(STOP_TIMEOUT)


def wait_drain(
    sink: compare.Sink,
    sunk0: int,
    n: int,
    wave: float,
    bound: float,
    progress: Callable[[], str],
    check: Callable[[], None],
) -> tuple[float, float]:
    """Until the sink has counted n more than sunk0 (at most until `bound`): (the first message, the n-th),
    in seconds after `wave`. Prints `progress()` every PROGRESS_EVERY seconds; `check()` raises when the
    sender died."""
    first: float | None = None
    next_report = time.monotonic() + PROGRESS_EVERY
    while True:
        reached = sink.wait_for(sunk0 + (1 if first is None else n), min(bound, next_report))
        if reached is not None:
            if first is None:
                first = reached - wave
                continue
            return first, reached - wave
        check()
        if time.monotonic() >= bound:
            raise BenchError(f"the sink counted {sink.count - sunk0} of {n} within the drain's bound")
        print(
            f"    {time.monotonic() - wave:6.0f} s: sink {fmt_count(sink.count - sunk0)}, {progress()}",
            flush=True,
        )
        next_report = time.monotonic() + PROGRESS_EVERY


def drain_bound(n: int) -> float:
    """Seconds the retry wave and the drain may take at most."""
    return max(1800.0, n / 100)


# ------------------------------------------------------------------------------------------------- disk


def check_disk(where: Path, n: int) -> str:
    """Refuses (BenchError) when `where` lacks the space or inodes for n messages; else says what it found."""
    st = os.statvfs(where)
    free, inodes = st.f_bavail * st.f_frsize, st.f_favail
    need, need_inodes = n * BYTES_PER_MESSAGE + DISK_MARGIN, int(n * INODES_PER_MESSAGE) + INODE_MARGIN
    found = f"{free / common.GIB:.1f} GiB and {fmt_count(inodes)} inodes free in {where}"
    if st.f_files and inodes < need_inodes:  # f_files 0: a file system without an inode limit
        raise BenchError(f"{fmt_count(n)} messages need about {fmt_count(need_inodes)} inodes; {found}")
    if free < need:
        raise BenchError(f"{fmt_count(n)} messages need about {need / common.GIB:.1f} GiB; {found}")
    return found


# ------------------------------------------------------------------------------------------ the filler


def message_bytes(queue_id: str, index: int, received: float, size: int) -> bytes:
    """`size` bytes (headers included, CRLF) as smtpsvc stores a received message: Received header first."""
    head = (
        f"Received: from bench-source.test ([127.0.0.1])\r\n\tby bench.test with ESMTP id {queue_id};\r\n"
        f"\t{rfc5322_date(received)}\r\n"
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: queue_scale message {index}\r\n"
        f"Date: {rfc5322_date(received)}\r\nMessage-ID: <{queue_id}@bench.test>\r\n\r\n"
    ).encode()
    line = b"x" * 74 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    cut = size - len(head) - 2
    if cut < 0:
        raise BenchError(f"--message-size {size} is smaller than the headers ({len(head)} bytes)")
    return head + body[:cut] + b"\r\n"


def envelope_bytes(queue_id: str, link: str, spool_id: str, received: float, eml: bytes) -> bytes:
    """queue/<id>.env as LocalSpool writes it after one refused attempt (json.dumps like queue/local.py)."""
    host = "[127.0.0.1]"
    rcpt = Recipient(
        address=RECIPIENT,
        attempts=1,
        next_attempt=received + DEFERRED_FOR,
        last_reply=REFUSED,
        status="4.4.1",
        remote_mta=host,
        route=link,
        history=[Attempt(received, REFUSED, host)],
    )
    envelope = Envelope(
        id=queue_id,
        sender=SENDER,
        recipients=[rcpt],
        received_at=received,
        source=Source.SMTP,
        client_ip="127.0.0.1",
        helo="bench-source.test",
        size=len(eml),
        crc32=zlib.crc32(eml),
        spool=spool_id,
    )
    text = json.dumps(envelope.to_json(), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")


def write_file(path: str, payload: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, payload)
    finally:
        os.close(fd)


def _fill_part(queue_dir: str, ids: Sequence[str], first: int, link: str, spool_id: str, size: int) -> None:
    """One filler process: the messages ids[first:] of its share (no fsync: one sync for all at the end)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    prefix = queue_dir + os.sep
    for offset, queue_id in enumerate(ids):
        received = time.time()
        eml = message_bytes(queue_id, first + offset, received, size)
        write_file(f"{prefix}{queue_id}.eml", eml)  # the .eml first: the .env vouches for it
        write_file(f"{prefix}{queue_id}.env", envelope_bytes(queue_id, link, spool_id, received, eml))


def fill_spool(queue_dir: Path, n: int, link: str, procs: int, size: int, deadline: float) -> None:
    """N deferred messages into an empty spool folder, by `procs` processes, then one sync."""
    queue_dir.mkdir(parents=True)
    spool_id = os.urandom(16).hex()
    (queue_dir / "spool.id").write_text(spool_id + "\n", encoding="ascii")
    ids = [new_queue_id() for _ in range(n)]  # here, not in the children: they would share one random state
    if len(set(ids)) != n:
        raise BenchError("new_queue_id gave the same id twice")
    ctx = multiprocessing.get_context("fork")
    share = -(-n // procs)
    workers = [
        ctx.Process(
            target=_fill_part,
            args=(str(queue_dir), ids[i : i + share], i, link, spool_id, size),
            name=f"fill-{i // share}",
        )
        for i in range(0, n, share)
    ]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.exitcode is None:
                raise BenchError(f"filling the spool took longer than its bound ({fmt_count(n)} messages)")
            if w.exitcode != 0:
                raise BenchError(f"a filler process exited with {w.exitcode}")
    finally:
        for w in workers:
            if w.pid is not None and w.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                w.join(10)
    os.sync()


# --------------------------------------------------------------------------------------- smtpsvc side


@dataclass
class LagStats:
    count: int
    p50: float
    p99: float
    mean: float
    worst: str  # the bucket of the largest sample


@dataclass
class SvcResult:
    n: int
    error: str = ""  # what stopped the run; the fields before it are measured
    fill_s: float = 0.0
    check_s: float = 0.0
    check: str = ""
    connect_s: float | None = None
    greeting_s: float | None = None
    health_s: float | None = None
    rss_start_kib: int = 0
    hwm_start_kib: int = 0
    rss_peak_kib: int = 0  # VmHWM at the end: the process's peak over its life
    retry_s: float | None = None
    retry_status: str = ""
    retry_output: str = ""
    health: Latencies = field(default_factory=Latencies)
    summary: Latencies = field(default_factory=Latencies)
    greet: Latencies = field(default_factory=Latencies)
    lag: LagStats | None = None
    lag_note: str = ""
    events: Counter[str] = field(default_factory=Counter)
    first_s: float | None = None  # retry -> the first message at the sink
    drain_s: float | None = None  # retry -> the N-th message at the sink
    empty_s: float | None = None
    cpu_s: float = 0.0
    stop_s: float | None = None
    metrics_idle: str = "-"  # GET /metrics with N queued, the service idle
    summary_idle: str = "-"  # GET /api/queue/summary with N queued, the service idle


class Service:
    """One `smtpsvc serve` process on a mailroot this script filled."""

    def __init__(self, workdir: Path, workers: int) -> None:
        self.dir = workdir
        self.root = workdir / "mailroot"
        self.config = workdir / "smtpsvc.toml"
        self.stderr_path = workdir / "serve.stderr"
        self.events = self.root / "log" / "events.jsonl"
        self.smtp_port = compare.free_port()
        self.admin_port = compare.free_port()
        self.relay_port = compare.free_port()
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "\n".join(
                [
                    "[server]",
                    'hostname = "bench.test"',
                    f"root = {json.dumps(str(self.root))}",
                    f'listen = ["127.0.0.1:{self.smtp_port}"]',
                    f"workers = {self.workers}",
                    "",
                    "[delivery]",
                    f'smart_host = "[127.0.0.1]:{self.relay_port}"',
                    "",
                    "[admin]",
                    f'listen = "127.0.0.1:{self.admin_port}"',
                    "",
                ]
            ),
            encoding="utf-8",
        )

    def link(self) -> str:
        """The link (route name) the service gives the benchmark's recipient: its own routing decides."""
        return route_for(RECIPIENT, load_config(str(self.config), env={})).link

    def cli_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "smtpsvc", *args, "-c", str(self.config)]

    def cli(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cli_argv(*args),
            cwd=self.dir,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> float:
        """Exec `smtpsvc serve`; returns the monotonic time just before the exec."""
        with open(self.stderr_path, "ab") as err:
            began = time.monotonic()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtpsvc", "serve", "-c", str(self.config)],
                cwd=self.dir,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        return began

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return [self.pid, *children(self.pid)] if self.workers > 1 else [self.pid]

    def cpu(self) -> float:
        return compare.cpu_ticks(self.pid, children_of=self.pid if self.workers > 1 else None) / compare.TICK

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no stderr)"

    def stop(self) -> float | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; the seconds the stop took (None: it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        began = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(
                f"  smtpsvc (pid {self.proc.pid}) ignored SIGTERM for {STOP_TIMEOUT:g}s: SIGKILL",
                file=sys.stderr,
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)
        return time.monotonic() - began


def wait_greeting(svc: Service, began: float, deadline: float) -> tuple[float, float]:
    """Poll the SMTP port every POLL seconds: (exec -> first TCP connection accepted, exec -> first 220)."""
    while time.monotonic() < deadline:
        if not svc.alive():
            raise BenchError(f"smtpsvc exited during its start:\n{svc.tail()}")
        try:
            sock = socket.create_connection(("127.0.0.1", svc.smtp_port), timeout=1)
        except OSError:
            time.sleep(POLL)
            continue
        connected = time.monotonic()
        with sock:
            sock.settimeout(max(0.1, deadline - connected))
            try:
                read_greeting(sock)
            except OSError as exc:  # closed before its greeting (a start cut short?): try again
                print(f"  first session: {exc}", file=sys.stderr)
                time.sleep(POLL)
                continue
            return connected - began, time.monotonic() - began
    raise BenchError(f"no 220 on 127.0.0.1:{svc.smtp_port} within the bound:\n{svc.tail()}")


def wait_health(svc: Service, deadline: float) -> dict[str, object]:
    while time.monotonic() < deadline:
        if not svc.alive():
            raise BenchError(f"smtpsvc exited:\n{svc.tail()}")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            data = json.loads(http_get(f"{svc.admin}/healthz", timeout=5))
            if isinstance(data, dict):
                return data
        time.sleep(0.05)
    raise BenchError(f"the admin API at {svc.admin} did not answer within the bound:\n{svc.tail()}")


def settle(cpu: Callable[[], float], timeout: float = SETTLE_TIMEOUT) -> None:
    """Bounded wait until at most 2 clock ticks of CPU in 0.5 s."""
    deadline = time.monotonic() + timeout
    last = cpu()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu()
        if now - last <= 2 / compare.TICK:
            return
        last = now


def lag_histogram(text: str) -> dict[float, float] | None:
    """The cumulative buckets of smtpsvc_event_loop_lag_seconds ({le: count}, +Inf as inf), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        if family.name == "smtpsvc_event_loop_lag_seconds":
            return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")}
    return None


def lag_stats(before: dict[float, float], after: dict[float, float], total_sum: float) -> LagStats | None:
    bounds = sorted(after)
    cumulative = [after[b] - before.get(b, 0.0) for b in bounds]
    count = int(cumulative[-1]) if cumulative else 0
    if count <= 0:
        return None

    def quantile(q: float) -> float:  # PromQL's histogram_quantile: linear within the bucket
        rank = q * count
        lower, below = 0.0, 0.0
        for bound, cum in zip(bounds, cumulative, strict=True):
            if cum >= rank:
                if bound == float("inf"):
                    return lower
                inside = cum - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cum
        return lower

    worst = "-"
    lower = 0.0
    for bound, cum, prev in zip(bounds, cumulative, [0.0, *cumulative[:-1]], strict=True):
        if cum > prev:
            worst = f"> {lower:g} s" if bound == float("inf") else f"{lower:g}-{bound:g} s"
        lower = bound
    return LagStats(count, quantile(0.5), quantile(0.99), total_sum / count, worst)


def lag_sum(text: str) -> float:
    m = re.search(r"^smtpsvc_event_loop_lag_seconds_sum ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class SmtpsvcCase:
    """The smtpsvc side of one size: fill, check, restart, then (unless --no-drain) the wave and the drain.
    `run()` stops everything it started and removes its temp dir whatever happens."""

    def __init__(self, result: SvcResult, args: argparse.Namespace, tmp_base: Path) -> None:
        self.n = result.n
        self.args = args
        self.result = result
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-queue-scale-", dir=tmp_base))
        self.svc = Service(self.tmp, args.workers)
        self.sink: FixedPortSink | None = None
        self.probers: list[Prober] = []
        self.rss: RssSampler | None = None
        self.retry: Command | None = None
        self.metrics_before = ""  # the /metrics exposition before the wave

    def run(self) -> SvcResult:
        try:
            print(f"  disk: {check_disk(self.tmp, self.n)}")
            self.svc.write_config()
            link = self.svc.link()
            if not port_is_closed(self.svc.relay_port):
                raise BenchError(f"something listens on the smart host port 127.0.0.1:{self.svc.relay_port}")
            self.fill(link)
            self.check(link)
            self.restart()
            if not self.args.no_drain:
                self.wave()
            self.result.stop_s = self.svc.stop()
            return self.result
        finally:
            common.clean_up(
                [
                    ("smtpsvc", self.svc.stop),
                    ("queue retry", self.retry.finish if self.retry is not None else None),
                    ("smtp-sink", self.sink.stop if self.sink is not None else None),
                    *[(p.name, p.stop) for p in self.probers],
                    ("the RSS sampler", self.rss.stop if self.rss is not None else None),
                ],
                self.tmp,
                self.args.keep,
            )

    def fill(self, link: str) -> None:
        n, svc = self.n, self.svc
        print(
            f"  smtpsvc: writing {fmt_count(n)} deferred messages into {svc.root / 'queue'} "
            f"({self.args.fill_procs} processes, link {link!r})",
            flush=True,
        )
        began = time.monotonic()
        deadline = began + max(300.0, n / 1000)
        fill_spool(svc.root / "queue", n, link, self.args.fill_procs, self.args.message_size, deadline)
        self.result.fill_s = time.monotonic() - began
        print(
            f"  smtpsvc: filled in {self.result.fill_s:.1f} s "
            f"({n / self.result.fill_s:.0f} msgs/s, sync included)"
        )

    def check(self, link: str) -> None:
        """`smtpsvc queue summary` on the stopped service (its recovery included) must read every file."""
        n, svc = self.n, self.svc
        began = time.monotonic()
        res = svc.cli("queue", "summary", "--json", timeout=max(120.0, n / 2000))
        self.result.check_s = time.monotonic() - began
        if res.returncode != 0:
            raise BenchError(f"smtpsvc queue summary exited {res.returncode}: {res.stderr.strip()[-500:]}")
        links = {str(x["link"]): int(x["messages"]) for x in json.loads(res.stdout)}
        corrupt_dir = svc.root / "queue" / "corrupt"
        corrupt = list(corrupt_dir.iterdir()) if corrupt_dir.exists() else []
        if links != {link: n} or corrupt:
            raise BenchError(
                f"the filled spool does not read back as {n} messages on {link!r}: {links}, "
                f"{len(corrupt)} file(s) in queue/corrupt"
            )
        self.result.check = f"{fmt_count(n)} messages on link {link}, none corrupt"
        print(
            f"  smtpsvc: `queue summary` on the stopped service: {self.result.check} "
            f"({self.result.check_s:.1f} s)"
        )

    def restart(self) -> None:
        r, svc = self.result, self.svc
        bound = max(120.0, self.n / 2000)
        began = svc.start()
        r.connect_s, r.greeting_s = wait_greeting(svc, began, began + bound)
        wait_health(svc, began + bound)
        r.health_s = time.monotonic() - began
        print(
            f"  smtpsvc: exec -> TCP accepted {fmt_s(r.connect_s)}, first 220 {fmt_s(r.greeting_s)}, "
            f"/healthz {fmt_s(r.health_s)}",
            flush=True,
        )
        settle(svc.cpu)
        st = [vm_status(pid) for pid in svc.pids()]
        r.rss_start_kib = sum(s.get("VmRSS", 0) for s in st)
        r.hwm_start_kib = sum(s.get("VmHWM", 0) for s in st)
        r.rss_peak_kib = r.hwm_start_kib
        r.summary_idle = timed(lambda: http_get(f"{svc.admin}/api/queue/summary"))[1]
        body, r.metrics_idle = timed(lambda: http_get(f"{svc.admin}/metrics"))
        self.metrics_before = body.decode() if body else ""  # also the lag's baseline
        print(
            f"  smtpsvc: RSS after the start {fmt_mib(r.rss_start_kib)}, "
            f"peak so far {fmt_mib(r.hwm_start_kib)}"
        )

    def wave(self) -> None:
        """smtp-sink up, `queue retry --all`, the probes; until the sink has counted N, the queue empty."""
        n, r, svc, args = self.n, self.result, self.svc, self.args
        self.sink = sink = FixedPortSink(self.tmp, svc.relay_port)
        sink.start()
        metrics_before = self.metrics_before
        events_offset = svc.events.stat().st_size
        self.rss = rss = RssSampler(svc.pids)
        rss.start()
        health = Prober("healthz", lambda: json.loads(http_get(f"{svc.admin}/healthz")), SAMPLE)
        greet = Prober("greeting", lambda: greeting(svc.smtp_port, GREETING_TIMEOUT), SAMPLE)
        summary = Prober("summary", lambda: http_get(f"{svc.admin}/api/queue/summary"), args.summary_interval)
        self.probers = [health, greet, *([summary] if args.summary_interval > 0 else [])]
        cpu0 = svc.cpu()
        with sink.cond:
            sunk0 = sink.count
        print(f"  smtpsvc: smtp-sink on 127.0.0.1:{svc.relay_port}; `smtpsvc queue retry --all`", flush=True)
        wave = time.monotonic()
        for p in self.probers:
            p.start()
        self.retry = retry = Command(
            svc.cli_argv("queue", "retry", "--all"), max(120.0, n / 2000), clean_env()
        )
        retry.start()
        bound = wave + drain_bound(n)

        def progress() -> str:
            queued = health.last.get("queue", "?") if isinstance(health.last, dict) else "?"
            done = "running" if retry.seconds is None else f"{retry.status} after {fmt_s(retry.seconds)}"
            rss_now = fmt_mib(rss.last_kib)
            return f"queue {queued}, retry --all {done}, RSS {rss_now}, load {common.load_average()}"

        def alive() -> None:
            if not svc.alive():
                raise BenchError(f"smtpsvc exited during the drain:\n{svc.tail()}")

        r.first_s, r.drain_s = wait_drain(sink, sunk0, n, wave, bound, progress, alive)
        retry.join(max(0.0, bound - time.monotonic()))
        retry.finish()
        r.retry_s, r.retry_status, r.retry_output = retry.seconds, retry.status, retry.output
        print(f"  smtpsvc: retry --all: {r.retry_status} after {fmt_s(r.retry_s)}: {r.retry_output[:300]}")
        while time.monotonic() < bound:  # the queue must be empty too (the last saves and unlinks)
            if isinstance(health.last, dict) and health.last.get("queue") == 0:
                r.empty_s = time.monotonic() - wave
                break
            time.sleep(SAMPLE)
        r.cpu_s = svc.cpu() - cpu0
        for p in self.probers:
            p.stop()
        r.health, r.greet, r.summary = health.samples, greet.samples, summary.samples
        print(
            f"  smtpsvc: first message at the sink {fmt_s(r.first_s)}, "
            f"all {fmt_count(n)} at {fmt_s(r.drain_s)} "
            f"({n / (r.drain_s or 1):.0f} msgs/s); queue empty at {fmt_s(r.empty_s)}",
            flush=True,
        )
        body, _ = timed(lambda: http_get(f"{svc.admin}/metrics"))
        metrics_after = body.decode() if body else ""
        before, after = lag_histogram(metrics_before), lag_histogram(metrics_after)
        if not metrics_before or not metrics_after:
            r.lag_note = "a /metrics scrape failed (before the wave or after the drain)"
        elif before is None or after is None:
            r.lag_note = "no smtpsvc_event_loop_lag_seconds on /metrics (code before the lag monitor)"
        else:
            r.lag = lag_stats(before, after, lag_sum(metrics_after) - lag_sum(metrics_before))
        with contextlib.suppress(OSError, urllib.error.URLError):
            http_get(f"{svc.admin}/api/events?limit=1")  # flushes the event log's buffer
        with open(svc.events, "rb") as fh:
            fh.seek(events_offset)
            for line in fh:
                m = EVENT_ID_RE.search(line)
                r.events[m.group(1).decode() if m else "?"] += 1
        rss.stop()
        hwm = sum(vm_status(pid).get("VmHWM", 0) for pid in svc.pids())
        r.rss_peak_kib = max(r.rss_peak_kib, hwm, rss.peak_kib)


# --------------------------------------------------------------------------------------- Postfix side


@dataclass
class PfxResult:
    n: int
    error: str = ""
    skipped: str = ""
    fill_s: float = 0.0
    deferred_s: float = 0.0
    greeting_s: float | None = None
    qmgr_start_kib: int = 0
    all_start_kib: int = 0
    qmgr_peak_kib: int = 0
    all_peak_kib: int = 0
    flush_s: float | None = None
    flush_status: str = ""
    first_s: float | None = None
    drain_s: float | None = None
    empty_s: float | None = None
    cpu_s: float = 0.0
    greet: Latencies = field(default_factory=Latencies)
    log_lines: int = 0


PFX_CONF = ["minimal_backoff_time = 3600s", "maximal_backoff_time = 4000s"]


def queue_files(
    spool: Path, queues: Sequence[str] = ("maildrop", "incoming", "active", "deferred", "hold")
) -> dict[str, int]:
    counts = {}
    for name in queues:
        total = 0
        for _, _, files in os.walk(spool / name):
            total += len(files)
        counts[name] = total
    return counts


class CounterReader(threading.Thread):
    """The last number smtp-source -c printed (a running counter, CR-separated)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(name="smtp-source-counter", daemon=True)
        self.proc = proc
        self.count = 0

    def run(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            buf += chunk
            parts = re.split(rb"[\r\n]", buf)
            buf = parts[-1]
            for part in reversed(parts[:-1]):
                if part.strip().isdigit():
                    self.count = int(part)
                    break


def qmgr_pid(master: int) -> int | None:
    for pid in children(master):
        if comm(pid) == "qmgr":
            return pid
    return None


def postfix_pids(master: int) -> list[int]:
    return [master, *children(master)]


def restart_postfix(pfx: compare.Postfix, deadline: float) -> float:
    """`postfix stop`, then `postfix start`: exec of the start -> the first 220. Returns those seconds."""
    res = pfx.postfix("stop")
    if res.returncode != 0:
        raise BenchError(f"postfix stop failed: {res.stdout}{res.stderr}{pfx.log_tail()}")
    while Path(f"/proc/{pfx.master_pid}").exists():
        if time.monotonic() > deadline:
            raise BenchError("the Postfix master did not exit after `postfix stop`")
        time.sleep(0.05)
    pfx.master_pid = 0
    pidfile = pfx.spool / "pid" / "master.pid"
    began = time.monotonic()
    res = pfx.postfix("start")
    if res.returncode != 0:
        raise BenchError(f"postfix start failed: {res.stdout}{res.stderr}{pfx.log_tail()}")
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection(("127.0.0.1", pfx.port), timeout=1)
        except OSError:
            time.sleep(POLL)
            continue
        with sock:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            read_greeting(sock)
        greeted = time.monotonic() - began
        while not pfx.master_pid and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pfx.master_pid = int(pidfile.read_text().strip())
            time.sleep(0.05)
        return greeted
    raise BenchError(f"Postfix gave no 220 after its restart{pfx.log_tail()}")


def run_postfix(result: PfxResult, args: argparse.Namespace, tmp_base: Path) -> PfxResult:
    n = result.n
    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-queue-scale-postfix-", dir=tmp_base))
    os.chmod(tmp, 0o755)  # Postfix's unprivileged daemons must reach their queue below it
    relay_port = compare.free_port()
    pfx = compare.Postfix(tmp, relay_port, PFX_CONF)
    sink: FixedPortSink | None = None
    source: subprocess.Popen[bytes] | None = None
    prober: Prober | None = None
    rss_all: RssSampler | None = None
    rss_qmgr: RssSampler | None = None
    try:
        print(f"  disk: {check_disk(tmp, n)}")
        if not port_is_closed(relay_port):
            raise BenchError(f"something listens on the relay port 127.0.0.1:{relay_port}")
        pfx.start()
        print(f"  postfix: {pfx.describe()}, relayhost [127.0.0.1]:{relay_port} (nothing listens)")

        # 1. fill through SMTP
        argv = [
            compare.SMTP_SOURCE,
            "-c",
            "-d",
            "-s",
            str(PFX_SESSIONS),
            "-m",
            str(n),
            "-l",
            str(args.message_size),
            "-f",
            SENDER,
            "-t",
            RECIPIENT,
            f"127.0.0.1:{pfx.port}",
        ]
        print(f"  postfix: {shlex.join(argv)}", flush=True)
        fill_bound = max(600.0, n / 200)
        began = time.monotonic()
        source = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        counter = CounterReader(source)
        counter.start()
        while source.poll() is None:
            try:
                source.wait(PROGRESS_EVERY)
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - began
                if elapsed > fill_bound:
                    raise BenchError(
                        f"smtp-source sent {counter.count} of {n} in {fill_bound:g} s; stopped"
                    ) from None
                print(
                    f"    {elapsed:6.0f} s: {fmt_count(counter.count)} sent "
                    f"({counter.count / elapsed:.0f}/s), load {common.load_average()}",
                    flush=True,
                )
        result.fill_s = time.monotonic() - began
        errors = source.stderr.read().decode(errors="replace").strip() if source.stderr else ""
        if source.returncode != 0:
            raise BenchError(f"smtp-source exited {source.returncode}: {errors[-500:]}")
        source = None
        print(f"  postfix: {fmt_count(n)} sent in {result.fill_s:.0f} s ({n / result.fill_s:.0f} msgs/s)")

        # 2. until every message waits in the deferred queue
        settle_bound = time.monotonic() + max(300.0, n / 500)
        while True:
            counts = queue_files(pfx.spool)
            if counts["deferred"] >= n and sum(counts.values()) == counts["deferred"]:
                break
            if time.monotonic() > settle_bound:
                raise BenchError(f"Postfix's queue did not settle into deferred: {counts}")
            print(f"    queue: {counts}", flush=True)
            time.sleep(5)
        result.deferred_s = time.monotonic() - began
        if counts["deferred"] != n:
            raise BenchError(f"Postfix holds {counts['deferred']} deferred messages, not {n}")
        print(f"  postfix: all {fmt_count(n)} deferred, {result.deferred_s:.0f} s after the fill began")

        # 3. restart with N queued
        result.greeting_s = restart_postfix(pfx, time.monotonic() + 120)
        settle(lambda: pfx.cpu() / compare.TICK)
        qmgr = qmgr_pid(pfx.master_pid)
        result.qmgr_start_kib = vm_status(qmgr).get("VmRSS", 0) if qmgr else 0
        result.all_start_kib = sum(pss_of(p) for p in postfix_pids(pfx.master_pid))
        print(
            f"  postfix: restart -> first 220 {fmt_s(result.greeting_s)}; qmgr RSS "
            f"{fmt_mib(result.qmgr_start_kib)}, all processes (PSS) {fmt_mib(result.all_start_kib)}",
            flush=True,
        )

        # 4. the drain
        sink = FixedPortSink(tmp, relay_port)
        sink.start()
        master = pfx.master_pid
        rss_all = RssSampler(lambda: postfix_pids(master), pss_of)
        rss_qmgr = RssSampler(lambda: [p] if (p := qmgr_pid(master)) else [])
        rss_all.start()
        rss_qmgr.start()
        log_offset = pfx.maillog.stat().st_size if pfx.maillog.exists() else 0
        prober = Prober("postfix-greeting", lambda: greeting(pfx.port, GREETING_TIMEOUT), SAMPLE)
        cpu0 = pfx.cpu()
        with sink.cond:
            sunk0 = sink.count
        wave = time.monotonic()
        prober.start()
        flush = Command(["postqueue", "-c", str(pfx.etc), "-f"], 120.0)
        flush.start()
        bound = wave + drain_bound(n)
        print(f"  postfix: smtp-sink on 127.0.0.1:{relay_port}; postqueue -f", flush=True)

        def pfx_progress() -> str:
            return f"qmgr RSS {fmt_mib(rss_qmgr.last_kib if rss_qmgr else 0)}, load {common.load_average()}"

        def pfx_check() -> None:
            if not Path(f"/proc/{master}").exists():
                raise BenchError(f"the Postfix master exited during the drain{pfx.log_tail()}")

        result.first_s, result.drain_s = wait_drain(sink, sunk0, n, wave, bound, pfx_progress, pfx_check)
        flush.finish()
        result.flush_s = flush.seconds
        result.flush_status = flush.status + (f": {flush.output[:200]}" if flush.output else "")
        result.cpu_s = (pfx.cpu() - cpu0) / compare.TICK
        prober.stop()
        result.greet = prober.samples
        prober = None
        while time.monotonic() < bound:
            if sum(queue_files(pfx.spool).values()) == 0:
                result.empty_s = time.monotonic() - wave
                break
            time.sleep(1)
        rss_all.stop()
        rss_qmgr.stop()
        result.qmgr_peak_kib, result.all_peak_kib = rss_qmgr.peak_kib, rss_all.peak_kib
        with contextlib.suppress(OSError), open(pfx.maillog, "rb") as fh:
            fh.seek(log_offset)
            result.log_lines = sum(1 for _ in fh)
        print(
            f"  postfix: drained {fmt_count(n)} in {fmt_s(result.drain_s)} "
            f"({n / (result.drain_s or 1):.0f} msgs/s); queue empty at {fmt_s(result.empty_s)}; "
            f"qmgr RSS peak {fmt_mib(result.qmgr_peak_kib)}",
            flush=True,
        )
        return result
    finally:
        fill = source
        common.clean_up(
            [
                (
                    "smtp-source",
                    (lambda: compare.stop_popen(fill, "smtp-source")) if fill is not None else None,
                ),
                ("Postfix", pfx.stop),
                ("smtp-sink", sink.stop if sink is not None else None),
                ("the 220 prober", prober.stop if prober is not None else None),
                ("an RSS sampler", rss_all.stop if rss_all is not None else None),
                ("an RSS sampler", rss_qmgr.stop if rss_qmgr is not None else None),
            ],
            tmp,
            args.keep,
        )


# ----------------------------------------------------------------------------------------------- report


def drain_text(r: SvcResult | PfxResult) -> str:
    return (
        f"{fmt_s(r.drain_s)} (first message at {fmt_s(r.first_s)}; queue empty at {fmt_s(r.empty_s)})"
        if r.drain_s
        else "-"
    )


def rate_text(r: SvcResult | PfxResult) -> str:
    """N / drain time; and from the first message at the sink on (the delivery alone, without the time the
    retry took to make anything due)."""
    if not r.drain_s:
        return "-"
    text = f"{r.n / r.drain_s:.0f}"
    if r.first_s is not None and r.drain_s - r.first_s > 0 and r.n > 1:
        text += f" ({(r.n - 1) / (r.drain_s - r.first_s):.0f} from the first message on)"
    return text


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" **met**" if ok else " **not met**")


def table(svc: SvcResult | None, pfx: PfxResult | None, n: int) -> list[list[str]]:
    at_target = n >= TARGET_AT
    rows: list[list[str]] = []

    def row(measure: str, s: str, p: str, target: str = "") -> None:
        rows.append([measure, s, p, target])

    def per_s(r: SvcResult | PfxResult | None) -> float | None:
        return r.n / r.drain_s if r is not None and r.drain_s else None

    s_rate, p_rate = per_s(svc), per_s(pfx)
    pskip = pfx.skipped if pfx is not None and pfx.skipped else ("not run" if pfx is None else "")
    if (svc is not None and svc.error) or (pfx is not None and pfx.error):
        row(
            "**stopped by an error** (what follows was measured before it)",
            svc.error if svc is not None and svc.error else "-",
            pfx.error if pfx is not None and pfx.error else "-",
        )

    def p(text: str) -> str:  # the Postfix column's text, or why it is empty
        return pskip or text

    measured = svc is not None
    if svc is None:  # --no-smtpsvc: the rows are built on an empty result, and its column says so
        svc = SvcResult(n)
    first = len(rows)
    row(
        "fill",
        f"{fmt_s(svc.fill_s)} (spool files written directly, one sync)",
        p(
            f"{fmt_s(pfx.fill_s if pfx else None)} (smtp-source -d -s {PFX_SESSIONS}); all deferred at "
            f"{fmt_s(pfx.deferred_s if pfx else None)}"
        ),
    )
    row("check: `smtpsvc queue summary` on the stopped service", f"{fmt_s(svc.check_s)}: {svc.check}", "-")
    under = None if not at_target or svc.greeting_s is None else svc.greeting_s <= TARGET_220
    row(
        "restart: exec -> first `220`",
        f"{fmt_s(svc.greeting_s)} (TCP accepted at {fmt_s(svc.connect_s)}, "
        f"/healthz at {fmt_s(svc.health_s)})",
        p(f"{fmt_s(pfx.greeting_s if pfx else None)} (`postfix start`)"),
        f"<= {TARGET_220:g} s with {fmt_count(TARGET_AT)} queued" + verdict(under),
    )
    rss_ok = None if not at_target else max(svc.rss_start_kib, svc.rss_peak_kib) * 1024 <= TARGET_RSS
    row(
        "RSS after the start (idle)",
        f"{fmt_mib(svc.rss_start_kib)} (peak during the start {fmt_mib(svc.hwm_start_kib)})",
        p(
            f"qmgr {fmt_mib(pfx.qmgr_start_kib if pfx else 0)}, all processes (PSS sum) "
            f"{fmt_mib(pfx.all_start_kib if pfx else 0)}"
        ),
        f"<= {TARGET_RSS / 1e6:.0f} MB with {fmt_count(TARGET_AT)} queued" + verdict(rss_ok),
    )
    row(
        "RSS peak (start and drain)",
        fmt_mib(svc.rss_peak_kib),
        p(
            f"qmgr {fmt_mib(pfx.qmgr_peak_kib if pfx else 0)}, all processes (PSS sum) "
            f"{fmt_mib(pfx.all_peak_kib if pfx else 0)} (drain)"
        ),
        f"<= {TARGET_RSS / 1e6:.0f} MB" + verdict(rss_ok),
    )
    row(
        "admin API with the queue full, service idle: `GET /api/queue/summary`; `GET /metrics`",
        f"{svc.summary_idle}; {svc.metrics_idle}",
        "-",
        f"<= {TARGET_ADMIN_P99 * 1000:.0f} ms (the target is for the drain)",
    )
    row(
        "`smtpsvc queue retry --all` / `postqueue -f`",
        f"{fmt_s(svc.retry_s)}, {svc.retry_status}: {svc.retry_output[:200] or '(no output)'}"
        if svc.retry_status
        else "-",
        p(f"{fmt_s(pfx.flush_s)}, {pfx.flush_status}" if pfx and pfx.flush_status else "-"),
    )
    health_p99, summary_p99 = svc.health.p99(), svc.summary.p99()
    row(
        "admin API `GET /healthz` during the drain",
        svc.health.text(),
        "-",
        f"p99 <= {TARGET_ADMIN_P99 * 1000:.0f} ms"
        + verdict(None if health_p99 is None else health_p99 <= TARGET_ADMIN_P99),
    )
    row(
        "admin API `GET /api/queue/summary` during the drain",
        svc.summary.text(),
        "-",
        f"p99 <= {TARGET_ADMIN_P99 * 1000:.0f} ms"
        + verdict(None if summary_p99 is None else summary_p99 <= TARGET_ADMIN_P99),
    )
    row(
        "SMTP connect -> `220` during the drain",
        svc.greet.text(),
        p(pfx.greet.text() if pfx else "-"),
    )
    if svc.lag is not None:
        lag = svc.lag
        lag_text = (
            f"p99 {fmt_ms(lag.p99)} ms, p50 {fmt_ms(lag.p50)} ms, mean {fmt_ms(lag.mean)} ms; "
            f"largest in {lag.worst} ({fmt_count(lag.count)} wake-ups)"
        )
    else:
        lag_text = svc.lag_note or "-"
    row(
        "event-loop lag during the wave (`smtpsvc_event_loop_lag_seconds`)",
        lag_text,
        "-",
        f"p99 <= {TARGET_LAG_P99 * 1000:.0f} ms"
        + verdict(None if svc.lag is None else svc.lag.p99 <= TARGET_LAG_P99),
    )
    by_id = ", ".join(f"{k}: {fmt_count(v)}" for k, v in svc.events.most_common(6))
    row(
        "events written during the wave / Postfix maillog lines",
        f"{fmt_count(sum(svc.events.values()))} ({by_id})" if svc.events else "-",
        p(fmt_count(pfx.log_lines) if pfx else "-"),
    )
    row(
        "drain: retry -> the sink counted N",
        drain_text(svc),
        p(drain_text(pfx) if pfx else "-"),
    )
    row("drain msgs/s", rate_text(svc), p(rate_text(pfx) if pfx else "-"))
    ratio = s_rate / p_rate if s_rate and p_rate else None
    row(
        "drain rate smtpsvc / Postfix",
        f"{ratio:.2f}" if ratio else "-",
        "",
        f">= {TARGET_RATIO:.1f}" + verdict(None if ratio is None else ratio >= TARGET_RATIO),
    )
    row(
        "CPU during the drain (ms/msg)",
        f"{svc.cpu_s:.0f} s ({svc.cpu_s * 1000 / n:.2f})" if svc.drain_s else "-",
        p(f"{pfx.cpu_s:.0f} s ({pfx.cpu_s * 1000 / n:.2f})" if pfx and pfx.drain_s else "-"),
    )
    row("stop (SIGTERM -> exit)", fmt_s(svc.stop_s), "-")
    if not measured:
        for r in rows[first:]:
            r[1] = "not run"
            r[3] = r[3].replace(" **not met**", "").replace(" **met**", "")
    return rows


def markdown(rows: list[list[str]]) -> str:
    header = ["measure", "smtpsvc", "Postfix", "target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plain(rows: list[list[str]]) -> str:
    out = []
    for measure, s, p, target in rows:
        out.append(f"{measure}\n    smtpsvc: {s}")
        if p and p != "-":
            out.append(f"    Postfix: {p}")
        if target:
            out.append(f"    target:  {target}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x.replace("_", "")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes: numbers separated by commas, not {text!r}") from None
    if not sizes or any(not 1 <= s <= 10_000_000 for s in sizes):
        raise argparse.ArgumentTypeError("--sizes: each from 1 to 10 000 000")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Method: see the module docstring (bench/queue_scale.py) and bench/README.md.",
    )
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="queued messages per case, comma-separated (default 100000,1000000)",
    )
    p.add_argument("--quick", action="store_true", help="--sizes 100000 (unless --sizes is given)")
    p.add_argument("--no-postfix", action="store_true", help="smtpsvc only (no root needed then)")
    p.add_argument("--no-smtpsvc", action="store_true", help="Postfix only")
    p.add_argument(
        "--postfix-max",
        type=int,
        default=1_000_000,
        metavar="N",
        help="skip the Postfix side above N messages (its fill runs at about 1000 msgs/s; default 1000000)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="smtpsvc's server.workers (default 1, the service's default)",
    )
    p.add_argument(
        "--fill-procs",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes writing the spool files (default: the cores)",
    )
    p.add_argument(
        "--message-size",
        type=int,
        default=MESSAGE_SIZE,
        metavar="BYTES",
        help="bytes per message, headers included (default 1024)",
    )
    p.add_argument(
        "--summary-interval",
        type=float,
        default=SUMMARY_EVERY,
        metavar="SECONDS",
        help=f"GET /api/queue/summary every SECONDS during the drain (default {SUMMARY_EVERY:g}; 0: never); "
        "it reads the whole queue on the service's event loop, so polling it often slows the drain",
    )
    p.add_argument(
        "--no-drain",
        action="store_true",
        help="smtpsvc: stop after the restart (fill, check, first 220, RSS): no retry wave, no drain",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dirs (mailroot, Postfix instance)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--no-write", action="store_true", help="do not write bench/results/<date>.md")
    out.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="write the Markdown section to FILE instead of appending to bench/results/<date>.md",
    )
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else SIZES)
    if args.no_postfix and args.no_smtpsvc:
        p.error("--no-postfix and --no-smtpsvc leave nothing to measure")
    if args.fill_procs < 1 or args.workers < 1:
        p.error("--fill-procs and --workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exe = os.path.relpath(sys.executable)
    command = shlex.join(
        [
            exe if not exe.startswith("..") else sys.executable,
            "bench/queue_scale.py",
            *(sys.argv[1:] if argv is None else argv),
        ]
    )
    postfix = not args.no_postfix
    if postfix:
        missing = [
            t for t in (compare.SMTP_SOURCE, compare.SMTP_SINK, compare.POSTFIX) if not Path(t).exists()
        ]
        if missing:
            print(
                f"{', '.join(missing)} missing: apt-get install postfix (or bench/run.sh), or --no-postfix",
                file=sys.stderr,
            )
            return 1
        if os.geteuid() != 0:
            print("the private Postfix instance needs root (or --no-postfix)", file=sys.stderr)
            return 1
    elif not Path(compare.SMTP_SINK).exists():
        print(f"{compare.SMTP_SINK} missing: apt-get install postfix (or bench/run.sh)", file=sys.stderr)
        return 1
    tmp_base = Path(tempfile.gettempdir())
    try:
        print(f"$ {command}")
        print(f"  disk for the largest case: {check_disk(tmp_base, max(args.sizes))}")
    except BenchError as exc:
        print(f"error: refusing to start: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    common.raise_nofile(4096)
    began = time.monotonic()
    load_start = common.load_average()
    print(f"  load average at start: {load_start}", flush=True)
    results: list[tuple[int, SvcResult | None, PfxResult | None]] = []
    current: SvcResult | PfxResult | None = None
    status = 0
    try:
        for n in args.sizes:
            print(f"\n=== {fmt_count(n)} queued messages of {args.message_size} bytes", flush=True)
            svc = None if args.no_smtpsvc else SvcResult(n)
            pfx = PfxResult(n) if postfix else None
            results.append((n, svc, pfx))  # filled in place: what was measured before an error is kept
            if svc is not None:
                current = svc
                SmtpsvcCase(svc, args, tmp_base).run()
            if pfx is not None:
                current = pfx
                if n > args.postfix_max:
                    pfx.skipped = f"not run: {fmt_count(n)} > --postfix-max {fmt_count(args.postfix_max)}"
                    print(f"  postfix: {pfx.skipped}")
                else:
                    run_postfix(pfx, args, tmp_base)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if current is not None:
            current.error = str(exc).splitlines()[0]
        status = 1
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"\ninterrupted ({type(exc).__name__} {exc})", file=sys.stderr)
        if current is not None:
            current.error = f"interrupted ({exc or 'SIGINT'})"
        status = 130
    if not results:
        return status or 1
    wall = time.monotonic() - began
    load_end = common.load_average()
    body = [
        f"- load average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s",
        f"- smtpsvc: server.workers = {args.workers}, the service's defaults otherwise (delivery.retry, "
        "max_messages_per_connection 20, max_connections_per_domain 100, tls opportunistic); smart host = "
        "smtp-sink -c on loopback",
        f"- Postfix: compare.py's private instance with {'; '.join(PFX_CONF)}; its defaults otherwise",
        f"- messages: {args.message_size} bytes each, one recipient, deferred (one refused attempt, next in "
        f"{DEFERRED_FOR / 3600:g} h); admin API probes: /healthz every {SAMPLE * 1000:.0f} ms, "
        + (
            f"/api/queue/summary every {args.summary_interval:g} s"
            if args.summary_interval > 0
            else "no /api/queue/summary"
        )
        + f", a new SMTP session every {SAMPLE * 1000:.0f} ms; latencies: nearest rank",
        "- lag: from the difference of the histogram's buckets between a scrape just before `queue retry "
        "--all` and one after the drain (interpolated within the bucket, like histogram_quantile)",
        "",
    ]
    for n, svc, pfx in results:
        rows = table(svc, pfx, n)
        print(f"\n--- {fmt_count(n)} queued\n{plain(rows)}")
        body += [f"**{fmt_count(n)} queued messages**", "", markdown(rows), ""]
    print(f"\nload average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s")
    facts = common.machine_facts(Path(__file__).resolve().parent.parent)
    now = datetime.datetime.now().isoformat(timespec="seconds")
    common.write_results(
        args.markdown,
        args.no_write,
        ("## A large deferred queue (bench/queue_scale.py)", f"# A large deferred queue, {now}"),
        command,
        ([], facts),
        body,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
