#!/usr/bin/env python3
"""CPU per delivered message of the outbound delivery path, in process, against a fake smtp-sink.

Two cases, each over one connection that the smart host's destination hands from message to message (as
the service's main process delivers to its smart host):

- ``deliver``: `SmtpTransport.deliver()` of one 1 KiB message to one recipient, N times in a row (the
  cached session, MAIL, RCPT and DATA pipelined, the dot-stuffed body, the final reply, the results, the
  transcript, the session back to its destination);
- ``process``: `Scheduler.process()` of N fresh envelopes (routing to the smart host, the delivery above,
  the per-recipient results and events, completion). The queue is the local spool's `LocalStore` with its
  I/O taken out (the message comes from memory; save and complete do nothing), the event log writes
  nowhere (JSON lines are still built), and no metrics observer is set.

The peer is an asyncio server on 127.0.0.1 in the same process that answers like Postfix's smtp-sink: 220,
EHLO with PIPELINING, 8BITMIME and SIZE, 250 to MAIL and RCPT, 354 to DATA, 250 after the final dot.

Printed per case: µs of process CPU (`time.process_time`) per message, best of --runs runs of --messages
messages, and Python function calls per message, from one more run under cProfile. The fake peer's own CPU
(about a third of the total) is included in both figures: compare before and after, not with anything else.
Runs on uvloop when it is importable, as the service does. Deterministic: fixed message, fixed counts, no
randomness; each run is bounded by --messages.

    .venv/bin/python bench/client.py [--messages 3000] [--runs 3] [--cases deliver,process]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import common
from smtpsvc.config import Config, LiveConfig, load_config
from smtpsvc.delivery.drop import DropTransport
from smtpsvc.delivery.reports import Reporter
from smtpsvc.delivery.scheduler import Scheduler
from smtpsvc.delivery.smtp import SmtpTransport
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.model import Envelope, Recipient
from smtpsvc.queue.local import LocalSpool, LocalStore
from smtpsvc.routing.categorizer import choices_for
from smtpsvc.routing.mx import MxResolver

CASES = ("deliver", "process")
MESSAGE_SIZE = 1024
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@remote.test"
DELIVER_TIMEOUT = 30.0
CASE_TIMEOUT = 600.0  # a run that takes longer than this is stuck: give up rather than hang


def make_message(size: int = MESSAGE_SIZE) -> bytes:
    """A CRLF-normalised message of exactly `size` octets: headers, then 70-column body lines."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench\r\nMessage-ID: <bench@bench.test>\r\n\r\n"
    ).encode("ascii")
    line = b"x" * 68 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    message = head + body[: size - len(head) - 2] + b"\r\n"
    assert len(message) == size
    return message


class FakeSink:
    """An SMTP peer that answers like smtp-sink and keeps nothing (it only counts the messages)."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.messages = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink.test ESMTP\r\n")
        buf = b""
        in_data = False
        try:
            while chunk := await reader.read(65536):
                buf += chunk
                out: list[bytes] = []
                while True:
                    if in_data:
                        end = buf.find(b"\r\n.\r\n")
                        if end < 0:
                            buf = buf[-4:]  # enough to find a terminator split across reads
                            break
                        buf = buf[end + 5 :]
                        in_data = False
                        self.messages += 1
                        out.append(b"250 2.0.0 Ok: queued as BENCH\r\n")
                        continue
                    lf = buf.find(b"\n")
                    if lf < 0:
                        break
                    verb = buf[:4].upper()
                    buf = buf[lf + 1 :]
                    if verb == b"EHLO":
                        out.append(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
                    elif verb == b"DATA":
                        out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                        # The data starts right after the command: a virtual CRLF before it lets an empty
                        # message (".\r\n" at once) end it too.
                        buf = b"\r\n" + buf
                        in_data = True
                    elif verb == b"QUIT":
                        out.append(b"221 2.0.0 Bye\r\n")
                    else:  # MAIL, RCPT, RSET, NOOP, HELO
                        out.append(b"250 2.0.0 Ok\r\n")
                if out:
                    writer.write(b"".join(out))
        except ConnectionError:
            pass
        finally:
            writer.close()


class MemoryMessage:
    """The message as a transport reads it (`MessageSource`), from memory."""

    def __init__(self, message: bytes) -> None:
        self.message = message

    async def open(self) -> BinaryIO:
        return io.BytesIO(self.message)

    async def xexch50(self) -> bytes | None:
        return None


async def bench_deliver(port: int, message: bytes, count: int) -> None:
    """`count` deliveries of `message` over one cached connection (opened before the first one counts)."""
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        config = bench_config(Path(tmp), port)
        transport = SmtpTransport(LiveConfig(config), MxResolver(), EventLog(None, stream=None))
        route = choices_for(RECIPIENT, config)[0]
        envelope = Envelope("bench", SENDER, [Recipient(RECIPIENT)], time.time(), size=len(message))
        source = MemoryMessage(message)
        try:
            for _ in range(count):
                outcome = await transport.deliver(route, envelope, envelope.recipients, source)
                if not outcome.results[0].ok:
                    raise RuntimeError(f"delivery failed: {outcome.results[0].reply}")
        finally:
            await transport.close()


class MemoryStore(LocalStore):
    """The local spool's store without its I/O: what the scheduler reads and writes per message only."""

    def __init__(self, root: Path, message: bytes) -> None:
        super().__init__(LocalSpool(root), "bench")
        self.message = message
        self.completed = 0

    async def open_message(self, queue_id: str) -> BinaryIO:
        return io.BytesIO(self.message)

    async def save(self, envelope: Envelope) -> None:
        raise RuntimeError(f"message {envelope.id} was not delivered: {envelope.recipients[0].last_reply}")

    async def complete(self, queue_id: str) -> None:
        self.completed += 1

    async def frozen_links(self) -> frozenset[str]:
        return frozenset()


def bench_config(root: Path, port: int) -> Config:
    path = root / "bench.toml"
    path.write_text(
        f'[server]\nhostname = "client.bench.test"\nroot = "{root / "mailroot"}"\n\n'
        f'[delivery]\nsmart_host = "[127.0.0.1]:{port}"\nmax_messages_per_connection = 1000000\n',
        encoding="utf-8",
    )
    return load_config(str(path), env={})


async def bench_process(port: int, message: bytes, count: int) -> None:
    """`Scheduler.process()` of `count` new envelopes, one after the other, over one pooled connection."""
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        root = Path(tmp)
        config = bench_config(root, port)
        store = MemoryStore(root / "queue", message)
        event_log = EventLog(None, stream=None)
        live = LiveConfig(config)
        reports = Reporter(store, live, Ingest(store, live, event_log), event_log, root / "badmail")
        transports = {
            "drop": DropTransport(root / "drop"),
            "smtp": SmtpTransport(live, MxResolver(), event_log),
        }
        scheduler = Scheduler(store, live, reports, event_log, transports)
        now = time.time()
        envelopes = [
            Envelope(f"bench{i}", SENDER, [Recipient(RECIPIENT)], now, size=len(message))
            for i in range(count)
        ]
        try:
            for envelope in envelopes:
                await scheduler.process(envelope)
        finally:
            for transport in transports.values():
                await transport.close()
        if store.completed != count:
            raise RuntimeError(f"{store.completed} of {count} messages completed")


Case = Callable[[int, bytes, int], Awaitable[None]]


async def measure(case: Case, messages: int, runs: int) -> tuple[float, float]:
    """(best µs of process CPU per message, Python calls per message under cProfile)."""
    sink = FakeSink()
    await sink.start()
    message = make_message()
    try:
        await asyncio.wait_for(case(sink.port, message, 50), CASE_TIMEOUT)  # warm-up: imports, caches
        best = float("inf")
        for _ in range(runs):
            start = time.process_time()
            await asyncio.wait_for(case(sink.port, message, messages), CASE_TIMEOUT)
            best = min(best, time.process_time() - start)
        profile = cProfile.Profile()
        profile.enable()
        try:
            await asyncio.wait_for(case(sink.port, message, messages), CASE_TIMEOUT)
        finally:
            profile.disable()
    finally:
        await sink.stop()
    calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
    return best / messages * 1e6, calls / messages


async def main_async(cases: Sequence[str], messages: int, runs: int) -> None:
    functions: dict[str, Case] = {"deliver": bench_deliver, "process": bench_process}
    loop = "uvloop" if common.uvloop_version() is not None else "asyncio"
    print(
        f"{messages} messages of {MESSAGE_SIZE} octets, best of {runs} runs, {loop}, fake peer CPU included"
    )
    print(f"{'case':<10} {'µs CPU/msg':>11} {'calls/msg':>10}")
    for name in cases:
        cpu, calls = await measure(functions[name], messages, runs)
        print(f"{name:<10} {cpu:>11.1f} {calls:>10.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=3000, help="messages per run (default 3000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case, the best counts (3)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or args.messages < 1 or args.runs < 1:
        parser.error(f"unknown case(s) {unknown}" if unknown else "--messages and --runs must be >= 1")
    common.run_async(main_async(cases, args.messages, args.runs))


if __name__ == "__main__":
    main()
