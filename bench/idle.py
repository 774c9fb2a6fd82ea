#!/usr/bin/env python3
"""Memory of smtpsvc per idle SMTP session, and with N (default 10 000) idle sessions held at once.

Starts ``python -m smtpsvc serve`` as a separate process (temp mailroot, 127.0.0.1, port chosen by the kernel,
``server.max_connections`` above N, ``connection_timeout`` 30 minutes), then:

1. **baseline**: 20 messages through 2 sessions (so the code paths a session uses are loaded), then the
   server's RSS (VmRSS from /proc/<pid>/status);
2. **hold**: N sessions opened from one asyncio process, at most --concurrency connects at a time; each reads
   the ``220`` banner (and with --ehlo sends EHLO and reads its ``250``) and then stays silent. The server's
   RSS, open fds and threads are read after --settle seconds with all N held;
3. **still serving**: while the N are held, a new session sends one message and must get its ``250``;
4. **all alive**: every held session sends NOOP and must get ``250`` (the RSS is read again after that);
5. **release**: every held session closes; the RSS is read once the server has closed them.

Per-session bytes = (RSS with N held - baseline) / N. The target of issue 6 is N = 10 000 under 2 GB RSS.

The fd limit is raised to N + 256 for this process and the server it starts (RLIMIT_NOFILE soft limit up to
the hard limit; as root the hard limit too); the script says so and stops when it cannot. All on loopback;
with N > 20 000 the sessions come from several source addresses 127.0.0.x so ephemeral ports do not run out.
Every phase is bounded in time (--max-seconds in all); the server is stopped by PID on exit, Ctrl-C or error.

    .venv/bin/python bench/idle.py [--sessions 10000] [--ehlo] [--markdown FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import accept
import common
import compare

TARGET_BYTES = 2 * 1000**3  # issue 6: 10 000 idle sessions held with under 2 GB RSS
SESSIONS_PER_SOURCE = 20000  # ephemeral ports per source address: 32768-60999 by default, keep a margin
WARMUP_SESSIONS, WARMUP_MESSAGES = 2, 20
CONNECT_TIMEOUT = 30.0  # one connect + banner (+ EHLO)
RELEASE_TIMEOUT = 60.0  # the server closes the released sessions
EXTRA_FDS = 256  # the server's and client's own files, listeners, the probe session
LOCAL_DOMAIN = "local.test"


class IdleSmtpsvc(compare.Smtpsvc):
    """compare.py's smtpsvc process, configured for many long idle sessions and local delivery."""

    def __init__(self, workdir: Path, sessions: int) -> None:
        super().__init__(workdir, sink_port=0)
        self.max_connections = sessions + 100

    def config_text(self) -> str:
        return "\n".join(
            [
                "[server]",
                'hostname = "bench.test"',
                f"root = {json.dumps(str(self.root))}",
                'listen = ["127.0.0.1:0"]',
                f"max_connections = {self.max_connections}",
                'connection_timeout = "30m"',
                "",
                "[domains]",
                f'local = ["{LOCAL_DOMAIN}"]',
                "",
                "[admin]",
                'listen = ""',
                "",
            ]
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@dataclass
class Held:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class Result:
    sessions: int
    ehlo: bool
    baseline: dict[str, int] = field(default_factory=dict)  # server /proc status, KiB
    held: dict[str, int] = field(default_factory=dict)
    after_noop: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    fds_baseline: int = 0
    fds_held: int = 0
    opened: int = 0
    connect_seconds: float = 0.0
    connect_errors: Counter[str] = field(default_factory=Counter)
    probe_ok: bool = False
    probe_ms: float = float("nan")
    probe_error: str = ""
    noop_ok: int = 0
    noop_seconds: float = 0.0
    noop_errors: Counter[str] = field(default_factory=Counter)
    client_rss: int = 0  # KiB, this process with N held
    release_seconds: float = 0.0

    @property
    def per_session(self) -> float:
        """Bytes of server RSS per held session."""
        if not self.opened:
            return float("nan")
        return (self.held["VmRSS"] - self.baseline["VmRSS"]) * 1024 / self.opened


def source_address(index: int, sessions: int) -> str:
    return "127.0.0.1" if sessions <= SESSIONS_PER_SOURCE else f"127.0.0.{1 + index // SESSIONS_PER_SOURCE}"


async def open_one(port: int, index: int, sessions: int, ehlo: bool) -> Held:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source_address(index, sessions), 0), limit=4096
    )
    try:
        for stage, code in (("banner", 220), ("EHLO", 250)):
            if stage == "EHLO":
                if not ehlo:
                    break
                writer.write(b"EHLO idle.test\r\n")
            while True:
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise ConnectionError(f"closed by the server before the {stage} reply")
                if line[3:4] != b"-":
                    break
            if not line.startswith(b"%d " % code):
                raise ConnectionError(f"{stage}: {line.decode('ascii', 'replace').strip()}")
    except BaseException:
        writer.close()
        raise
    return Held(reader, writer)


async def open_all(port: int, args: argparse.Namespace, result: Result, held: list[Held]) -> None:
    """Open the sessions into `held` (the caller closes them, also when this is interrupted)."""
    gate = asyncio.Semaphore(args.concurrency)

    async def one(index: int) -> None:
        async with gate:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    held.append(await open_one(port, index, args.sessions, args.ehlo))
            except (OSError, TimeoutError, ConnectionError) as exc:
                result.connect_errors[f"{type(exc).__name__}: {exc}"] += 1

    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(args.sessions)))
    result.connect_seconds = time.monotonic() - start
    result.opened = len(held)


async def noop_all(held: list[Held], result: Result) -> None:
    async def one(h: Held) -> None:
        try:
            h.writer.write(b"NOOP\r\n")
            line = await h.reader.readline()
            if line.startswith(b"250"):
                result.noop_ok += 1
            else:
                result.noop_errors[line.decode("ascii", "replace").strip() or "closed"] += 1
        except (OSError, ConnectionError) as exc:
            result.noop_errors[f"{type(exc).__name__}: {exc}"] += 1

    start = time.monotonic()
    async with asyncio.timeout(RELEASE_TIMEOUT):
        await asyncio.gather(*(one(h) for h in held))
    result.noop_seconds = time.monotonic() - start


async def probe(port: int, result: Result) -> None:
    """A new session sends one message while the others are held: it must get its 250."""
    stats = accept.RunStats(target=1)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            client = await accept.Client.connect(port)
            try:
                await client.send(accept.Message(1024, f"bench@{LOCAL_DOMAIN}"), 1, stats)
            finally:
                await client.quit()
    except (OSError, TimeoutError, ConnectionError, accept.ReplyError) as exc:
        result.probe_error = f"{type(exc).__name__}: {exc}"
        return
    result.probe_ok = stats.accepted == 1
    if stats.latencies_ms:
        result.probe_ms = stats.latencies_ms[0]
    if not result.probe_ok:
        result.probe_error = "; ".join(stats.errors) or "no 250"


async def scenario(server: IdleSmtpsvc, args: argparse.Namespace, result: Result) -> None:
    pid = server.pid
    msg = accept.Message(1024, f"bench@{LOCAL_DOMAIN}")
    warm = await accept.run_load(server.port, WARMUP_SESSIONS, WARMUP_MESSAGES, 30, msg, pid, None)
    if warm.accepted != WARMUP_MESSAGES:
        raise compare.BenchError(
            f"warm-up: {warm.accepted} of {WARMUP_MESSAGES} accepted: {dict(warm.errors)}"
        )
    await asyncio.sleep(args.settle)
    result.baseline = common.proc_status(pid)
    result.fds_baseline = common.fd_count(pid)
    print(f"  baseline: server RSS {common.fmt_mib(result.baseline['VmRSS'])}, {result.fds_baseline} fds")

    held: list[Held] = []
    try:
        await open_all(server.port, args, result, held)
        print(
            f"  opened {result.opened} of {args.sessions} sessions in {result.connect_seconds:.1f}s"
            + (f" ({sum(result.connect_errors.values())} failed)" if result.connect_errors else ""),
            flush=True,
        )
        for why, n in result.connect_errors.most_common(5):
            print(f"    connect failure x{n}: {why}")
        await asyncio.sleep(args.settle)
        result.held = common.proc_status(pid)
        result.fds_held = common.fd_count(pid)
        result.client_rss = common.rss_kib(os.getpid())
        print(
            f"  held: server RSS {common.fmt_mib(result.held['VmRSS'])}, {result.fds_held} fds, "
            f"{result.held['Threads']} threads; {result.per_session / 1024:.1f} KiB per session",
            flush=True,
        )
        await probe(server.port, result)
        print(
            "  a new session while they are held: "
            + (f"250 after {result.probe_ms:.1f} ms" if result.probe_ok else f"FAILED: {result.probe_error}"),
            flush=True,
        )
        await noop_all(held, result)
        await asyncio.sleep(args.settle)
        result.after_noop = common.proc_status(pid)
        print(
            f"  NOOP on every held session: {result.noop_ok} of {result.opened} answered 250 in "
            f"{result.noop_seconds:.1f}s; server RSS {common.fmt_mib(result.after_noop['VmRSS'])}",
            flush=True,
        )
    finally:
        for h in held:
            h.writer.close()
        held.clear()
    start = time.monotonic()
    while time.monotonic() - start < RELEASE_TIMEOUT:  # bounded wait for the server to close them
        await asyncio.sleep(0.25)
        if common.fd_count(pid) <= result.fds_baseline + 5:
            break
    result.release_seconds = time.monotonic() - start
    await asyncio.sleep(args.settle)
    result.released = common.proc_status(pid)
    print(
        f"  released: server RSS {common.fmt_mib(result.released['VmRSS'])}, {common.fd_count(pid)} fds "
        f"after {result.release_seconds:.1f}s",
        flush=True,
    )


def table(result: Result) -> list[list[str]]:
    def mib(status: dict[str, int], key: str = "VmRSS") -> str:
        return common.fmt_mib(status[key]) if key in status else "-"

    rows = [
        ["sessions asked / held (banner received)", f"{result.sessions} / {result.opened}"],
        ["held after", "EHLO" if result.ehlo else "the 220 banner only"],
        ["time to open them", f"{result.connect_seconds:.1f} s"],
        ["server RSS, baseline (after 20 messages)", mib(result.baseline)],
        [f"server RSS, {result.opened} sessions held", mib(result.held)],
        [
            "  of it anonymous (heap)",
            f"{mib(result.held, 'RssAnon')} (baseline {mib(result.baseline, 'RssAnon')})",
        ],
        ["server RSS per idle session", f"{result.per_session / 1024:.1f} KiB"],
        ["server open fds, baseline / held", f"{result.fds_baseline} / {result.fds_held}"],
        [
            "new session sends a message while held",
            f"250 in {result.probe_ms:.1f} ms" if result.probe_ok else f"failed: {result.probe_error}",
        ],
        [
            "held sessions answering NOOP (250)",
            f"{result.noop_ok} of {result.opened} in {result.noop_seconds:.1f} s",
        ],
        ["server RSS after each held session sent NOOP", mib(result.after_noop)],
        ["server peak RSS (VmHWM) during the test", mib(result.after_noop or result.held, "VmHWM")],
        [
            "server RSS after all closed",
            f"{mib(result.released)} ({result.release_seconds:.1f} s to close them)",
        ],
        ["client RSS (this process) with them held", common.fmt_mib(result.client_rss)],
    ]
    if result.sessions >= 10000 and "VmRSS" in result.held:
        rss = result.held["VmRSS"] * 1024
        met = "met" if rss < TARGET_BYTES and result.opened == result.sessions else "NOT met"
        rows.append(["issue 6 target: 10 000 held under 2 GB RSS", f"{met} ({rss / 1e9:.2f} GB)"])
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Memory of smtpsvc with many idle SMTP sessions held.")
    p.add_argument("--sessions", type=int, default=10000, help="idle sessions to hold (default 10000)")
    p.add_argument("--ehlo", action="store_true", help="send EHLO on each session before holding it")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight at once (default 200)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to wait before each RSS reading")
    p.add_argument("--max-seconds", type=float, default=600.0, help="time limit of the whole test")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the result as Markdown to FILE")
    args = p.parse_args(argv)
    if not 1 <= args.sessions <= 200000:
        p.error("--sessions must be 1 to 200000")
    if args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "bench/idle.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        limit = common.raise_nofile(args.sessions + EXTRA_FDS)
    except common.LimitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for sig in accept.STOP_SIGNALS:
        signal.signal(sig, accept.on_signal)
    print(f"$ {command}")
    print(f"  open files limit (this process and the server): {limit}; load average {common.load_average()}")
    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-idle-"))
    server = IdleSmtpsvc(tmp, args.sessions)
    result = Result(args.sessions, args.ehlo)
    status = 0
    began = time.monotonic()

    async def bounded() -> None:
        async with asyncio.timeout(args.max_seconds):
            await scenario(server, args, result)

    try:
        server.start()
        print(f"  smtpsvc pid {server.pid} on 127.0.0.1:{server.port}", flush=True)
        common.run_async(accept.interruptible(bounded()))
    except TimeoutError:
        print(f"error: the test did not finish within --max-seconds {args.max_seconds:g}", file=sys.stderr)
        status = 1
    except (compare.BenchError, accept.BenchError) as exc:
        print(f"error: {exc}\nsmtpsvc stderr:\n{server.tail()}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, accept.Stop) as exc:
        print(f"\ninterrupted ({type(exc).__name__} {exc}); stopping", file=sys.stderr)
        status = 130
    finally:
        with common.shielded():  # a second Ctrl-C must not skip the cleanup
            server.stop()
            if args.keep:
                print(f"  kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    if status or not result.held:
        return status or 1
    rows = table(result)
    common.print_rows(rows)
    print(f"\nwall time {time.monotonic() - began:.0f} s; load average at the end {common.load_average()}")
    if args.markdown is not None:
        args.markdown.write_text(
            common.table_section("## Idle sessions (bench/idle.py)", command, rows), encoding="utf-8"
        )
    failed = result.opened != args.sessions or not result.probe_ok or result.noop_ok != result.opened
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
