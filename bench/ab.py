#!/usr/bin/env python3
"""Interleaved A/B runs: smtpsvc from two or more checkouts, each with its defaults, under one load.

How issue 18's changes were judged ("kept only when interleaved A/B runs show it"): in every round each
checkout's service starts afresh (a new mailroot, the configuration bench/compare.py relays with, nothing
tuned), takes a warm-up, then one measured ``smtp-source`` run, and stops; the checkouts alternate round
by round, so a drift in the machine's load hits them alike. With ``--postfix`` a private Postfix instance
(bench/compare.py's) takes a measured run in every round too, for the ratio the benchmark reports.

    .venv/bin/python bench/ab.py --tree . --tree ../other-checkout [--postfix] [--rounds 3]
                                 [--sessions 10] [--messages 3000] [--warmup 1000] [--size 1024]

A tree is a checkout's top folder: its ``src/`` goes first on the service's PYTHONPATH (the interpreter and
the installed dependencies are this venv's). Columns as in bench/compare.py: accept = messages / wall time of
``smtp-source``; relay = messages / time until the sink counted them all; CPU = the service's processes
(the main process and its SMTP workers), user + system, per message; machine CPU = the whole machine's, per
message (the kernel's threads, where the fsyncs run, the load generator and the sink included). Prints
each run as it ends, then the medians. Loopback only; every run bounded by its message count and by
compare.RUN_TIMEOUT; every process started here is stopped by its PID, also on an error, Ctrl-C, SIGTERM or
SIGHUP. Run as root when ``--postfix`` is given (the private Postfix instance needs it). Writes no results
file: paste what it prints where the decision is recorded (docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import common
import compare


@dataclass
class Contender:
    label: str
    src: Path | None  # None: Postfix
    runs: list[compare.Run] = field(default_factory=list)


def label_of(tree: Path) -> str:
    """The tree's short commit, "+changes" when its working tree differs from it; else its path."""
    git = ["git", "-C", str(tree)]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(tree)
    return f"{commit}{'+changes' if dirty else ''} ({tree})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tree", action="append", type=Path, help="a checkout to run (repeat; default: this one)")
    p.add_argument("--postfix", action="store_true", help="a private Postfix in every round too (root)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--messages", type=int, default=3000, help="per measured run")
    p.add_argument("--warmup", type=int, default=1000, help="messages before each measured run, not counted")
    p.add_argument("--size", type=int, default=1024, help="message size in bytes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    for name in ("rounds", "sessions", "messages", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    trees = args.tree or [Path(__file__).resolve().parent.parent]
    for tree in trees:
        if not (tree / "src" / "smtpsvc" / "__init__.py").is_file():
            p.error(f"--tree {tree}: no src/smtpsvc/__init__.py there (give a checkout's top folder)")
    args.tree = [tree.resolve() for tree in trees]
    return args


def described(run: compare.Run) -> str:
    return (
        f"accept {run.accept:.0f}/s  relay {run.relay or 0:.0f}/s  cpu {run.cpu_ms or 0:.2f} ms/msg  "
        f"machine {run.machine_ms or 0:.2f} ms/msg"
    )


def summary(contenders: list[Contender]) -> list[str]:
    lines = [
        "| contender | accept msgs/s, median (runs) | relay msgs/s | CPU ms/msg | machine CPU ms/msg |",
        "|---|---|---|---|---|",
    ]
    for c in contenders:
        accept = [r.accept for r in c.runs]
        relay = [r.relay for r in c.runs if r.relay is not None]
        cpu = [r.cpu_ms for r in c.runs if r.cpu_ms is not None]
        machine = [r.machine_ms for r in c.runs if r.machine_ms is not None]

        def cell(values: list[float], digits: int) -> str:
            if not values:
                return "-"
            each = " / ".join(f"{v:.{digits}f}" for v in values)
            return f"{statistics.median(values):.{digits}f} ({each})"

        lines.append(
            f"| {c.label} | {cell(accept, 0)} | {cell(relay, 0)} | {cell(cpu, 2)} | {cell(machine, 2)} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    needed = [compare.SMTP_SOURCE, compare.SMTP_SINK] + ([compare.POSTFIX] if args.postfix else [])
    for tool in needed:
        if not Path(tool).exists():
            print(f"{tool} missing: apt-get install postfix (or run bench/run.sh once)", file=sys.stderr)
            return 1
    if args.postfix and os.geteuid() != 0:
        print("--postfix needs root (the private Postfix instance runs as its own user)", file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, compare.on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-ab-"))
    os.chmod(tmp, 0o755)  # Postfix's unprivileged daemons must reach their queue below it
    sink = compare.Sink(tmp)
    contenders = [Contender(label_of(tree), tree / "src") for tree in args.tree]
    postfix = Contender("Postfix", None) if args.postfix else None
    pfx: compare.Postfix | None = None
    svc: compare.Smtpsvc | None = None
    status = 0
    load = (args.size, args.sessions, args.messages)
    try:
        sink.start()
        print(
            f"  {args.sessions} sessions, {args.messages} messages of {args.size} bytes per run, "
            f"{args.warmup} before each; load average {common.load_average()}",
            flush=True,
        )
        if postfix is not None:
            pfx = compare.Postfix(tmp, sink.port)
            pfx.start()
            if args.warmup:
                compare.one_run(pfx, sink, args.size, args.sessions, args.warmup, False)
        for round_no in range(1, args.rounds + 1):
            for index, contender in enumerate(contenders):
                svc = compare.Smtpsvc(tmp / f"round{round_no}-{index}", sink.port, src=contender.src)
                svc.start()
                if args.warmup:
                    compare.one_run(svc, sink, args.size, args.sessions, args.warmup, False)
                run = compare.one_run(svc, sink, *load, False)
                svc.stop()
                svc = None
                contender.runs.append(run)
                print(f"  round {round_no}  {contender.label}: {described(run)}", flush=True)
            if postfix is not None and pfx is not None:
                run = compare.one_run(pfx, sink, *load, False)
                postfix.runs.append(run)
                print(f"  round {round_no}  Postfix: {described(run)}", flush=True)
    except (compare.BenchError, compare.Interrupted, KeyboardInterrupt) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, compare.BenchError) and svc is not None:
            print(f"smtpsvc stderr:\n{svc.tail()}", file=sys.stderr)
        status = 1 if isinstance(exc, compare.BenchError) else 130
    finally:
        common.clean_up(
            [
                ("smtpsvc", svc.stop if svc else None),
                ("Postfix", pfx.stop if pfx else None),
                ("smtp-sink", sink.stop),
            ],
            tmp,
            args.keep,
        )
    if status:
        return status
    print()
    print("\n".join(summary(contenders + ([postfix] if postfix else []))))
    if postfix is not None and postfix.runs:
        base = statistics.median(r.accept for r in postfix.runs)
        for c in contenders:
            with contextlib.suppress(statistics.StatisticsError):
                print(
                    f"  {c.label}: accept / Postfix {statistics.median(r.accept for r in c.runs) / base:.2f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
