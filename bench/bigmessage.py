#!/usr/bin/env python3
"""Stream one big message (default 1 GiB) into smtpsvc and watch the server's memory: it must stay flat.

Starts ``python -m smtpsvc serve`` as a separate process on a temporary mailroot (127.0.0.1, port chosen by
the kernel, ``max_message_size`` and ``max_session_size`` raised above the message, ``data_timeout`` 30
minutes), sends a few small messages first (so the baseline includes the code paths), then one message of
--mb MiB. The client generates it on the fly (1000-byte lines, one 1 MB block reused), so neither side needs
to hold it. A thread samples the server's RSS (VmRSS, /proc/<pid>/status) every --interval seconds, and the
exact peak of each phase comes from VmHWM, reset between phases (/proc/<pid>/clear_refs).

Phases: transfer (354 to the final ``.``), commit (the final ``.`` to ``250``: the fsync of the spool file),
delivery (``250`` to delivered), per --deliver:

- ``sink``: relayed by SMTP to ``smtp-sink`` on loopback (the relay path; the default when smtp-sink is
  installed);
- ``drop``: delivered to the Drop folder (a local domain; needs twice the disk);
- ``none``: acceptance only (the smart host is a closed port, so the message stays queued).

Needs max(3 GB, the spool, plus the Drop copy) free in the temp dir, else it says so and skips (exit 0).
The server is stopped by PID and its temporary mailroot, with the spooled message, is removed at the end,
also on an error or Ctrl-C (unless --keep). Every phase is bounded by --max-seconds in all.

    .venv/bin/python bench/bigmessage.py [--mb 1024] [--deliver sink|drop|none] [--markdown FILE] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import accept
import common
import compare

LINE = (b"0123456789abcdefghijklmnopqrstuvwxyz" * 28)[
    :998
] + b"\r\n"  # 1000 bytes, the longest RFC 5321 allows
BLOCK_LINES = 1024  # one write: 1 024 000 bytes
MIN_FREE = 3 * 1000**3
MARGIN = 1024**3
CLOSED_PORT = 9
SENDER = "big@client.test"
WARMUP_MESSAGES = 5
STEP_TIMEOUT = 60.0  # one SMTP reply outside the big transfer


class BigSmtpsvc(compare.Smtpsvc):
    """compare.py's smtpsvc process, with size limits and timeouts for one huge message."""

    def __init__(self, workdir: Path, size: int, deliver: str, sink_port: int) -> None:
        super().__init__(workdir, sink_port)
        self.size = size
        self.deliver = deliver

    def config_text(self) -> str:
        limit = self.size + 64 * common.MIB  # our Received header and the smaller warm-up messages
        smart_host = f"[127.0.0.1]:{self.sink_port if self.deliver == 'sink' else CLOSED_PORT}"
        return "\n".join(
            [
                "[server]",
                'hostname = "bench.test"',
                f"root = {json.dumps(str(self.root))}",
                'listen = ["127.0.0.1:0"]',
                f"max_message_size = {limit}",
                f"max_session_size = {limit}",
                'data_timeout = "30m"',
                'connection_timeout = "30m"',
                "",
                "[domains]",
                'local = ["local.test"]',
                "",
                "[delivery]",
                f'smart_host = "{smart_host}"',
                'retry = ["15m"]',
                'timeout = "30m"',
                'tls = "none"',
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

    @property
    def recipient(self) -> str:
        return "big@local.test" if self.deliver == "drop" else "big@remote.test"


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    peak_kib: int = 0  # VmHWM over the phase (reset at its start); 0 when it could not be reset
    max_sample_kib: int = 0
    end_kib: int = 0
    cpu: float = 0.0  # server CPU seconds


@dataclass
class Result:
    size: int = 0  # bytes sent between 354 and the final dot
    deliver: str = ""
    baseline_kib: int = 0
    phases: list[Phase] = field(default_factory=list)
    delivered: bool = False
    queue_left: int = -1  # files left in queue/ after delivery
    peak_exact: bool = True


class Sampler(threading.Thread):
    """Reads the server's VmRSS every `interval` seconds; max() since the last take()."""

    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.peak = 0
        self.samples = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                rss = common.rss_kib(self.pid)
            except (OSError, KeyError):
                return
            with self.lock:
                self.peak = max(self.peak, rss)
                self.samples += 1

    def take(self) -> int:
        with self.lock:
            peak, self.peak = self.peak, 0
        return peak


def chunks(size: int, recipient: str) -> Iterator[bytes]:
    """The message as DATA lines: headers, then 1000-byte lines up to `size` (rounded down to a line)."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{recipient}>\r\nSubject: {size} bytes\r\n"
        "Message-ID: <big@bench.test>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
    ).encode()
    yield head
    lines = (size - len(head)) // len(LINE)
    block = LINE * BLOCK_LINES
    whole, rest = divmod(lines, BLOCK_LINES)
    for _ in range(whole):
        yield block
    if rest:
        yield LINE * rest


class Phases:
    def __init__(self, server: BigSmtpsvc, sampler: Sampler, result: Result) -> None:
        self.server = server
        self.sampler = sampler
        self.result = result
        self.current: Phase | None = None
        self.started = 0.0
        self.cpu0 = 0.0

    def begin(self, name: str) -> None:
        pid = self.server.pid
        if not common.reset_peak(pid):
            self.result.peak_exact = False
        self.sampler.take()
        self.current = Phase(name)
        self.started = time.monotonic()
        self.cpu0 = common.cpu_seconds(pid)

    def end(self) -> Phase:
        assert self.current is not None
        phase, pid = self.current, self.server.pid
        phase.seconds = time.monotonic() - self.started
        status = common.proc_status(pid)
        phase.end_kib = status["VmRSS"]
        phase.max_sample_kib = max(self.sampler.take(), phase.end_kib)
        phase.peak_kib = status["VmHWM"] if self.result.peak_exact else phase.max_sample_kib
        phase.cpu = common.cpu_seconds(pid) - self.cpu0
        self.result.phases.append(phase)
        self.current = None
        growth = (phase.peak_kib - self.result.baseline_kib) / 1024
        print(
            f"  {phase.name:8} {phase.seconds:7.1f}s  peak RSS {common.fmt_mib(phase.peak_kib)} "
            f"({growth:+.1f} MiB over the baseline), RSS at the end {common.fmt_mib(phase.end_kib)}, "
            f"server CPU {phase.cpu:.1f}s",
            flush=True,
        )
        return phase


async def expect(client: accept.Client, stage: str, code: int, timeout: float = STEP_TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        await client.expect(stage, code)


async def delivered(server: BigSmtpsvc, sink: compare.Sink | None, sink_before: int, size: int) -> bool:
    """Poll (the caller bounds it) until the message reached the sink or a complete Drop file."""
    drop = server.root / "drop"
    while True:
        if sink is not None:
            with sink.cond:
                if sink.count > sink_before:
                    return True
        elif server.deliver == "drop":
            for entry in os.scandir(drop):
                done = entry.name.endswith(".eml") and not entry.name.startswith(".")
                if done and entry.stat().st_size >= size:
                    return True
        await asyncio.sleep(0.1)


def queue_files(server: BigSmtpsvc) -> int:
    try:
        return sum(1 for e in os.scandir(server.root / "queue") if e.name.endswith((".eml", ".env")))
    except FileNotFoundError:
        return -1


async def scenario(
    server: BigSmtpsvc, sink: compare.Sink | None, args: argparse.Namespace, result: Result
) -> None:
    pid = server.pid
    small = accept.Message(1024, server.recipient)
    warm = await accept.run_load(server.port, 1, WARMUP_MESSAGES, 30, small, pid, None)
    if warm.accepted != WARMUP_MESSAGES:
        raise compare.BenchError(
            f"warm-up: {warm.accepted} of {WARMUP_MESSAGES} accepted: {dict(warm.errors)}"
        )
    sink_before = 0
    if sink is not None:  # the warm-up messages must not be taken for the big one at the sink
        if sink.wait_for(WARMUP_MESSAGES, time.monotonic() + STEP_TIMEOUT) is None:
            raise compare.BenchError(f"the {WARMUP_MESSAGES} warm-up messages did not reach smtp-sink")
        with sink.cond:
            sink_before = sink.count
    await asyncio.sleep(2)  # let the server go quiet (Drop deliveries, parked retries)
    result.baseline_kib = common.rss_kib(pid)
    print(f"  baseline: server RSS {common.fmt_mib(result.baseline_kib)}", flush=True)

    sampler = Sampler(pid, args.interval)
    sampler.start()
    phases = Phases(server, sampler, result)
    try:
        client = await accept.Client.connect(server.port)
        client.writer.write(f"MAIL FROM:<{SENDER}> SIZE={args.mb * common.MIB}\r\n".encode())
        await expect(client, "MAIL", 250)
        client.writer.write(f"RCPT TO:<{server.recipient}>\r\n".encode())
        await expect(client, "RCPT", 250)
        client.writer.write(b"DATA\r\n")
        await expect(client, "DATA", 354)
        phases.begin("transfer")
        sent = 0
        for chunk in chunks(args.mb * common.MIB, server.recipient):
            client.writer.write(chunk)
            await client.writer.drain()
            sent += len(chunk)
        result.size = sent
        phases.end()
        phases.begin("commit")
        client.writer.write(b".\r\n")
        await expect(client, "end of DATA", 250, args.max_seconds)
        phases.end()
        await client.quit()
        if server.deliver != "none":
            phases.begin("delivery")
            result.delivered = await delivered(server, sink, sink_before, sent)
            phases.end()
            await asyncio.sleep(1)  # the queue entry goes right after the delivery is recorded
            result.queue_left = queue_files(server)
    finally:
        sampler.stop_event.set()
        sampler.join(5)


def table(result: Result) -> list[list[str]]:
    base = result.baseline_kib
    rows = [
        ["message", f"{result.size} bytes ({result.size / common.MIB:.0f} MiB), 1000-byte lines"],
        [
            "delivery",
            {"sink": "relayed by SMTP to smtp-sink", "drop": "to Drop", "none": "none (queued)"}[
                result.deliver
            ],
        ],
        ["server RSS before (baseline)", common.fmt_mib(base)],
    ]
    for phase in result.phases:
        mb_s = result.size / common.MIB / phase.seconds if phase.seconds > 0 else float("nan")
        rate = f", {mb_s:.0f} MiB/s" if phase.name in ("transfer", "delivery") else ""
        rows.append(
            [
                f"{phase.name}: time, server CPU",
                f"{phase.seconds:.1f} s{rate}, {phase.cpu:.1f} s CPU",
            ]
        )
        rows.append(
            [
                f"{phase.name}: peak server RSS",
                f"{common.fmt_mib(phase.peak_kib)} ({(phase.peak_kib - base) / 1024:+.1f} MiB over baseline)",
            ]
        )
    if result.phases:
        peak = max(p.peak_kib for p in result.phases)
        rows.append(["peak growth over the whole message", f"{(peak - base) / 1024:+.1f} MiB"])
    if result.deliver != "none":
        left = "-" if result.queue_left < 0 else str(result.queue_left)
        rows.append(
            ["delivered; files left in queue/ after", f"{'yes' if result.delivered else 'NO'}; {left}"]
        )
    if not result.peak_exact:
        rows.append(["note", "peaks are the highest 0.1 s samples (VmHWM could not be reset)"])
    return rows


def check_closed_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        if probe.connect_ex(("127.0.0.1", CLOSED_PORT)) == 0:
            raise compare.BenchError(
                f"--deliver none needs 127.0.0.1:{CLOSED_PORT} closed; something listens"
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Stream one big message into smtpsvc; watch its memory.")
    p.add_argument("--mb", type=int, default=1024, help="message size in MiB (default 1024 = 1 GiB)")
    p.add_argument(
        "--deliver",
        choices=("sink", "drop", "none"),
        default="sink" if Path(compare.SMTP_SINK).exists() else "drop",
        help="relay it to smtp-sink (default when installed), deliver it to Drop, or only accept it",
    )
    p.add_argument("--interval", type=float, default=0.1, help="RSS sampling interval in seconds")
    p.add_argument("--max-seconds", type=float, default=900.0, help="time limit of the whole test")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (and the message)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="also write the result as Markdown to FILE")
    args = p.parse_args(argv)
    if not 1 <= args.mb <= 64 * 1024:
        p.error("--mb must be 1 to 65536")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(
        [".venv/bin/python", "bench/bigmessage.py", *(sys.argv[1:] if argv is None else argv)]
    )
    print(f"$ {command}")
    size = args.mb * common.MIB
    tmpdir = Path(tempfile.gettempdir())
    need = max(MIN_FREE, size * (2 if args.deliver == "drop" else 1) + MARGIN)
    free = shutil.disk_usage(tmpdir).free
    if free < need:
        why = f"skipped: {free / 1e9:.1f} GB free in {tmpdir}, {need / 1e9:.1f} GB needed (TMPDIR=elsewhere)"
        print(why)
        if args.markdown is not None:
            args.markdown.write_text(f"## One big message (bench/bigmessage.py)\n\n{why}\n", encoding="utf-8")
        return 0
    for sig in accept.STOP_SIGNALS:
        signal.signal(sig, accept.on_signal)
    tmp = Path(tempfile.mkdtemp(prefix="smtpsvc-big-"))
    sink = compare.Sink(tmp) if args.deliver == "sink" else None
    server = BigSmtpsvc(tmp, size, args.deliver, sink.port if sink is not None else 0)
    result = Result(deliver=args.deliver)
    status = 0
    began = time.monotonic()

    async def bounded() -> None:
        async with asyncio.timeout(args.max_seconds):
            await scenario(server, sink, args, result)

    try:
        if args.deliver == "none":
            check_closed_port()
        if sink is not None:
            sink.start()
        server.start()
        print(
            f"  smtpsvc pid {server.pid} on 127.0.0.1:{server.port}; {free / 1e9:.0f} GB free in {tmpdir}",
            flush=True,
        )
        common.run_async(accept.interruptible(bounded()))
    except TimeoutError:
        print(f"error: not finished within --max-seconds {args.max_seconds:g}", file=sys.stderr)
        status = 1
    except (compare.BenchError, accept.BenchError, accept.ReplyError, OSError, ConnectionError) as exc:
        print(f"error: {type(exc).__name__}: {exc}\nsmtpsvc stderr:\n{server.tail()}", file=sys.stderr)
        status = 1
    except (KeyboardInterrupt, accept.Stop) as exc:
        print(f"\ninterrupted ({type(exc).__name__} {exc}); stopping", file=sys.stderr)
        status = 130
    finally:
        with common.shielded():  # a second Ctrl-C must not skip the cleanup
            server.stop()
            if sink is not None:
                sink.stop()
            if args.keep:
                print(f"  kept {tmp}")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                print(
                    f"  removed {tmp} (mailroot and spooled message): {'FAILED' if tmp.exists() else 'done'}"
                )
    if status or not result.phases:
        return status or 1
    rows = table(result)
    common.print_rows(rows)
    print(f"\nwall time {time.monotonic() - began:.0f} s; load average at the end {common.load_average()}")
    if args.markdown is not None:
        args.markdown.write_text(
            common.table_section("## One big message (bench/bigmessage.py)", command, rows), encoding="utf-8"
        )
    return 0 if result.deliver == "none" or (result.delivered and result.queue_left == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
