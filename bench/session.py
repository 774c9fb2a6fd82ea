#!/usr/bin/env python3
"""CPU cost per SMTP session of the inbound session adapter (listener, Session, Ingest, event log).

Runs the real `SmtpServer`/`Session` in this process on 127.0.0.1 (port chosen by the kernel) with a
minimal config, a `LocalSpool` in a temp dir, an `EventLog` (events.jsonl plus a text copy to /dev/null,
as a service under journald has it) and the metrics hook, and drives it with an in-process asyncio client
doing what Postfix's smtp-source does: one connection per message, greeting, EHLO, MAIL, RCPT, DATA, a
1 KiB body, QUIT, no pipelining; --concurrency connections at a time, --messages in all (after a warm-up).

Prints, for each timed run, the process CPU time per message (`time.process_time`: every thread of this
process, so the client's share is included, and the spool's fsyncs where threads make them; on Linux the
kernel's AIO workers make them, which no process is charged for: queue/fsyncs.py; compare before with
after, not with a separate server), split into user and system time, the event loop thread's share
(`time.thread_time`: server and client, without any fsync thread) and messages per second; then,
from one run under cProfile, the Python calls per message (client included too) and, with --top N, the
functions called most. The machine is noisy: alternate before/after runs; --tmpdir /dev/shm steadies them.

The event loop is uvloop when importable (as `smtpsvc serve` runs), else asyncio; --asyncio forces asyncio.
Every loop is bounded by the message count and each reply wait by a timeout. From the repository root:

    .venv/bin/python bench/session.py [--messages 2000] [--concurrency 10] [--runs 3] [--top 25]
                                      [--tmpdir /dev/shm] [--asyncio]

To measure other code (e.g. a copy of the original src/), put it first on the path:
PYTHONPATH=/tmp/copy/src .venv/bin/python bench/session.py
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import smtpsvc
from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.auth.users import UserStore
from smtpsvc.config import Config, LiveConfig, load_config
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.metrics import Metrics
from smtpsvc.queue.local import LocalSpool, LocalStore
from smtpsvc.server.listener import SmtpServer
from smtpsvc.server.session import SessionContext
from smtpsvc.tls import ServerCertificate

SESSION_TIMEOUT = 30.0  # one session; a stuck server ends the run instead of hanging it
BODY = b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 13  # about 1 KiB, as smtp-source -l 1024
CONFIG = """\
[server]
hostname = "bench.test"
root = "{root}"
listen = ["127.0.0.1:0"]
max_connections = 1000

[domains]
local = ["local.test"]

[admin]
listen = ""
"""


class Client(asyncio.Protocol):
    """The smtp-source side of one connection: sends a command, waits for the complete reply."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.waiter: asyncio.Future[bytes] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        # a reply is complete when its last line ("250 ...", not "250-...") has arrived
        if self.waiter is not None and self.buffer.endswith(b"\r\n"):
            start = self.buffer.rfind(b"\r\n", 0, -2) + 2 if b"\r\n" in self.buffer[:-2] else 0
            if self.buffer[start + 3 : start + 4] != b"-":
                reply, self.buffer = self.buffer, b""
                if not self.waiter.done():
                    self.waiter.set_result(reply)

    def eof_received(self) -> bool | None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("server closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    async def reply(self, expect: bytes, send: bytes = b"") -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        self.data_received(b"")  # a reply that arrived before we asked
        if send:
            assert self.transport is not None
            self.transport.write(send)
        reply = await self.waiter
        if not reply.startswith(expect):
            raise RuntimeError(f"expected {expect!r}, got {reply!r}")


async def one_message(port: int, number: int) -> None:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(Client, "127.0.0.1", port)
    try:
        async with asyncio.timeout(SESSION_TIMEOUT):  # one timeout per session: the client stays cheap
            await client.reply(b"220")
            await client.reply(b"250", b"EHLO client.test\r\n")
            await client.reply(b"250", b"MAIL FROM:<sender@client.test>\r\n")
            await client.reply(b"250", f"RCPT TO:<user{number % 50}@local.test>\r\n".encode())
            await client.reply(b"354", b"DATA\r\n")
            await client.reply(b"250", BODY + b".\r\n")
            await client.reply(b"221", b"QUIT\r\n")
            client.transport.close()  # type: ignore[union-attr]
            await client.closed
    finally:
        assert client.transport is not None
        client.transport.close()


async def drive(server: SmtpServer, messages: int, concurrency: int) -> None:
    port = server.sockets[0][1]
    numbers = iter(range(messages))

    async def worker() -> None:
        for number in numbers:  # bounded: the shared iterator hands out `messages` numbers in all
            await one_message(port, number)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, messages)):
            group.create_task(worker())
    for _ in range(int(SESSION_TIMEOUT * 1000)):  # the server's side ends its lingering closes
        if not server.active_sessions:
            break
        await asyncio.sleep(0.001)


async def start_server(root: Path) -> tuple[SmtpServer, EventLog, LocalSpool]:
    config_file = root / "smtpsvc.toml"
    config_file.write_text(CONFIG.format(root=root / "mailroot"), encoding="utf-8")
    config: Config = load_config(str(config_file), env={})
    (root / "mailroot").mkdir()
    log = EventLog(root / "events.jsonl", stream=open(os.devnull, "w"))  # noqa: SIM115 - closed by close()
    spool = LocalSpool(root / "mailroot" / "queue")
    spool.open()
    store = LocalStore(spool)
    metrics = Metrics(spool.list, spool.get, lambda: spool.frozen_links)
    log.subscribe(metrics.on_event)
    live = LiveConfig(config)
    ingest = Ingest(store, live, log)

    async def etrn(domain: str, subdomains: bool) -> int:
        return 0

    server = SmtpServer(
        SessionContext(
            live=live,
            ingest=ingest,
            events=log,
            certificate=ServerCertificate(config.tls.cert, config.tls.key),
            users=UserStore(),
            limiter=AuthLimiter(),
            etrn=etrn,
            metrics=metrics,
        )
    )
    await server.start()
    return server, log, spool


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="smtpsvc-bench-session-", dir=args.tmpdir) as tmp:
        server, log, spool = await start_server(Path(tmp))
        try:
            await drive(server, args.warmup, args.concurrency)
            results: list[tuple[float, float]] = []
            for run in range(args.runs):
                cpu, loop_cpu, times = time.process_time(), time.thread_time(), os.times()
                wall = time.perf_counter()
                await drive(server, args.messages, args.concurrency)
                cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
                wall = time.perf_counter() - wall
                user, system = os.times().user - times.user, os.times().system - times.system
                results.append((cpu, loop_cpu))
                per = 1e6 / args.messages
                print(
                    f"run {run + 1}: {cpu * per:5.0f} µs CPU/message ({user * per:.0f} user + "
                    f"{system * per:.0f} system; event loop thread {loop_cpu * per:.0f}), "
                    f"{args.messages / wall:5.0f} messages/s ({wall:.2f} s wall)"
                )
            if results:
                cpus, loops = sorted(r[0] for r in results), sorted(r[1] for r in results)
                print(
                    f"median {cpus[len(cpus) // 2] * 1e6 / args.messages:.0f} µs CPU per message, "
                    f"{loops[len(loops) // 2] * 1e6 / args.messages:.0f} µs in the event loop thread"
                )
            profile = cProfile.Profile()
            profile.enable()
            await drive(server, args.profile_messages, args.concurrency)
            profile.disable()
            stats = pstats.Stats(profile)
            print(f"{stats.total_calls / args.profile_messages:.0f} Python calls per message (cProfile)")  # type: ignore[attr-defined]
            if args.top:
                top(stats, args.top, args.profile_messages)
        finally:
            await server.stop(grace=1)
            log.close()
            spool.close()


def top(stats: pstats.Stats, count: int, messages: int) -> None:
    table: dict[tuple[str, int, str], tuple[int, int, float, float, dict[Any, Any]]]
    table = stats.stats  # type: ignore[attr-defined]
    rows = sorted(table.items(), key=lambda item: -item[1][1])[:count]
    for (filename, line, name), (_, calls, tottime, _, _) in rows:
        where = filename.rsplit("/", 2)
        print(
            f"{calls / messages:8.1f} calls  {tottime / messages * 1e6:6.1f} µs  "
            f"{'/'.join(where[-2:])}:{line}({name})"
        )


def run(coro: Coroutine[Any, Any, None], use_asyncio: bool) -> None:
    runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    if not use_asyncio:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            runner = uvloop.run
    loop = "asyncio" if runner is asyncio.run else "uvloop"
    print(f"smtpsvc from {Path(smtpsvc.__file__).parent}; loop: {loop}")
    runner(coro)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=2000, help="messages per timed run")
    parser.add_argument("--concurrency", type=int, default=10, help="connections at a time")
    parser.add_argument("--runs", type=int, default=3, help="timed runs (the median is printed)")
    parser.add_argument("--warmup", type=int, default=200, help="messages before the timed runs")
    parser.add_argument("--profile-messages", type=int, default=500, help="messages in the cProfile run")
    parser.add_argument("--top", type=int, default=0, help="print the N functions called most")
    parser.add_argument("--tmpdir", help="where the spool goes (e.g. /dev/shm: no fsync noise)")
    parser.add_argument("--asyncio", action="store_true", help="asyncio's event loop even with uvloop")
    run(main(parser.parse_args()), parser.parse_args().asyncio)
