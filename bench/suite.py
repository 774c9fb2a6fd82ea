#!/usr/bin/env python3
"""The whole benchmark in one go, into one results file: bench/results/<YYYY-MM-DD>.md.

Runs, one after another, each as its own process (so one failing step does not stop the others):

1. ``compare``: bench/compare.py, smtpsvc against a private Postfix and the smtp-sink ceiling with the same
   smtp-source load (accept and relay msgs/s, CPU per message, 1 and 100 KiB at 1, 10 and 50 sessions),
   then the end-of-DATA -> 250 latency of all three at 1, 10 and 50 sessions;
2. ``idle``: bench/idle.py, RSS per idle session and with --idle-sessions (10 000) held;
3. ``big``: bench/bigmessage.py, a --big-mb (1024 MiB) message streamed in and relayed, RSS sampled;
4. ``cluster`` (unless --no-cluster): bench/cluster.py, 1, 2 and 3 nodes sharing one throwaway PostgreSQL
   under the same smtp-source load, and the local spool as a reference (end-to-end and accept msgs/s, CPU
   per message of the nodes, PostgreSQL, smtp-source and smtp-sink);
5. ``profile`` (only with --profile): bench/profiling.py, py-spy under the accept, relay, 100 KiB relay and
   big-message loads; flame graphs under 1 MB are kept in bench/results/;
6. ``scale`` (only with --scale, or --only scale): bench/queue_scale.py, a large deferred queue (100 000 and
   1 000 000 messages; --quick 100 000): restart to the first 220, RSS, ``queue retry --all``, admin API and
   event-loop lag during the retry wave, drain msgs/s against a private Postfix. An hour or more.

Then appends one section to bench/results/<date>.md: the command, the machine (cores, CPU, kernel, Python,
uvloop, smtpsvc revision, Postfix version, filesystem, fd limit), the load average, and each step's tables.
bench/run.sh sets the machine up (Postfix tools, venv, fd limit) and then runs this; ``python -m bench``
runs this on a machine that is already set up.

    .venv/bin/python bench/suite.py [--quick] [--runs N] [--only compare,idle,big,cluster] [--profile]
                                    [--no-cluster] [--idle-sessions N] [--big-mb N] [--scale]
                                    [--scale-sizes N,N] [--scale-postfix-max N] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import common

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
STEPS = ("compare", "idle", "big", "cluster", "profile", "scale")
# a bound for each step's process, far above its normal duration; the steps bound their own phases too
STEP_TIMEOUT = {
    "compare": 3600.0,
    "idle": 1200.0,
    "big": 1800.0,
    "cluster": 1200.0,
    "profile": 1800.0,
    "scale": 6 * 3600.0,  # 1 000 000 messages filled into Postfix by SMTP, then drained, twice over
}
STOP_TIMEOUT = 60.0  # a step's own cleanup (stopping its servers) after SIGTERM


SNAPSHOT_ATTEMPTS = 5
SNAPSHOT_RETRY = 20.0


class Stop(Exception):
    pass


class SnapshotError(Exception):
    pass


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


@dataclass
class Step:
    name: str
    argv: list[str]
    markdown: Path
    status: int | None = None
    seconds: float = 0.0


def step_argv(name: str, args: argparse.Namespace, out: Path) -> list[str]:
    py = sys.executable
    if name == "compare":
        argv = [py, str(BENCH_DIR / "compare.py"), "--markdown", str(out)]
        if args.quick:
            argv.append("--quick")
        if args.runs is not None:
            argv += ["--runs", str(args.runs)]
        return argv
    if name == "idle":
        return [py, str(BENCH_DIR / "idle.py"), "--sessions", str(args.idle_sessions), "--markdown", str(out)]
    if name == "big":
        return [py, str(BENCH_DIR / "bigmessage.py"), "--mb", str(args.big_mb), "--markdown", str(out)]
    if name == "cluster":
        argv = [py, str(BENCH_DIR / "cluster.py"), "--markdown", str(out)]
        if args.quick:
            argv.append("--quick")
        if args.runs is not None:
            argv += ["--runs", str(args.runs)]
        return argv
    if name == "scale":
        argv = [py, str(BENCH_DIR / "queue_scale.py"), "--markdown", str(out)]
        if args.scale_sizes:
            argv += ["--sizes", args.scale_sizes]
        elif args.quick:
            argv.append("--quick")
        if args.scale_postfix_max is not None:
            argv += ["--postfix-max", str(args.scale_postfix_max)]
        return argv
    return [
        py,
        str(BENCH_DIR / "profiling.py"),
        "--cases",
        "accept,relay,relay100k,big",
        "--svg",
        str(RESULTS_DIR),
        "--markdown",
        str(out),
    ]


def snapshot_src(dest: Path) -> str:
    """Copy src/ to dest/src, so every step measures the same code even while the working tree changes
    (the steps run with PYTHONPATH=dest/src, ahead of the venv's editable install). Returns a short
    sha256 over the copied .py files; the copy must import, else it is taken again (a file may have been
    caught half-written)."""
    for attempt in range(1, SNAPSHOT_ATTEMPTS + 1):
        shutil.rmtree(dest / "src", ignore_errors=True)
        shutil.copytree(
            REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        check = subprocess.run(
            [sys.executable, "-c", "import smtpsvc.app, smtpsvc.cli"],
            env={**os.environ, "PYTHONPATH": str(dest / "src")},
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if check.returncode == 0:
            digest = hashlib.sha256()
            for path in sorted((dest / "src").rglob("*.py")):
                digest.update(path.relative_to(dest).as_posix().encode() + b"\0" + path.read_bytes())
            return digest.hexdigest()[:12]
        print(f"  the copy of src/ does not import (attempt {attempt}): {check.stderr.strip()[-300:]}")
        time.sleep(SNAPSHOT_RETRY)
    raise SnapshotError(
        "src/ does not import; is someone in the middle of an edit? (--no-snapshot: run as is)"
    )


def run_step(step: Step, env: dict[str, str]) -> None:
    """Runs one step in the foreground process group (Ctrl-C reaches it too, and it cleans up after
    itself); SIGTERM/SIGHUP to the suite are passed on to it by PID. Bounded by STEP_TIMEOUT."""
    print(f"\n=== {step.name}: {shlex.join(step.argv)}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=REPO, stdin=subprocess.DEVNULL, env=env)
    try:
        step.status = proc.wait(STEP_TIMEOUT[step.name])
    except subprocess.TimeoutExpired:
        print(f"=== {step.name}: over {STEP_TIMEOUT[step.name]:g}s, stopping it", file=sys.stderr)
        step.status = 124
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(STOP_TIMEOUT)
        if step.status is None:  # interrupted while waiting: the step's own exit status
            step.status = proc.returncode
        step.seconds = time.monotonic() - start


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.sh", description="Run every benchmark and write one bench/results/<date>.md."
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short look: compare.py and cluster.py --quick, 2000 idle sessions, a 128 MiB message "
        "(unless given)",
    )
    p.add_argument("--runs", type=int, help="compare.py and cluster.py runs per case (default 3; --quick 1)")
    p.add_argument("--only", default="compare,idle,big,cluster", help=f"steps to run, of {', '.join(STEPS)}")
    p.add_argument("--profile", action="store_true", help="also the py-spy profiles (run.sh installs py-spy)")
    p.add_argument(
        "--no-cluster",
        action="store_true",
        help="skip bench/cluster.py (nodes sharing PostgreSQL; run.sh then does not install PostgreSQL)",
    )
    p.add_argument("--idle-sessions", type=int, help="idle.py --sessions (default 10000; --quick 2000)")
    p.add_argument("--big-mb", type=int, help="bigmessage.py --mb (default 1024; --quick 128)")
    p.add_argument(
        "--scale",
        action="store_true",
        help="also bench/queue_scale.py (a large deferred queue against Postfix; an hour or more)",
    )
    p.add_argument(
        "--scale-sizes", metavar="N,N", help="queue_scale.py --sizes (default 100000,1000000; --quick 100000)"
    )
    p.add_argument(
        "--scale-postfix-max",
        type=int,
        metavar="N",
        help="queue_scale.py --postfix-max: no Postfix side above N messages (default 1000000)",
    )
    p.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/<date>.md")
    p.add_argument(
        "--no-snapshot",
        action="store_true",
        help="run the servers from src/ as it is, not from a copy taken at the start",
    )
    p.add_argument("--command", help=argparse.SUPPRESS)  # how bench/run.sh was invoked, for the results file
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.profile and "profile" not in args.only:
        args.only.append("profile")
    if args.scale and "scale" not in args.only:
        args.only.append("scale")
    if args.no_cluster:
        args.only = [s for s in args.only if s != "cluster"]
    if not args.only or any(s not in STEPS for s in args.only):
        p.error(f"--only: choose from {', '.join(STEPS)}")
    if args.idle_sessions is None:
        args.idle_sessions = 2000 if args.quick else 10000
    if args.big_mb is None:
        args.big_mb = 128 if args.quick else 1024
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = args.command or shlex.join([".venv/bin/python", "bench/suite.py", *(sys.argv[1:])])
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    began = datetime.datetime.now()
    start = time.monotonic()
    load_start = common.load_average()
    facts = common.machine_facts(REPO)
    steps: list[Step] = []
    status = 0
    with tempfile.TemporaryDirectory(prefix="smtpsvc-suite-") as tmp:
        env = dict(os.environ)
        try:
            if not args.no_snapshot:
                digest = snapshot_src(Path(tmp))
                env["PYTHONPATH"] = os.pathsep.join(
                    filter(None, [str(Path(tmp) / "src"), env.get("PYTHONPATH")])
                )
                facts.append(
                    f"code measured: a copy of src/ taken at {datetime.datetime.now().strftime('%H:%M:%S')} "
                    f"(sha256 of its .py files {digest})"
                )
            print(f"$ {command}")
            for fact in facts:
                print(f"  {fact}")
            print(f"  load average at start: {load_start}", flush=True)
            for name in args.only:
                out = Path(tmp) / f"{name}.md"
                step = Step(name, step_argv(name, args, out), out)
                steps.append(step)
                run_step(step, env)
        except (KeyboardInterrupt, Stop) as exc:
            print(f"\nsuite interrupted ({type(exc).__name__} {exc})", file=sys.stderr)
            status = 130
        except SnapshotError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        sections = []
        for step in steps:
            section = step.markdown.read_text(encoding="utf-8") if step.markdown.exists() else ""
            if step.status != 0:
                section += f"\n**{step.name} failed (exit {step.status}); it may be incomplete.**\n"
            sections.append(section)
    wall = time.monotonic() - start
    load_end = common.load_average()
    summary = ", ".join(
        f"{s.name} {'ok' if s.status == 0 else f'FAILED ({s.status})'} in {s.seconds:.0f} s" for s in steps
    )
    print(f"\n=== {summary}; wall time {wall:.0f} s; load average {load_start} at start, {load_end} at end")
    if any(s.status != 0 for s in steps):
        status = status or 1
    if args.no_write or not steps:
        return status
    text = [
        f"# Benchmark suite{' (--quick)' if args.quick else ''}, {began.isoformat(timespec='seconds')}",
        "",
        "```",
        f"$ {command}",
        "```",
        "",
        *[f"- {fact}" for fact in facts],
        f"- load average: {load_start} at start, {load_end} at end; wall time {wall:.0f} s",
        f"- steps: {summary}",
        "",
        *sections,
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{began.date().isoformat()}.md"
    earlier = out.read_text(encoding="utf-8") if out.exists() else ""
    with open(out, "a", encoding="utf-8") as fh:  # earlier runs of the same day are kept above
        if earlier and not earlier.endswith("\n\n"):
            fh.write("\n" if earlier.endswith("\n") else "\n\n")
        fh.write("\n".join(text).rstrip("\n") + "\n")
    print(f"written to {out.relative_to(REPO)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
