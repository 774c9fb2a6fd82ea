#!/usr/bin/env python3
"""Where smtpsvc's CPU goes under load: py-spy attached to the server while smtp-source drives it.

Cases (--cases, comma-separated):

- ``accept``: ``smtp-source -s 10 -l 1024`` into smtpsvc whose smart host is a closed port, so each message
  is accepted (fsynced, ``250``) and then gets one cheap refused delivery attempt and stays queued;
- ``relay``: the same load with the smart host = ``smtp-sink`` (bench/compare.py's setup): accept and relay;
- ``relay100k``: ``relay`` with 100 KiB messages;
- ``big``: one 256 MiB message streamed in (bench/bigmessage.py's client; the DATA receive path).

For each case the server gets a warm-up, then py-spy records it (``py-spy record --pid``, 100 Hz, ``-F``:
per function, ``-t``: per thread, idle samples left out) while the load runs, first in the raw (collapsed
stack) format, from which the script prints the top functions by own and by cumulative time and the share
of each thread, then (with --svg DIR) once more as a flame graph, kept only when under 1 MB.

Needs py-spy (``.venv/bin/pip install py-spy``) and, to attach, root or ptrace permission; and smtp-source /
smtp-sink (Debian's postfix package). Every process is stopped by PID, also on an error or Ctrl-C.

    .venv/bin/python bench/profiling.py [--cases accept,relay] [--messages 3000] [--top 15] [--svg DIR]
                                      [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import accept
import bigmessage
import common
import compare

CASES = ("accept", "relay", "relay100k", "big")
SESSIONS = 10
WARMUP = 300
PYSPY_RATE = 200
PYSPY_START = 1.0  # py-spy needs a moment to attach before the load starts
LOAD_TIMEOUT = 300.0
SVG_LIMIT = 1_000_000
FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
BIG_MB = 256


def pyspy_path() -> str:
    candidate = Path(sys.executable).parent / "py-spy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise compare.BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


@dataclass
class Stacks:
    """One py-spy recording, folded: samples per thread, per leaf function, per function on the stack."""

    samples: int = 0
    own: Counter[str] = field(default_factory=Counter)
    cumulative: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)


@dataclass
class Profile:
    case: str
    active: Stacks = field(default_factory=Stacks)  # every thread not sleeping (fsync waits count)
    gil: Stacks = field(default_factory=Stacks)  # only the thread holding the GIL: the one-core limit
    messages: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    svg: str = ""


# Entry frames on every stack of their thread: they say nothing about cost and crowd the cumulative table.
ENTRY_FRAMES = re.compile(
    r"\((threading\.py|<frozen runpy>|click/|smtpsvc/__main__\.py|smtpsvc/cli\.py|asyncio/runners\.py"
    r"|uvloop/__init__\.py)"
    r"|^(_worker|_WorkItem\.run) \(concurrent/futures/thread\.py|^run_service \(smtpsvc/app\.py"
)


def short(frame: str) -> str:
    """'_loop (smtpsvc/server/session.py:227)'; site-packages and stdlib paths shortened the same way."""
    m = FRAME_RE.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3." and "/" in path:
                path = path.split("/", 1)[1]
    return f"{m.group('func')} ({path}:{m.group('line')})"


def parse_raw(path: Path, stacks: Stacks) -> None:
    """py-spy's raw format with -t: 'thread (TID): NAME;outer (file:line);...;leaf (file:line) COUNT'."""
    if not path.exists():
        raise compare.BenchError(
            f"py-spy wrote no {path.name}: {path.with_suffix('.log').read_text()[-1000:]}"
        )
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread, frames = frames[0], [short(f) for f in frames[1:]]
        stacks.samples += count
        stacks.threads[thread] += count
        if frames:
            stacks.own[frames[-1]] += count
            for frame in set(frames):
                stacks.cumulative[frame] += count


class Recorder:
    """One py-spy record process attached to a PID; stopped with SIGINT (it then writes its output)."""

    def __init__(self, pid: int, out: Path, fmt: str, max_seconds: float, gil: bool = False) -> None:
        self.argv = [
            pyspy_path(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(PYSPY_RATE),
            "--function",
            "--threads",
            "--format",
            fmt,
            "--output",
            str(out),
            "--duration",
            str(int(max_seconds)),
            "--nonblocking",  # no pausing the server, so two recorders can watch it at once
            *(["--gil"] if gil else []),
        ]
        self.out = out
        self.log = out.with_suffix(".log")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Recorder:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        time.sleep(PYSPY_START)
        if self.proc.poll() is not None:
            raise compare.BenchError(f"py-spy exited at once: {self.log.read_text(errors='replace')[-2000:]}")
        return self

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            compare.stop_popen(proc, "py-spy")


def start_server(tmp: Path, case: str, sink: compare.Sink) -> compare.Smtpsvc:
    workdir = tmp / case
    workdir.mkdir()
    server: compare.Smtpsvc
    if case == "big":
        server = bigmessage.BigSmtpsvc(workdir, BIG_MB * common.MIB, "none", 0)
    else:
        server = compare.Smtpsvc(workdir, sink.port if case.startswith("relay") else bigmessage.CLOSED_PORT)
    server.start()
    return server


def drive(server: compare.Smtpsvc, sink: compare.Sink, case: str, messages: int) -> int:
    """Run one load against the server; returns the number of messages."""
    if case == "big":
        args = argparse.Namespace(mb=BIG_MB, interval=1.0, max_seconds=LOAD_TIMEOUT)
        assert isinstance(server, bigmessage.BigSmtpsvc)
        common.run_async(
            accept.interruptible(bigmessage.scenario(server, None, args, bigmessage.Result(deliver="none")))
        )
        return 1
    size = 102400 if case == "relay100k" else 1024
    count = messages // 5 if case == "relay100k" else messages
    argv = compare.source_argv(server.port, SESSIONS, count, size, reuse=False)
    with sink.cond:
        before = sink.count
    res = subprocess.run(argv, capture_output=True, text=True, timeout=LOAD_TIMEOUT, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise compare.BenchError(f"{shlex.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    if case.startswith("relay") and sink.wait_for(before + count, time.monotonic() + LOAD_TIMEOUT) is None:
        raise compare.BenchError(f"the sink did not count {count} messages")
    return count


def profile_case(tmp: Path, sink: compare.Sink, case: str, args: argparse.Namespace) -> Profile:
    profile = Profile(case)
    server = start_server(tmp, case, sink)
    try:
        assert server.proc is not None
        pid = server.proc.pid
        print(f"\n{case}: smtpsvc pid {pid} on 127.0.0.1:{server.port}", flush=True)
        if case != "big":
            warm = compare.source_argv(server.port, SESSIONS, WARMUP, 1024, reuse=False)
            subprocess.run(
                warm, capture_output=True, timeout=LOAD_TIMEOUT, stdin=subprocess.DEVNULL, check=True
            )
            compare.settle(server)
        raw, gil = tmp / f"{case}.raw.txt", tmp / f"{case}.gil.txt"
        with Recorder(pid, raw, "raw", LOAD_TIMEOUT), Recorder(pid, gil, "raw", LOAD_TIMEOUT, gil=True):
            cpu0, t0 = common.cpu_seconds(pid), time.monotonic()
            profile.messages = drive(server, sink, case, args.messages)
            profile.seconds = time.monotonic() - t0
            profile.server_cpu = common.cpu_seconds(pid) - cpu0
        parse_raw(raw, profile.active)
        parse_raw(gil, profile.gil)
        if args.svg is not None:
            compare.settle(server)
            svg = tmp / f"{case}.svg"
            with Recorder(pid, svg, "flamegraph", LOAD_TIMEOUT):
                drive(server, sink, case, args.messages)
            if svg.exists() and svg.stat().st_size < SVG_LIMIT:
                args.svg.mkdir(parents=True, exist_ok=True)
                target = args.svg / f"profile-{datetime.date.today().isoformat()}-{case}.svg"
                shutil.copyfile(svg, target)
                profile.svg = f"{target} ({svg.stat().st_size // 1024} KiB)"
            elif svg.exists():
                profile.svg = f"not kept: {svg.stat().st_size // 1024} KiB, over the 1 MB limit"
    finally:
        server.stop()
    return profile


def top_table(stacks: Stacks, counter: Counter[str], n: int, skip_entry: bool) -> list[str]:
    rows = []
    for frame, count in counter.most_common():
        if skip_entry and ENTRY_FRAMES.search(frame):
            continue
        rows.append(f"| {100 * count / stacks.samples:.1f}% | `{frame}` |")
        if len(rows) == n:
            break
    return rows


def report(profile: Profile, n: int) -> list[str]:
    what = {
        "accept": "1 KiB, 10 sessions, smtp-source, accept only (smart host closed: messages stay queued)",
        "relay": "1 KiB, 10 sessions, smtp-source, accept and relay to smtp-sink",
        "relay100k": "100 KiB, 10 sessions, smtp-source, accept and relay to smtp-sink",
        "big": f"one {BIG_MB} MiB message, accept only",
    }[profile.case]
    per_msg = 1000 * profile.server_cpu / profile.messages if profile.messages else float("nan")
    load = 100 * profile.server_cpu / profile.seconds if profile.seconds else float("nan")
    lines = [
        f"### {profile.case}: {what}",
        "",
        (
            f"{profile.messages} messages in {profile.seconds:.1f} s under py-spy; server CPU "
            f"{profile.server_cpu:.1f} s ({per_msg:.2f} ms/msg, {load:.0f}% of one core)."
            if profile.case != "big"
            else f"The message took {profile.seconds:.1f} s under py-spy (from the warm-up messages to its "
            f"250); server CPU {profile.server_cpu:.1f} s ({load:.0f}% of one core)."
        ),
        "",
    ]
    for title, stacks in (
        (
            "Active threads (on CPU or blocked in I/O such as fsync; sleeping threads left out)",
            profile.active,
        ),
        ("Holding the GIL (py-spy --gil: the Python work that one core has to do)", profile.gil),
    ):
        if not stacks.samples:
            continue
        threads = ", ".join(f"{t} {100 * c / stacks.samples:.0f}%" for t, c in stacks.threads.most_common(6))
        lines += [f"**{title}:** {stacks.samples} samples at {PYSPY_RATE} Hz; by thread: {threads}.", ""]
        for kind, counter, skip in (("own", stacks.own, False), ("cumulative", stacks.cumulative, True)):
            lines += [f"Top {n} by {kind} time:", "", "| share | function (file:first line) |", "|---|---|"]
            lines += top_table(stacks, counter, n, skip)
            lines.append("")
    if profile.svg:
        lines += [f"Flame graph (active threads): {profile.svg}", ""]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="py-spy profiles of smtpsvc under load.")
    p.add_argument("--cases", default="accept,relay", help=f"comma-separated, of {', '.join(CASES)}")
    p.add_argument(
        "--messages", type=int, default=3000, help="1 KiB messages per profiled load (100 KiB: /5)"
    )
    p.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    p.add_argument(
        "--svg", type=Path, metavar="DIR", help="also record flame graphs; keep those under 1 MB in DIR"
    )
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the tables as Markdown to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (raw profiles)")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.cases or any(c not in CASES for c in args.cases):
        p.error(f"--cases: choose from {', '.join(CASES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(
        [".venv/bin/python", "bench/profiling.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"$ {command}")
    for tool in (compare.SMTP_SOURCE, compare.SMTP_SINK):
        if not Path(tool).exists():
            print(f"{tool} missing: apt-get install postfix (or run bench/run.sh)", file=sys.stderr)
            return 1
    try:
        pyspy_path()
    except compare.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for sig in accept.STOP_SIGNALS:
        signal.signal(sig, accept.on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-profile-"))
    sink = compare.Sink(tmp)
    profiles: list[Profile] = []
    status = 0
    try:
        sink.start()
        for case in args.cases:
            profiles.append(profile_case(tmp, sink, case, args))
    except (compare.BenchError, accept.BenchError, subprocess.SubprocessError, OSError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, accept.Stop, asyncio.CancelledError) as exc:
        print(f"\ninterrupted ({type(exc).__name__}); stopping", file=sys.stderr)
        status = 130
    finally:
        with common.shielded():  # a second Ctrl-C must not skip the cleanup
            sink.stop()
            if args.keep:
                print(f"kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    text = common.section(
        "## Profiles (bench/profiling.py)", command, [line for p in profiles for line in report(p, args.top)]
    )
    print("\n" + text, end="")
    if args.markdown is not None and profiles:
        args.markdown.write_text(text, encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
