#!/usr/bin/env python3
"""Cluster scaling: 1, 2 and 3 ``smtpsvc serve`` nodes on this machine sharing one PostgreSQL queue.

A throwaway PostgreSQL cluster (tests/pg.py: initdb into a temp dir, loopback only, run as the ``postgres``
user when we are root, default durability: fsync and synchronous_commit on) gets one database and
``smtpsvc db init``. Then, for each run and each case (interleaved, so a change in machine load hits every
case alike):

- **local** (the reference row): one node on the local file spool;
- **postgres, N nodes** for N in --nodes (1,2,3): N nodes, each its own mailroot and ``queue.node_id``,
  the same ``queue.dsn``, SMTP on 127.0.0.1:<port picked by the kernel>, admin API off.

Every node relays to one ``smtp-sink -c`` (its running count is the end-to-end count). The load is the same
for every case: --messages messages of --size bytes over --sessions concurrent sessions in all, split over
the nodes by one ``smtp-source`` per node (``smtp-source -s S/N -m M/N -l SIZE``, one connection per
message, all started together). Each case starts its nodes afresh (after the queue tables are truncated
and a CHECKPOINT), gives them --warmup messages that are not counted, waits for everything to go idle,
measures, and stops the nodes again.

- end-to-end msgs/s = M / (first smtp-source started -> the sink has counted M more), bounded by
  RUN_TIMEOUT;
- accept msgs/s = M / (first smtp-source started -> the last smtp-source exited; every message got its 250,
  else the run fails);
- CPU ms/msg over that same end-to-end window, per message: the smtpsvc nodes (/proc/<pid>/stat, all
  threads), PostgreSQL (the postmaster including its reaped children, plus every live child: backends,
  walwriter, checkpointer, autovacuum), smtp-source (getrusage of the reaped children), smtp-sink, and this
  script (it reads the sink's counter); the busiest node's CPU in % of one core (one Python event loop);
- CPU % of cores x wall time: ours (the processes above), the kernel threads (the whole machine's) and the
  whole machine (/proc/stat: all but idle and iowait, other people's work included); the machine's busy
  share is also sampled for IDLE_SAMPLE seconds before anything starts and after the runs;
- PostgreSQL transactions per message: pg_stat_database of the queue database over the whole case (node
  start-up and warm-up included), read once the nodes' connections are gone.

Everything on 127.0.0.1; every wait bounded; every process started here is stopped by PID (PostgreSQL by
``pg_ctl stop`` and then by its postmaster PID), also on an error, Ctrl-C, SIGTERM or SIGHUP.

    .venv/bin/python bench/cluster.py [--quick] [--runs N] [--nodes 1,2,3] [--messages M] [--sessions S]
                                      [--size B] [--no-local] [--keep] [--no-write | --markdown FILE]

Needs smtp-source/smtp-sink (Debian's postfix package), PostgreSQL's server binaries
(/usr/lib/postgresql/<n>/bin) and asyncpg (``pip install -e '.[postgres]'``); bench/run.sh installs them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import common
import compare  # the smtp-sink counter, /proc readers, table formatting

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
sys.path.insert(0, str(REPO))  # tests/pg.py: the throwaway PostgreSQL cluster the queue tests use
from tests.pg import PgCluster, find_bindir  # noqa: E402

RUN_TIMEOUT = 120.0  # one measured run (or warm-up): smtp-source plus the wait for the sink
STARTUP_TIMEOUT = 30.0
SETTLE_TIMEOUT = 30.0
IDLE_WINDOW = 0.5
IDLE_TICKS = 3  # nodes + PostgreSQL together, per IDLE_WINDOW
IDLE_SAMPLE = 3.0  # seconds: the machine's busy share without this benchmark, at the start and the end
TICK = os.sysconf("SC_CLK_TCK")
DATABASE = "smtpsvc"
TABLES = "messages, recipients, links, link_slots"
KTHREADD = 2  # the parent of every kernel thread


class Interrupted(Exception):
    pass


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ------------------------------------------------------------------------------------------------ nodes


class Node:
    """One ``smtpsvc serve`` process. Its mailroot (under workdir/<name>) is kept across its starts, so
    only the first start pays for a brand-new directory tree (see bench/README.md, accept.py "Method")."""

    def __init__(self, workdir: Path, name: str, sink_port: int, dsn: str | None) -> None:
        self.name = name
        self.dir = workdir / name
        self.root = self.dir / "mailroot"
        self.config = self.dir / "smtpsvc.toml"
        self.events = self.root / "log" / "events.jsonl"
        self.stderr_path = self.dir / "serve.stderr"
        self.sink_port = sink_port
        self.dsn = dsn  # None: the local spool
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._stderr: TextIO | None = None
        self._events_offset = 0

    def config_text(self) -> str:
        lines = common.relay_config(f"{self.name}.bench.test", self.root, self.sink_port)
        if self.dsn is not None:
            lines += [
                "[queue]",
                'backend = "postgres"',
                f"dsn = {json.dumps(self.dsn)}",
                f'node_id = "{self.name}"',
                "",
            ]
        return "\n".join(lines)

    def write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self.config_text(), encoding="utf-8")

    def launch(self) -> None:
        self.write_config()
        try:
            self._events_offset = self.events.stat().st_size  # only lines of this start count
        except FileNotFoundError:
            self._events_offset = 0
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMTPSVC__")}
        self._stderr = open(self.stderr_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smtpsvc", "serve", "-c", str(self.config)],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            start_new_session=True,  # Ctrl-C reaches only this script, which stops the node itself
        )

    def wait_ready(self, deadline: float) -> None:
        """Until event 9002 "listening on 127.0.0.1:<port>" appears in this start's part of the log."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise compare.BenchError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(FileNotFoundError), open(self.events, "rb") as fh:
                fh.seek(self._events_offset)
                for line in fh.read().decode("utf-8", "replace").splitlines():
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if isinstance(rec, dict) and rec.get("id") == 9002:
                            m = compare.LISTENING_RE.search(str(rec.get("text", "")))
                            if m:
                                self.port = int(m.group(1))
                                return
            time.sleep(0.05)
        raise compare.BenchError(f"{self.name} did not log 'listening on' in time:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no stderr)"

    def cpu(self) -> int:
        assert self.proc is not None
        return compare.cpu_ticks(self.proc.pid)

    def stop(self) -> None:
        compare.stop_popen(self.proc, f"smtpsvc {self.name}")
        self.proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# -------------------------------------------------------------------------------------------- PostgreSQL


class Database:
    """The throwaway cluster, its database, and the reads this benchmark needs from it."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.cluster = PgCluster(bindir)
        self.dsn = ""

    def start(self) -> None:
        self.cluster.start()
        self._sql(self.cluster.dsn(), f"CREATE DATABASE {DATABASE}")
        self.dsn = self.cluster.dsn(DATABASE)

    def version(self) -> str:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            res = subprocess.run(
                [str(self.bindir / "postgres"), "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
            return res.stdout.strip() or "?"
        return "?"

    def cpu(self) -> int:
        """Clock ticks of the postmaster (with its reaped children) and of every live child of it."""
        pid = self.cluster.pid()
        if pid is None:
            raise compare.BenchError("PostgreSQL is not running")
        return compare.cpu_ticks(pid, children_of=pid)

    def transactions(self) -> int:
        """Transactions committed or rolled back in the queue database so far. A backend reports its
        counts when it exits (or, while it runs, at most every second or so), so this first waits
        (bounded) until no other connection to the database is left."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._sql(
            self.dsn,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            DATABASE,
        ):
            time.sleep(0.1)
        count = self._sql(
            self.dsn,
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            DATABASE,
        )
        return int(count or 0)

    def wipe(self) -> int:
        """Messages left in the queue (0 expected); then empty every queue table and CHECKPOINT, so each
        case starts on the same empty tables and no checkpoint from the previous case is due."""
        left = self._sql(self.dsn, "SELECT count(*) FROM messages")
        self._sql(self.dsn, f"TRUNCATE {TABLES}")
        self._sql(self.dsn, "CHECKPOINT")
        return int(left or 0)

    def settings(self) -> str:
        names = ("shared_buffers", "fsync", "synchronous_commit", "wal_level", "max_connections")
        values = [f"{n} = {self._sql(self.dsn, f'SHOW {n}')}" for n in names]
        return ", ".join(values)

    def _sql(self, dsn: str, query: str, *args: Any) -> Any:
        import asyncpg  # only here, so the missing driver is reported by main() with what to install

        async def go() -> Any:
            conn = await asyncpg.connect(dsn, timeout=30)
            try:
                return await conn.fetchval(query, *args, timeout=120)
            finally:
                await conn.close(timeout=10)

        return asyncio.run(go())

    def destroy(self) -> None:
        self.cluster.destroy()


# -------------------------------------------------------------------------------------------------- load


def split(total: int, parts: int) -> list[int]:
    """total spread over parts as evenly as it goes (the first ones get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (the smtp-source processes of a run)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_ticks() -> list[int]:
    """The first line of /proc/stat: user nice system idle iowait irq softirq steal, all CPUs, in ticks
    (guest time is inside user)."""
    with open("/proc/stat", encoding="ascii") as fh:
        return [int(x) for x in fh.readline().split()[1:9]]


def machine_busy(seconds: float) -> float:
    """The whole machine's busy share (% of all cores) over `seconds` while this benchmark is idle: what
    other people's work takes from it."""
    m0 = machine_ticks()
    time.sleep(seconds)
    d = [b - a for a, b in zip(m0, machine_ticks(), strict=True)]
    return 100.0 * (sum(d) - d[3] - d[4]) / max(1, sum(d))


def send(nodes: Sequence[Node], messages: int, sessions: int, size: int, deadline: float) -> float:
    """One smtp-source per node, all started together, each with its share; returns the monotonic time the
    last one exited. Any failure of any of them fails the run."""
    procs: list[tuple[Node, list[str], subprocess.Popen[bytes]]] = []
    try:
        for node, m, s in zip(nodes, split(messages, len(nodes)), split(sessions, len(nodes)), strict=True):
            argv = compare.source_argv(node.port, s, m, size, False)
            proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            procs.append((node, argv, proc))
        for node, argv, proc in procs:
            try:
                _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise compare.BenchError(f"{node.name}: smtp-source did not finish in time") from exc
            if proc.returncode != 0:
                raise compare.BenchError(
                    f"{node.name}: {shlex.join(argv)} exited {proc.returncode}: "
                    f"{err.decode(errors='replace').strip()[-500:]}"
                )
        return time.monotonic()
    finally:
        for node, _, proc in procs:
            if proc.poll() is None:
                compare.stop_popen(proc, f"smtp-source for {node.name}")


def settle(nodes: Sequence[Node], db: Database | None) -> None:
    """Bounded wait until the nodes and PostgreSQL together use at most IDLE_TICKS per IDLE_WINDOW."""

    def ticks() -> int:
        return sum(n.cpu() for n in nodes) + (db.cpu() if db is not None else 0)

    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = ticks()
    while time.monotonic() < deadline:
        time.sleep(IDLE_WINDOW)
        now = ticks()
        if now - last <= IDLE_TICKS:
            return
        last = now
    print(f"  warning: not idle after {SETTLE_TIMEOUT:g}s", file=sys.stderr)


@dataclass
class Run:
    e2e: float  # msgs/s
    accept: float  # msgs/s
    nodes_ms: float  # CPU ms per message, all nodes together
    pg_ms: float
    source_ms: float
    sink_ms: float
    self_ms: float  # this script (it reads the sink's counter)
    busiest_pct: float  # the busiest node's CPU, % of one core (a node's Python runs on one core at a time)
    ours_pct: float  # all of the above, % of cores x wall
    machine_pct: float  # /proc/stat: everything but idle and iowait, % of cores x wall
    kernel_pct: float  # kernel threads (kworker, jbd2, ksoftirqd, ...: the whole machine's), part of it
    softirq_pct: float  # /proc/stat irq + softirq (loopback TCP is processed there), part of machine_pct
    iowait_pct: float  # /proc/stat iowait: idle while waiting for the disk
    xacts: float | None = None  # PostgreSQL transactions per message over the whole case (warm-up included)
    left: int = 0  # messages still in the PostgreSQL queue after the nodes stopped (0 expected)

    @property
    def total_ms(self) -> float:
        return self.nodes_ms + self.pg_ms + self.source_ms + self.sink_ms + self.self_ms


@dataclass
class Case:
    backend: str  # "local" | "postgres"
    nodes: int
    runs: list[Run] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # one per run, as printed

    @property
    def label(self) -> str:
        return "local spool" if self.backend == "local" else "PostgreSQL"


def measure(
    nodes: Sequence[Node], db: Database, sink: compare.Sink, messages: int, sessions: int, size: int
) -> Run:
    assert sink.proc is not None
    sink_pid = sink.proc.pid
    with sink.cond:
        before = sink.count

    def sample() -> tuple[list[int], int, int, float, float, int, list[int]]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return (
            [n.cpu() for n in nodes],
            db.cpu(),
            compare.cpu_ticks(sink_pid),
            children_cpu(),
            own.ru_utime + own.ru_stime,
            compare.cpu_ticks(KTHREADD, children_of=KTHREADD),
            machine_ticks(),
        )

    n0, p0, k0, c0, s0, t0, m0 = sample()
    start = time.monotonic()
    deadline = start + RUN_TIMEOUT
    accepted_at = send(nodes, messages, sessions, size, deadline)
    relayed_at = sink.wait_for(before + messages, deadline)
    if relayed_at is None:
        with sink.cond:
            got = sink.count - before
        raise compare.BenchError(f"the sink counted {got} of {messages} within {RUN_TIMEOUT:g}s")
    n1, p1, k1, c1, s1, t1, m1 = sample()
    wall = relayed_at - start
    cores = os.cpu_count() or 1
    d = [b - a for a, b in zip(m0, m1, strict=True)]  # user nice system idle iowait irq softirq steal
    all_ticks = max(1, sum(d))

    def per_msg(ticks: float) -> float:
        return ticks / TICK * 1000 / messages

    run = Run(
        e2e=messages / wall,
        accept=messages / (accepted_at - start),
        nodes_ms=per_msg(sum(n1) - sum(n0)),
        pg_ms=per_msg(p1 - p0),
        source_ms=(c1 - c0) * 1000 / messages,
        sink_ms=per_msg(k1 - k0),
        self_ms=(s1 - s0) * 1000 / messages,
        busiest_pct=100.0 * max(b - a for a, b in zip(n0, n1, strict=True)) / TICK / wall,
        ours_pct=0.0,
        machine_pct=100.0 * (all_ticks - d[3] - d[4]) / all_ticks,
        kernel_pct=100.0 * (t1 - t0) / TICK / (wall * cores),
        softirq_pct=100.0 * (d[5] + d[6]) / all_ticks,
        iowait_pct=100.0 * d[4] / all_ticks,
    )
    run.ours_pct = 100.0 * run.total_ms * messages / 1000 / (wall * cores)
    return run


def one_case(
    case: Case, workdir: Path, db: Database, sink: compare.Sink, args: argparse.Namespace, run_no: int
) -> Run:
    """Start the case's nodes, warm them up, measure one run, stop them."""
    if case.backend == "local":
        nodes = [Node(workdir, "local", sink.port, None)]
        xacts0 = 0
    else:
        db.wipe()
        xacts0 = db.transactions()
        nodes = [Node(workdir, f"node{i}", sink.port, db.dsn) for i in range(1, case.nodes + 1)]
    try:
        for node in nodes:  # started together: python start-up and the pool's connect overlap
            node.launch()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for node in nodes:
            node.wait_ready(deadline)
        if args.warmup:
            with sink.cond:
                before = sink.count
            send(nodes, args.warmup, args.sessions, args.size, time.monotonic() + RUN_TIMEOUT)
            if sink.wait_for(before + args.warmup, time.monotonic() + RUN_TIMEOUT) is None:
                raise compare.BenchError(f"warm-up: the sink did not count {args.warmup} messages")
        settle(nodes, db)
        run = measure(nodes, db, sink, args.messages, args.sessions, args.size)
        settle(nodes, db)  # deliveries still settling their state in the database
    except compare.BenchError:
        for node in nodes:
            print(f"--- {node.name} stderr (last lines):\n{node.tail()}", file=sys.stderr)
        raise
    finally:
        for node in nodes:
            node.stop()
    if case.backend == "postgres":
        run.xacts = (db.transactions() - xacts0) / (args.warmup + args.messages)
        run.left = db.wipe()
    line = (
        f"run {run_no}  {case.label:11} nodes={case.nodes}  end-to-end {run.e2e:4.0f}/s  "
        f"accept {run.accept:4.0f}/s  CPU ms/msg: smtpsvc {run.nodes_ms:.2f} PostgreSQL {run.pg_ms:.2f} "
        f"smtp-source {run.source_ms:.2f} smtp-sink {run.sink_ms:.2f} script {run.self_ms:.2f}  "
        f"busiest node {run.busiest_pct:.0f}% of a core  "
        f"CPU % of {os.cpu_count()} cores: ours {run.ours_pct:.0f}, kernel threads {run.kernel_pct:.0f}, "
        f"machine {run.machine_pct:.0f} (irq {run.softirq_pct:.0f}, iowait {run.iowait_pct:.0f})"
        + (f"  PG xacts/msg {run.xacts:.1f}" if run.xacts is not None else "")
        + (f"  LEFT IN QUEUE {run.left}" if run.left else "")
    )
    case.lines.append(line)
    print(f"  {line}", flush=True)
    return run


# ----------------------------------------------------------------------------------------------- report

HEADER = [
    "queue",
    "nodes",
    "end-to-end msgs/s",
    "accept msgs/s",
    "smtpsvc CPU ms/msg (all nodes)",
    "PostgreSQL CPU ms/msg",
    "smtp-source CPU ms/msg",
    "smtp-sink CPU ms/msg",
    "total CPU ms/msg",
    "PostgreSQL xacts/msg",
    "busiest node, % of 1 core",
    "CPU % of cores: ours / kernel threads / machine",
]


def table_rows(cases: Sequence[Case]) -> list[list[str]]:
    rows = []
    for case in cases:
        runs = case.runs
        if not runs:
            continue

        def med(get: Any, runs: list[Run] = runs) -> float:
            return compare.med([get(r) for r in runs])

        rows.append(
            [
                case.label,
                str(case.nodes),
                compare.fmt_rate([r.e2e for r in runs]),
                compare.fmt_rate([r.accept for r in runs]),
                f"{med(lambda r: r.nodes_ms):.2f}",
                f"{med(lambda r: r.pg_ms):.2f}",
                f"{med(lambda r: r.source_ms):.2f}",
                f"{med(lambda r: r.sink_ms):.2f}",
                f"{med(lambda r: r.total_ms):.2f}",
                f"{med(lambda r: r.xacts):.1f}" if runs[0].xacts is not None else "-",
                f"{med(lambda r: r.busiest_pct):.0f}",
                f"{med(lambda r: r.ours_pct):.0f} / {med(lambda r: r.kernel_pct):.0f} / "
                f"{med(lambda r: r.machine_pct):.0f}",
            ]
        )
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 run of 600 messages per case")
    p.add_argument("--runs", type=int, help="measured runs per case (default 3; --quick 1)")
    p.add_argument("--nodes", default="1,2,3", help="node counts on PostgreSQL (default 1,2,3; at most 8)")
    p.add_argument("--messages", type=int, help="messages per run, split over the nodes (default 2400)")
    p.add_argument("--sessions", type=int, default=30, help="concurrent sessions in all (default 30)")
    p.add_argument("--size", type=int, default=1024, help="smtp-source -l, bytes per message (default 1024)")
    p.add_argument("--warmup", type=int, default=200, help="messages per case before measuring, not counted")
    p.add_argument("--no-local", action="store_true", help="leave out the local-spool reference row")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (not the database)")
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
    if args.messages is None:
        args.messages = 600 if args.quick else 2400
    try:
        args.nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
    except ValueError:
        p.error("--nodes takes a list like 1,2,3")
    if not args.nodes or any(not 1 <= n <= 8 for n in args.nodes):
        p.error("--nodes: 1 to 8 each")
    if not 1 <= args.runs <= 10:
        p.error("--runs must be 1 to 10")
    if not 1 <= args.messages <= 100_000 or not 0 <= args.warmup <= 10_000:
        p.error("--messages 1 to 100000, --warmup 0 to 10000")
    if not max(args.nodes) <= args.sessions <= 1000:
        p.error("--sessions must be at least the largest node count (one smtp-source session per node)")
    if args.messages < args.sessions or (args.warmup and args.warmup < args.sessions):
        p.error("--messages and --warmup must be at least --sessions")
    if not 1 <= args.size <= 64 * 1024 * 1024:
        p.error("--size 1 to 64 MiB")
    return args


def missing_tools() -> list[str]:
    missing = [
        f"{tool} (apt-get install postfix)"
        for tool in (compare.SMTP_SOURCE, compare.SMTP_SINK)
        if not Path(tool).exists()
    ]
    if find_bindir() is None:
        missing.append(
            "PostgreSQL's server binaries /usr/lib/postgresql/<n>/bin (apt-get install postgresql)"
        )
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        missing.append("asyncpg in this Python (.venv/bin/pip install -e '.[postgres]')")
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exe = os.path.relpath(sys.executable)
    command = shlex.join(
        [exe if not exe.startswith("..") else sys.executable, "bench/cluster.py", *sys.argv[1:]]
    )
    missing = missing_tools()
    if missing:
        print("missing: " + "; ".join(missing) + " (bench/run.sh installs them)", file=sys.stderr)
        if args.markdown is not None:
            args.markdown.write_text(
                "## Cluster scaling (bench/cluster.py)\n\nnot run: missing " + "; ".join(missing) + "\n",
                encoding="utf-8",
            )
        return 1
    bindir = find_bindir()
    assert bindir is not None
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    cases = ([] if args.no_local else [Case("local", 1)]) + [Case("postgres", n) for n in args.nodes]
    facts: list[str] = []
    began = time.monotonic()
    load_start = common.load_average()
    idle_start = machine_busy(IDLE_SAMPLE)  # before this benchmark starts anything
    idle_end = -1.0
    status = 0
    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-cluster-"))
    sink = compare.Sink(tmp)
    db = Database(bindir)  # a temp dir for the cluster (nothing runs yet); destroy() removes it
    try:
        sink.start()
        db.start()
        init = Node(tmp, "node1", sink.port, db.dsn)
        init.write_config()
        res = subprocess.run(
            [sys.executable, "-m", "smtpsvc", "db", "init", "-c", str(init.config)],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if not k.upper().startswith("SMTPSVC__")},
        )
        if res.returncode != 0:
            raise compare.BenchError(f"smtpsvc db init failed: {res.stdout}{res.stderr}")
        facts = [
            *common.machine_facts(REPO)[:6],
            f"PostgreSQL: {db.version()}, throwaway cluster on 127.0.0.1:{db.cluster.port} ({db.settings()})",
            f"smtpsvc db init: {res.stdout.strip()}",
            f"temp dir: {tmp} on {common.filesystem(tmp)}",
        ]
        print(f"$ {command}")
        for fact in facts:
            print(f"  {fact}")
        print(
            f"  smtp-sink on 127.0.0.1:{sink.port}; load average at start: {load_start}; machine busy "
            f"{idle_start:.0f}% before this benchmark started anything",
            flush=True,
        )
        for run_no in range(1, args.runs + 1):
            for case in cases:  # interleaved: drift in the machine's load hits every case alike
                case.runs.append(one_case(case, tmp, db, sink, args, run_no))
        idle_end = machine_busy(IDLE_SAMPLE)
    except (compare.BenchError, Interrupted, KeyboardInterrupt, subprocess.SubprocessError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1 if isinstance(exc, compare.BenchError | subprocess.SubprocessError | OSError) else 130
    except Exception as exc:  # asyncpg's errors among others: report, clean up, fail
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        common.clean_up([("smtp-sink", sink.stop), ("PostgreSQL", db.destroy)], tmp, args.keep)

    rows = table_rows(cases)
    if not rows:
        return status or 1
    load_end = common.load_average()
    wall = time.monotonic() - began
    left = sum(r.left for c in cases for r in c.runs)
    print()
    print(compare.plain(HEADER, rows))
    idle = f"{idle_start:.0f}% before the start, {idle_end:.0f}% after the runs" if idle_end >= 0 else "?"
    print(f"\nload average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s")
    print(f"machine busy while this benchmark was idle ({IDLE_SAMPLE:g} s): {idle}")
    shares = "; ".join(
        f"{n} node{'s' if n > 1 else ''}: {'+'.join(str(s) for s in split(args.sessions, n))}"
        for n in args.nodes
    )
    body = [
        f"- load average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s",
        f"- machine busy (% of {os.cpu_count()} cores) over {IDLE_SAMPLE:g} s with this benchmark idle, "
        f"i.e. other people's work: {idle}",
        f"- load per run: {args.messages} messages of {args.size} bytes (`smtp-source -l`), {args.sessions} "
        f"sessions in all, one connection per message, split over the nodes by one smtp-source per node "
        f"(sessions per node: {shares}); {args.warmup} messages of warm-up per case; "
        f"{args.runs} run(s) per case, the cases interleaved",
        f"- messages left in the PostgreSQL queue after the runs: {left}",
        "",
        "End-to-end: messages counted by smtp-sink per second, from the start of the smtp-source processes "
        "until the sink has them all; accept: until the last smtp-source exited. Rates: median (min-max) "
        "over the runs. CPU: the median over the runs of CPU ms per message over the end-to-end window; "
        "total = the four columns plus this script's own (it reads the sink's counter). PostgreSQL "
        "xacts/msg: transactions in the queue database per message, node start-up and warm-up included. "
        "Busiest node: the CPU of the node that used the most, in % of one core. "
        f"CPU % of {os.cpu_count()} cores x wall time: ours = the processes in the table; kernel threads = "
        "all of the machine's (kworker, jbd2, ksoftirqd...); machine = everything busy in /proc/stat, "
        "other people's work included.",
        "",
        compare.markdown(HEADER, rows),
        "",
        "Per run:",
        "",
        "```",
        *[line for run_no in range(args.runs) for c in cases for line in c.lines[run_no : run_no + 1]],
        "```",
        "",
    ]
    if status:
        body.append(f"**Incomplete: the benchmark stopped with status {status}.**\n")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    common.write_results(
        args.markdown,
        args.no_write,
        ("## Cluster scaling: nodes sharing one PostgreSQL (bench/cluster.py)", f"# Cluster scaling, {now}"),
        command,
        (facts[6:], facts),  # the suite's header has the machine itself
        body,
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
