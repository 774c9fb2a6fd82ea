#!/usr/bin/env python3
"""smtpsvc against Postfix, side by side, with Postfix's own ``smtp-source`` as the load for both.

For each case (message size, concurrent sessions) and each run, three targets get the same load
(``smtp-source -s S -m N -l SIZE -f a@local.test -t x@remote.test 127.0.0.1:PORT``):

- **smtpsvc** (``python -m smtpsvc serve``, temp mailroot, smart host = the sink),
- **Postfix**, a private instance (own config, queue and data directories under the temp dir, loopback
  only, relayhost = the sink; default durability: its queue files are fsynced before ``250``),
- **ceiling**: ``smtp-sink`` fed directly.

Both relays forward to one ``smtp-sink -c`` whose running counter gives the end-to-end count.

Then, unless --no-latency, the end-of-DATA -> ``250`` latency of all three at 1, 10 and 50 concurrent
sessions, timed by bench/accept.py's asyncio client (1 KiB, MAIL/RCPT/DATA pipelined, sessions kept open).

- accept msgs/s = N / wall time of ``smtp-source`` (every message got its ``250``, else the run fails);
- relay msgs/s = N / time from the start of ``smtp-source`` until the sink has counted N more messages;
- CPU ms/msg = server CPU (user + system) over that same window / N. smtpsvc: its process from
  /proc/<pid>/stat. Postfix: the private master (including its reaped children: cutime + cstime) plus every
  live process whose parent is that master (smtpd, cleanup, qmgr, smtp, trivial-rewrite, postlogd, ...).
  Work the kernel does for a server in its own threads is not in it: smtpsvc's fsyncs run in kernel
  workers (queue/fsyncs.py), so
- machine CPU ms/msg = the whole machine's busy CPU (/proc/stat) over that same window / N: the load
  generator, the sink and the kernel's threads included, alike for both servers.

Run as root (Postfix and smtp-sink need it; the Debian ``postfix`` package provides smtp-source/smtp-sink).
Everything on 127.0.0.1; every run bounded by message count and by RUN_TIMEOUT; every process started here
is stopped by PID, also on an error, Ctrl-C, SIGTERM or SIGHUP.

    .venv/bin/python bench/compare.py [--quick] [--runs N] [--reuse] [--no-latency] [--keep]
                                      [--no-write | --markdown FILE]

Appends the tables to bench/results/<YYYY-MM-DD>.md (or writes them to FILE: bench/suite.py assembles one
results file from its parts). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
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
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import accept  # bench/accept.py: its asyncio SMTP client times end-of-DATA -> 250
import common

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
POSTFIX = "/usr/sbin/postfix"
SENDER = "a@local.test"
RECIPIENT = "x@remote.test"

RUN_TIMEOUT = 120.0  # one run: smtp-source plus the wait for the sink to count every message
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
PORT_ATTEMPTS = 3  # free_port() then bind is racy against other processes: try another port
SETTLE_TIMEOUT = 30.0  # between runs: wait (bounded) for the server to go idle
IDLE_WINDOW = 0.5
IDLE_TICKS = 2
TICK = os.sysconf("SC_CLK_TCK")
LISTENING_RE = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

# (size in bytes, sessions, messages per run)
CASES_FULL = [
    (1024, 1, 500),
    (1024, 10, 2000),
    (1024, 50, 2000),
    (102400, 1, 200),
    (102400, 10, 400),
    (102400, 50, 400),
]
CASES_QUICK = [(1024, 10, 1000), (1024, 50, 1000)]
WARMUP_MESSAGES = 200
# smtpsvc as a user gets it: no server.workers in its configuration, so the default ("auto": one SMTP worker
# process per core, the main process delivering) decides; `--workers N` measures a tuned variant beside it.
# latency phase: (sessions, messages per run) with 1 KiB messages; --quick: 1 run of 500 each
LATENCY_FULL = [(1, 500), (10, 2000), (50, 2000)]
LATENCY_QUICK = [(1, 500), (10, 500), (50, 500)]
LATENCY_SIZE = 1024
LATENCY_MAX_SECONDS = 60.0


class BenchError(Exception):
    pass


class Interrupted(Exception):
    pass


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"process for port {port} exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:g}s")


def proc_stat(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return stat[stat.rindex(b")") + 2 :].split()  # fields[0] is "state" (field 3 of proc(5))


def machine_busy_ms() -> float:
    """CPU time all the machine's CPUs were busy so far, in ms: /proc/stat's user, nice, system, irq and
    softirq (not idle, iowait or the time the hypervisor stole)."""
    with open("/proc/stat", "rb") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) * 1000 / TICK


def cpu_ticks(pid: int, children_of: int | None = None) -> int:
    """utime+stime+cutime+cstime of pid; plus utime+stime of its live children when children_of is set."""
    f = proc_stat(pid)
    total = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    if children_of is not None:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                c = proc_stat(int(entry))
                if int(c[1]) == children_of:
                    total += int(c[11]) + int(c[12])
    return total


def stop_pid(pid: int, what: str) -> None:
    """SIGTERM, wait, SIGKILL; for processes that are not our Popen children (Postfix master)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    print(f"  {what} (pid {pid}) ignored SIGTERM: SIGKILL", file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def stop_popen(proc: subprocess.Popen[bytes] | None, what: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"  {what} (pid {proc.pid}) ignored SIGTERM: SIGKILL", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)


# --------------------------------------------------------------------------------------------- the sink


class Sink:
    """``smtp-sink -c``: its stdout carries ``sess=.. quit=.. mesg=N`` updates separated by CR."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.count = 0
        self.cond = threading.Condition()
        self.stderr_path = workdir / "smtp-sink.stderr"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if attempt > 1:  # the port free_port() found was taken before smtp-sink could bind it
                self.port = free_port()
            argv = [SMTP_SINK, "-c", "-m", "1000"]
            if os.geteuid() == 0:
                argv += ["-u", "nobody"]
            argv += [f"127.0.0.1:{self.port}", "1000"]
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    argv, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True
                )
            try:
                wait_port(
                    self.port, STARTUP_TIMEOUT, lambda: self.proc is not None and self.proc.poll() is None
                )
                break
            except BenchError:
                stop_popen(self.proc, "smtp-sink")
                if attempt == PORT_ATTEMPTS:
                    raise
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        buf = b""
        pattern = re.compile(rb"mesg=(\d+)")
        while True:
            chunk = os.read(self.proc.stdout.fileno(), 65536)  # whatever is there, as it comes
            if not chunk:
                return
            buf += chunk
            cut = max(buf.rfind(b"\r"), buf.rfind(b"\n"))
            if cut < 0:
                continue
            found = pattern.findall(buf[:cut])
            buf = buf[cut + 1 :]
            if found:
                with self.cond:
                    self.count = int(found[-1])
                    self.cond.notify_all()

    def wait_for(self, target: int, deadline: float) -> float | None:
        """Monotonic time at which the count reached target (observed), or None at the deadline."""
        with self.cond:
            while self.count < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))
            return time.monotonic()

    def stop(self) -> None:
        stop_popen(self.proc, "smtp-sink")
        if self._thread is not None:
            self._thread.join(5)


# ------------------------------------------------------------------------------------------- the servers


class Server:
    name = ""
    port = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def cpu(self) -> int:
        return 0

    def describe(self) -> str:
        return ""


class Smtpsvc(Server):
    name = "smtpsvc"

    def __init__(
        self, workdir: Path, sink_port: int, workers: int | None = None, src: Path | None = None
    ) -> None:
        self.workers = workers  # server.workers; None: not set, the service's default decides
        self.src = src  # another checkout's src/ to run (bench/ab.py); None: what this interpreter imports
        self.dir = workdir / "smtpsvc"
        self.root = self.dir / "mailroot"
        self.config = self.dir / "smtpsvc.toml"
        self.events = self.root / "log" / "events.jsonl"
        self.stderr_path = self.dir / "serve.stderr"
        self.sink_port = sink_port
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: TextIO | None = None

    def config_text(self) -> str:
        extra = ['max_session_size = "1GB"']
        if self.workers is not None:  # a tuned variant; by default the service's own default decides
            extra.append(f"workers = {self.workers}")
        return "\n".join(common.relay_config("bench.test", self.root, self.sink_port, extra))

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.config.write_text(self.config_text(), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMTPSVC__")}
        if self.src is not None:  # ahead of the venv's editable install (and of a suite's snapshot)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.src), env.get("PYTHONPATH")]))
        self._stderr = open(self.stderr_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpsvc", "serve", "-c", str(self.config)],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"smtpsvc exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(FileNotFoundError):
                for line in self.events.read_text(encoding="utf-8", errors="replace").splitlines():
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if isinstance(rec, dict) and rec.get("id") == 9002:
                            m = LISTENING_RE.search(str(rec.get("text", "")))
                            if m:
                                self.port = int(m.group(1))
                                return
            time.sleep(0.05)
        raise BenchError(f"smtpsvc did not log 'listening on' within {STARTUP_TIMEOUT:g}s:\n{self.tail()}")

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no stderr)"

    def cpu(self) -> int:
        assert self.proc is not None  # the SMTP worker processes, if any, count too
        return cpu_ticks(self.proc.pid, children_of=self.proc.pid)

    def stop(self) -> None:
        stop_popen(self.proc, "smtpsvc")
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def describe(self) -> str:
        return f"smtpsvc (pid {self.proc.pid if self.proc else '-'}) on 127.0.0.1:{self.port}"


MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n  -  n  60    1  pickup
cleanup   unix  n  -  n  -     0  cleanup
qmgr      unix  n  -  n  300   1  qmgr
rewrite   unix  -  -  n  -     -  trivial-rewrite
bounce    unix  -  -  n  -     0  bounce
defer     unix  -  -  n  -     0  bounce
trace     unix  -  -  n  -     0  bounce
verify    unix  -  -  n  -     1  verify
flush     unix  n  -  n  1000? 0  flush
proxymap  unix  -  -  n  -     -  proxymap
smtp      unix  -  -  n  -     -  smtp
relay     unix  -  -  n  -     -  smtp
error     unix  -  -  n  -     -  error
retry     unix  -  -  n  -     -  error
discard   unix  -  -  n  -     -  discard
showq     unix  n  -  n  -     -  showq
scache    unix  -  -  n  -     1  scache
anvil     unix  -  -  n  -     1  anvil
postlog   unix-dgram n - n -   1  postlogd
"""


class Postfix(Server):
    """A private Postfix instance; never the system one in /etc/postfix."""

    name = "postfix"

    def __init__(self, workdir: Path, sink_port: int, extra: Sequence[str] = ()) -> None:
        self.dir = workdir / "postfix"
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.sink_port = sink_port
        self.port = 0  # picked in start()
        self.master_pid = 0
        self.started = False
        self.extra = list(extra)  # --postfix-conf: main.cf lines appended after the defaults

    def main_cf(self) -> str:
        return "\n".join(
            [
                "compatibility_level = 3.6",
                f"config_directory = {self.etc}",
                f"queue_directory = {self.spool}",
                f"data_directory = {self.data}",
                "mail_owner = postfix",
                "setgid_group = postdrop",
                "myhostname = postfix-bench.test",
                "mydomain = bench.test",
                "myorigin = bench.test",
                "inet_interfaces = loopback-only",
                "inet_protocols = ipv4",
                "mydestination =",
                "local_recipient_maps =",
                "relay_domains =",
                f"relayhost = [127.0.0.1]:{self.sink_port}",
                "mynetworks = 127.0.0.0/8",
                "smtpd_relay_restrictions = permit_mynetworks, reject",
                "alias_maps =",
                "alias_database =",
                "biff = no",
                "smtp_tls_security_level = none",
                "smtpd_tls_security_level = none",
                "message_size_limit = 0",
                f"maillog_file = {self.maillog}",
                f"maillog_file_prefixes = {self.dir}",
                *self.extra,
                "",
            ]
        )

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.etc), *args],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        if os.geteuid() != 0:
            raise BenchError("the private Postfix instance needs root")
        for d in (self.etc, self.spool, self.data):
            d.mkdir(parents=True)
        shutil.chown(self.data, "postfix", "postfix")
        (self.etc / "main.cf").write_text(self.main_cf(), encoding="utf-8")
        for attempt in range(1, PORT_ATTEMPTS + 1):
            # The port is picked now, not in __init__: smtpsvc (port 0) starts in between and the kernel
            # may hand it the very port free_port() had just released. Another process on the machine can
            # still take it before the master binds it, hence the retry.
            self.port = free_port()
            (self.etc / "master.cf").write_text(MASTER_CF.format(port=self.port), encoding="utf-8")
            check = self.postfix("check")
            if check.returncode != 0:
                raise BenchError(f"postfix check failed: {check.stdout}{check.stderr}{self.log_tail()}")
            self.started = True  # from here on, stop() runs `postfix stop`
            (self.spool / "pid" / "master.pid").unlink(missing_ok=True)  # none left by a failed attempt
            res = self.postfix("start")
            if res.returncode == 0:
                break
            in_use = "Address already in use" in self.log_tail()
            if not in_use or attempt == PORT_ATTEMPTS:
                raise BenchError(f"postfix start failed: {res.stdout}{res.stderr}{self.log_tail()}")
            print(f"  postfix: 127.0.0.1:{self.port} was taken meanwhile; another port", file=sys.stderr)
        pidfile = self.spool / "pid" / "master.pid"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and not self.master_pid:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pidfile.read_text().strip())
            time.sleep(0.05)
        if not self.master_pid:
            raise BenchError(f"no {pidfile}{self.log_tail()}")
        wait_port(self.port, STARTUP_TIMEOUT, lambda: Path(f"/proc/{self.master_pid}").exists())

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n" + "\n".join(self.maillog.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cpu(self) -> int:
        return cpu_ticks(self.master_pid, children_of=self.master_pid)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.postfix("stop")
        if self.master_pid:
            children = [
                int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == self.master_pid
            ]
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline and Path(f"/proc/{self.master_pid}").exists():
                time.sleep(0.1)
            if Path(f"/proc/{self.master_pid}").exists():
                stop_pid(self.master_pid, "postfix master")
            for pid in children:
                if _ppid(pid) in (self.master_pid, 1):
                    stop_pid(pid, "postfix child")

    def version(self) -> str:
        res = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=30
        )
        return res.stdout.strip() or "?"

    def describe(self) -> str:
        return f"postfix (master pid {self.master_pid}) on 127.0.0.1:{self.port}"


def _ppid(pid: int) -> int:
    try:
        return int(proc_stat(pid)[1])
    except (OSError, IndexError, ValueError):
        return -1


class Ceiling(Server):
    name = "ceiling"

    def __init__(self, sink: Sink) -> None:
        self.port = sink.port


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class Run:
    accept: float  # msgs/s
    relay: float | None  # msgs/s; None for the ceiling
    cpu_ms: float | None  # server CPU ms per message
    # the whole machine's busy CPU ms per message over the same window: every process (the load generator
    # and the sink too) and the kernel's own threads, where smtpsvc's fsyncs run (queue/fsyncs.py)
    machine_ms: float | None = None


@dataclass
class Cell:
    runs: list[Run] = field(default_factory=list)


def source_argv(port: int, sessions: int, messages: int, size: int, reuse: bool) -> list[str]:
    argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    if reuse:
        argv.append("-d")
    return [*argv, "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]


def settle(server: Server) -> None:
    """Bounded wait until the server uses at most IDLE_TICKS clock ticks in IDLE_WINDOW seconds."""
    if isinstance(server, Ceiling):
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = server.cpu()
    while time.monotonic() < deadline:
        time.sleep(IDLE_WINDOW)
        now = server.cpu()
        if now - last <= IDLE_TICKS:
            return
        last = now
    print(f"  warning: {server.name} not idle after {SETTLE_TIMEOUT:g}s", file=sys.stderr)


def one_run(server: Server, sink: Sink, size: int, sessions: int, messages: int, reuse: bool) -> Run:
    settle(server)
    with sink.cond:
        before = sink.count
    cpu0 = server.cpu()
    machine0 = machine_busy_ms()
    start = time.monotonic()
    deadline = start + RUN_TIMEOUT
    argv = source_argv(server.port, sessions, messages, size, reuse)
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{server.name}: smtp-source did not finish in {RUN_TIMEOUT:g}s") from exc
    accepted_at = time.monotonic()
    if res.returncode != 0:
        raise BenchError(f"{server.name}: {shlex.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    relayed_at = sink.wait_for(before + messages, deadline)
    if relayed_at is None:
        with sink.cond:
            got = sink.count - before
        raise BenchError(f"{server.name}: the sink counted {got} of {messages} within {RUN_TIMEOUT:g}s")
    cpu1 = server.cpu()
    machine = (machine_busy_ms() - machine0) / messages
    accept = messages / (accepted_at - start)
    if isinstance(server, Ceiling):
        return Run(accept, None, None, machine)
    return Run(accept, messages / (relayed_at - start), (cpu1 - cpu0) / TICK * 1000 / messages, machine)


# ------------------------------------------------------------------------------------------- latency

Runner = Callable[[Coroutine[Any, Any, accept.RunStats]], accept.RunStats]


def client_runner() -> tuple[Runner, str]:
    """uvloop for the load generator when it is importable (as in bench/accept.py), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run, "no (asyncio)"
    return uvloop.run, f"yes ({importlib.metadata.version('uvloop')})"


@dataclass
class LatencyRun:
    stats: accept.RunStats
    cpu_ms: float | None  # server CPU ms per accepted message, accept + relay; None for the ceiling


def latency_run(runner: Runner, server: Server, sink: Sink, sessions: int, messages: int) -> LatencyRun:
    """One run of accept.py's client: `sessions` open sessions send `messages` 1 KiB messages in all."""
    settle(server)
    with sink.cond:
        before = sink.count
    msg = accept.Message(LATENCY_SIZE, RECIPIENT)
    cpu0 = server.cpu()
    load = accept.run_load(server.port, sessions, messages, LATENCY_MAX_SECONDS, msg, None, None)
    try:
        stats = runner(accept.interruptible(load))
    except accept.BenchError as exc:
        raise BenchError(f"{server.name}: {exc}") from exc
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP):  # accept.interruptible installed its own handler
            signal.signal(sig, on_signal)
    if stats.failed or not stats.accepted:
        reasons = "; ".join(f"{n} x {why}" for why, n in stats.errors.most_common(3))
        raise BenchError(f"{server.name}: {stats.failed} of {messages} messages failed: {reasons}")
    if sink.wait_for(before + stats.accepted, time.monotonic() + RUN_TIMEOUT) is None:
        raise BenchError(
            f"{server.name}: the sink did not count {stats.accepted} messages in {RUN_TIMEOUT:g}s"
        )
    if isinstance(server, Ceiling):
        return LatencyRun(stats, None)
    return LatencyRun(stats, (server.cpu() - cpu0) / TICK * 1000 / stats.accepted)


LATENCY_HEADER = [
    "sessions",
    "server",
    "messages",
    "msgs/s",
    "end-of-DATA p50 ms",
    "end-of-DATA p99 ms",
    "transaction p50 ms",
    "transaction p99 ms",
    "CPU ms/msg",
]
LATENCY_NAMES = {"smtpsvc": "smtpsvc", "postfix": "Postfix", "ceiling": "ceiling (smtp-sink)"}


def latency_rows(results: dict[int, dict[str, list[LatencyRun]]]) -> list[list[str]]:
    rows = []
    for sessions, cells in results.items():
        for name in ("smtpsvc", "postfix", "ceiling"):
            runs = cells[name]
            lat = sorted(x for r in runs for x in r.stats.latencies_ms)
            txn = sorted(x for r in runs for x in r.stats.transactions_ms)
            cpus = [r.cpu_ms for r in runs if r.cpu_ms is not None]
            rows.append(
                [
                    str(sessions),
                    LATENCY_NAMES[name],
                    str(sum(r.stats.accepted for r in runs)),
                    fmt_rate([r.stats.rate for r in runs]),
                    accept.fmt_ms(accept.percentile(lat, 50)),
                    accept.fmt_ms(accept.percentile(lat, 99)),
                    accept.fmt_ms(accept.percentile(txn, 50)),
                    accept.fmt_ms(accept.percentile(txn, 99)),
                    f"{med(cpus):.2f}" if cpus else "-",
                ]
            )
    return rows


# ----------------------------------------------------------------------------------------------- report


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def fmt_rate(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{med(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def ratio(a: Sequence[float], b: Sequence[float]) -> str:
    if not a or not b:
        return "-"
    return f"{med(a) / med(b):.2f}"


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


HEADER = [
    "size",
    "sessions",
    "measure",
    "smtpsvc msgs/s",
    "Postfix msgs/s",
    "ceiling msgs/s",
    "smtpsvc/Postfix",
    "smtpsvc/ceiling",
    "smtpsvc CPU ms/msg",
    "Postfix CPU ms/msg",
    "machine CPU ms/msg, smtpsvc runs",
    "machine CPU ms/msg, Postfix runs",
]


def table_rows(results: dict[tuple[int, int], dict[str, Cell]]) -> list[list[str]]:
    rows = []
    for (size, sessions), cells in results.items():
        ceil = [r.accept for r in cells["ceiling"].runs]
        svc_cpu = [r.cpu_ms for r in cells["smtpsvc"].runs if r.cpu_ms is not None]
        pf_cpu = [r.cpu_ms for r in cells["postfix"].runs if r.cpu_ms is not None]
        svc_machine = [r.machine_ms for r in cells["smtpsvc"].runs if r.machine_ms is not None]
        pf_machine = [r.machine_ms for r in cells["postfix"].runs if r.machine_ms is not None]
        for measure in ("accept", "relay"):
            svc = [getattr(r, measure) for r in cells["smtpsvc"].runs]
            pf = [getattr(r, measure) for r in cells["postfix"].runs]
            rows.append(
                [
                    size_label(size),
                    str(sessions),
                    measure,
                    fmt_rate(svc),
                    fmt_rate(pf),
                    fmt_rate(ceil),
                    ratio(svc, pf),
                    ratio(svc, ceil),
                    f"{med(svc_cpu):.2f}" if svc_cpu else "-",
                    f"{med(pf_cpu):.2f}" if pf_cpu else "-",
                    f"{med(svc_machine):.2f}" if svc_machine else "-",
                    f"{med(pf_machine):.2f}" if pf_machine else "-",
                ]
            )
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plain(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=False)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def machine_facts(postfix_version: str, tmp: Path, client_uvloop: str) -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = "?"
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        fs = subprocess.run(
            ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(tmp)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return [
        f"nproc: {os.cpu_count()}",
        f"CPU: {cpu}",
        f"kernel: {platform.release()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"postfix: {postfix_version}",
        f"temp dir filesystem: {fs}",
        f"latency client on uvloop: {client_uvloop}",
    ]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 KiB only, 1 run, 1000 messages per run")
    p.add_argument("--runs", type=int, default=None, help="measured runs per case (default 3; --quick: 1)")
    p.add_argument(
        "--reuse", action="store_true", help="smtp-source -d: many messages per connection instead of one"
    )
    p.add_argument("--no-latency", action="store_true", help="skip the end-of-DATA -> 250 latency phase")
    p.add_argument(
        "--postfix-conf",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a main.cf setting for the private Postfix, after the defaults (repeatable): in_flow_delay=0",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="smtpsvc's server.workers, a tuned variant (default: not set, as a user runs it: the service's "
        "default decides; 1: a single process)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--no-write", action="store_true", help="do not write bench/results/<date>.md")
    out.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="write the Markdown section to FILE instead of appending it to bench/results/<date>.md",
    )
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if not 1 <= args.runs <= 10:
        p.error("--runs must be 1 to 10")
    if any("=" not in item or "\n" in item for item in args.postfix_conf):
        p.error("--postfix-conf takes NAME=VALUE")
    args.postfix_conf = [" = ".join(x.strip() for x in item.split("=", 1)) for item in args.postfix_conf]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK, POSTFIX):
        if not Path(tool).exists():
            print(f"{tool} missing: apt-get install postfix (or run bench/run.sh)", file=sys.stderr)
            return 1
    cases = CASES_QUICK if args.quick else CASES_FULL
    latency_cases = [] if args.no_latency else LATENCY_QUICK if args.quick else LATENCY_FULL
    exe = os.path.relpath(sys.executable)
    command = shlex.join(
        [exe if not exe.startswith("..") else sys.executable, "bench/compare.py", *sys.argv[1:]]
    )
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    runner, client_uvloop = client_runner()

    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-compare-"))
    os.chmod(tmp, 0o755)  # Postfix's unprivileged daemons must reach their queue below it
    sink = Sink(tmp)
    svc = Smtpsvc(tmp, sink.port, args.workers)
    pfx = Postfix(tmp, sink.port, args.postfix_conf)
    ceiling = Ceiling(sink)
    results: dict[tuple[int, int], dict[str, Cell]] = {}
    latency: dict[int, dict[str, list[LatencyRun]]] = {}
    facts: list[str] = []
    began = time.monotonic()
    load_start = load_average()
    status = 0
    try:
        sink.start()
        ceiling.port = sink.port
        svc.start()
        pfx.start()
        facts = machine_facts(pfx.version(), tmp, client_uvloop)
        if args.postfix_conf:
            facts.append(f"Postfix main.cf changed from the defaults: {'; '.join(args.postfix_conf)}")
        print(f"$ {command}")
        for fact in facts:
            print(f"  {fact}")
        print(f"  {svc.describe()}; {pfx.describe()}; smtp-sink on 127.0.0.1:{sink.port}")
        print(f"  load average at start: {load_start}")
        servers: list[Server] = [ceiling, svc, pfx]
        for relay_server in (svc, pfx):  # warm-up, not counted
            one_run(relay_server, sink, 1024, 10, WARMUP_MESSAGES, args.reuse)
        for size, sessions, messages in cases:
            cells = {s.name: Cell() for s in servers}
            results[(size, sessions)] = cells
            for run in range(1, args.runs + 1):
                for server in servers:  # interleaved, so drift in machine load hits all three alike
                    r = one_run(server, sink, size, sessions, messages, args.reuse)
                    cells[server.name].runs.append(r)
                    relay = f"{r.relay:7.0f}" if r.relay is not None else "      -"
                    cpu = f"{r.cpu_ms:.2f}" if r.cpu_ms is not None else "-"
                    print(
                        f"  {size_label(size):>7} x{messages:<5} s={sessions:<3} run {run}  "
                        f"{server.name:8} accept {r.accept:7.0f}/s  relay {relay}/s  cpu {cpu} ms/msg  "
                        f"machine {r.machine_ms or 0:.2f} ms/msg",
                        flush=True,
                    )
        if latency_cases:
            print("  latency: bench/accept.py's client, 1 KiB, pipelined MAIL/RCPT/DATA, sessions kept open")
        for sessions, messages in latency_cases:
            lat_cells: dict[str, list[LatencyRun]] = {s.name: [] for s in servers}
            latency[sessions] = lat_cells
            for run in range(1, args.runs + 1):
                for server in servers:
                    lr = latency_run(runner, server, sink, sessions, messages)
                    lat_cells[server.name].append(lr)
                    eod, txn = (
                        "/".join(accept.fmt_ms(accept.percentile(sorted(v), q)) for q in (50, 99))
                        for v in (lr.stats.latencies_ms, lr.stats.transactions_ms)
                    )
                    cpu = f"{lr.cpu_ms:.2f}" if lr.cpu_ms is not None else "-"
                    print(
                        f"  latency x{messages:<5} s={sessions:<3} run {run}  {server.name:8} "
                        f"{lr.stats.rate:7.0f}/s  end-of-DATA p50/p99 {eod} ms  "
                        f"transaction p50/p99 {txn} ms  cpu {cpu} ms/msg",
                        flush=True,
                    )
    except (BenchError, Interrupted, KeyboardInterrupt, accept.Stop) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, BenchError):
            print(f"smtpsvc stderr:\n{svc.tail()}", file=sys.stderr)
        status = 130 if not isinstance(exc, BenchError) else 1
    finally:
        common.clean_up(
            [("smtpsvc", svc.stop), ("Postfix", pfx.stop), ("smtp-sink", sink.stop)], tmp, args.keep
        )

    if not results or status:
        return status or 1
    rows = table_rows(results)
    lat_rows = latency_rows(latency)
    load_end = load_average()
    wall = time.monotonic() - began
    print()
    print(plain(HEADER, rows))
    if lat_rows:
        print("\nend-of-DATA -> 250 latency (bench/accept.py's client, 1 KiB, sessions kept open)")
        print(plain(LATENCY_HEADER, lat_rows))
    print(f"\nload average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s")
    mode = "-d, many messages per connection" if args.reuse else "one connection per message"
    body = [
        f"- load average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s",
        f"- smtp-source: {mode}",
        f"- smtpsvc server.workers: {'not set (the default)' if args.workers is None else args.workers}; "
        "CPU counts its SMTP worker processes too",
        "",
        "Rates: median over the runs (min-max). CPU: median of the per-run server CPU ms per message.",
        "",
        markdown(HEADER, rows),
        "",
    ]
    if lat_rows:
        body += [
            "Latency: bench/accept.py's asyncio client, 1 KiB messages (headers included), MAIL/RCPT/DATA",
            "pipelined in one write, sessions kept open. End-of-DATA: from writing the final `.` to reading",
            "the `250`. Transaction: from writing MAIL FROM to that `250` (envelope replies, body transfer,",
            f"end of DATA). p50/p99 over all messages of {args.runs} run(s) (nearest rank); msgs/s: median",
            "(min-max) of this client's runs; CPU: median per-run server CPU per message (accept and relay).",
            "",
            markdown(LATENCY_HEADER, lat_rows),
            "",
        ]
    now = datetime.datetime.now().isoformat(timespec="seconds")
    common.write_results(
        args.markdown,
        args.no_write,
        (
            "## Throughput and latency: smtpsvc, Postfix and the ceiling (bench/compare.py)",
            f"# smtpsvc vs Postfix, {now}",
        ),
        command,
        (facts[4:], facts),  # the suite's header has the machine itself
        body,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
