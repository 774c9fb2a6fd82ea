"""SMTP worker processes (`server.workers` > 1; "auto", the default, is one per core): more cores for
receiving mail.

One Python process runs one event loop, so one core. With `server.workers = N` the service starts N
worker processes that accept SMTP on the `server.listen` addresses (SO_REUSEPORT: the kernel spreads new
connections over the listeners) and commit each message into the shared `queue/` with the spool's own
protocol (`queue/intake.py`): the 250 still means "fsynced". The main process binds those addresses too,
so that they stay reserved while workers come and go, but never listens on them: it keeps everything else,
the spool lock and index, delivery, Pickup, the admin API (delivery alone is about a third of the CPU a
message costs, docs/performance.md). The socket pair between them carries, one line each:
- main -> worker, first: `S <slot>` with the descriptor of the table of open sessions (`server/counts.py`,
  so that `server.max_connections` is the service's limit);
- worker -> main: `READY` once it listens; `Q <id>` for each new message; ETRN `E <n> <domain> <0|1>`,
  answered `R <n> <count>`; AUTH `A <n> c|f <ip>` (check before an attempt, count a failure), answered
  `a <n> <blocked 0|1> <delay>`, and `A 0 s <ip>` (a success): the service has one failure limiter, the
  main process's; without an answer in AUTH_TIMEOUT the worker's own count of the same attempts answers;
- main -> worker: `M <n>` at a /metrics scrape, answered `m <n> <JSON samples>`: the worker's SMTP counters
  (its own `Metrics`), added up by the main process (`Metrics.render`).
The workers' events are written by each worker to `log/events.jsonl` (O_APPEND), flushed every second as
the main process's are.

A worker that dies is restarted after a second; what it had committed is found by the main process's
periodic rescan. Once the workers run, the main process's event loop lowers its CPU priority by
`server.delivery_nice` (0 by default: no change): when the CPU is short, receiving goes first. Workers are
forked from a thread made before that, so a restarted one keeps the receiving priority. The main process
stops its workers with SIGTERM (they give 421 and finish what they were committing) and passes SIGHUP on;
a worker starts with SIGHUP blocked until its handler is in place, so one passed on while it starts is not
its end. A worker whose main process died (its socket pair closes) finishes the same way, logs event 9003
(cause `main-process-gone`) and exits 0; until it has, no new start recovers the queue
(queue/.workers.lock).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpsvc import cmdconfig, events, gctune
from smtpsvc.auth import limiter as auth_limiter
from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.backends import open_intake
from smtpsvc.config import Config, LiveConfig, format_listen
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.metrics import Metrics, WorkerSamples
from smtpsvc.protolog import ProtocolLog
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.local import LocalSpool
from smtpsvc.receiving import (
    ReceivingError,
    open_protocol_log,
    reload_receiving,
    session_context,
    sessions_resolver,
)
from smtpsvc.server.counts import SessionCounts
from smtpsvc.server.listener import SmtpServer
from smtpsvc.server.session import SessionContext
from smtpsvc.supervise import Supervisor

RESTART_DELAY = 1.0
RESCAN_INTERVAL = 30.0
ETRN_TIMEOUT = 30.0
AUTH_TIMEOUT = 5.0  # the main process's limiter; past it, the worker's own count answers
METRICS_TIMEOUT = 2.0  # a scrape waits this long for the workers' counters, then uses the last ones
CHANNEL_DRAIN = 1.0  # after a worker exited: how long its last lines may take to be read
CHANNEL_LIMIT = 1 << 20  # one line of the socket pair at most (a worker's counters)
STOP_GRACE = 10.0


# --------------------------------------------------------------------------------------- main process


class WorkerPool:
    """The main process's side: starts, watches, restarts, reloads and stops the workers."""

    def __init__(
        self,
        count: int,
        config_path: str | None,
        root: Path,
        spool: LocalSpool,
        event_log: EventLog,
        wake: Callable[[], None],
        etrn: Callable[[str, bool], Awaitable[int]],
        supervisor: Supervisor,
        limiter: Callable[[], AuthLimiter] | None = None,
    ) -> None:
        self.count = count
        self.config_path = config_path
        self.root = root
        self.spool = spool
        self.events = event_log
        self._wake = wake
        self._etrn = etrn
        self._supervisor = supervisor  # a keeper that fails is restarted: its slot never stays empty
        self._procs: dict[int, WorkerProcess] = {}
        self._received: dict[int, int] = {}  # slot -> messages its workers committed (for /healthz)
        self._ready: set[int] = set()  # slots whose current worker listens
        self._all_ready = asyncio.Event()  # set once every slot has had a worker listening
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        own = AuthLimiter()
        # The one AUTH failure limiter of the service (read at each request: a reload may replace it)
        self._limiter = limiter or (lambda: own)
        self.counts = SessionCounts.create(count)  # every worker's open sessions (max_connections)
        self._writers: dict[int, asyncio.StreamWriter] = {}  # slot -> its socket pair, once READY
        self._numbers = itertools.count(1)
        self._scrapes: dict[int, asyncio.Future[list[Any]]] = {}
        self._samples: dict[int, list[Any]] = {}  # slot -> its worker's last counters
        self._retired = WorkerSamples()  # the counters of workers that exited (a counter never goes back)
        # Workers are started from this thread, made now, while the main thread still has the priority
        # they must have: a child takes the nice value of the thread that forks it, and the main thread
        # lowers its own afterwards (`lower_delivery_priority`), which a process cannot undo unprivileged.
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="smtpsvc-spawner")
        # A worker starts with SIGHUP blocked (a signal mask survives fork and exec): a reload passed on
        # while it starts waits until its handler is in place (`run_worker`), instead of killing it.
        self._spawner.submit(_block_sighup).result()

    async def start(self, addresses: Sequence[tuple[str, int]]) -> None:
        for slot in range(1, self.count + 1):
            keep = functools.partial(self._keep, slot, list(addresses))
            self._tasks.append(self._supervisor.start(f"smtp-worker-{slot}", keep))
        self._tasks.append(self._supervisor.start("worker-rescan", self._rescan))

    async def wait_ready(self, timeout: float) -> bool:
        """Whether every worker listens within `timeout` seconds (the service announces its start after)."""
        try:
            await asyncio.wait_for(self._all_ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> list[dict[str, int]]:
        """Per worker: its pid and how many messages it committed (since the main process started)."""
        return [
            {
                "slot": slot,
                "pid": proc.pid,
                "ready": int(slot in self._ready),
                "messages": self._received.get(slot, 0),
            }
            for slot, proc in sorted(self._procs.items())
        ]

    async def _keep(self, slot: int, addresses: list[tuple[str, int]]) -> None:
        """Run worker `slot` until the pool stops, restarting it when it dies."""
        left = self._procs.pop(slot, None)
        if left is not None:  # this keeper failed while its worker ran (supervised): one worker a slot
            with contextlib.suppress(ProcessLookupError):
                left.send_signal(signal.SIGTERM)
            await left.wait()
        while not self._stopping:
            try:
                proc, channel = await self._spawn(slot, addresses)
            except OSError as exc:
                self._event(f"SMTP worker {slot} cannot be started: {exc}", "worker-failed")
                await asyncio.sleep(RESTART_DELAY)
                continue
            self._procs[slot] = proc
            code = await proc.wait()
            # What it wrote before it exited (its last counters at a stop) is read to the end first.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(channel), CHANNEL_DRAIN)
            channel.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await channel
            self._procs.pop(slot, None)
            self._ready.discard(slot)
            self._writers.pop(slot, None)
            self.counts.clear(slot)  # its sessions ended with it
            self._retired.add(self._samples.pop(slot, []), counters_only=True)
            await self.spool.rescan()  # what it committed before its notice was lost
            self._wake()
            if self._stopping:
                return
            self._event(f"SMTP worker {slot} (pid {proc.pid}) exited with {code}; restarting", "worker-exit")
            await asyncio.sleep(RESTART_DELAY)

    async def _spawn(
        self, slot: int, addresses: list[tuple[str, int]]
    ) -> tuple[WorkerProcess, asyncio.Task[None]]:
        ours, theirs = socket.socketpair()
        args = worker_command(theirs.fileno(), self.root, self.config_path, addresses)

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))

        spawned = asyncio.get_running_loop().run_in_executor(self._spawner, start)
        try:
            popen = await asyncio.shield(spawned)
        except asyncio.CancelledError:  # stopped meanwhile: what the thread starts is stopped again
            ours.close()
            spawned.add_done_callback(_kill_started)
            raise
        except OSError:
            ours.close()
            raise
        finally:
            spawned.add_done_callback(lambda f: theirs.close())  # once Popen has passed it on
        proc = WorkerProcess(popen)
        # Its slot and the table of open sessions, before anything else on the socket pair (if it died at
        # once, `_keep` sees it exit).
        with contextlib.suppress(OSError):
            socket.send_fds(ours, [f"S {slot}\n".encode("ascii")], [self.counts.fd])
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=CHANNEL_LIMIT)
        channel = asyncio.get_running_loop().create_task(self._serve(slot, reader, writer))
        return proc, channel

    def lower_delivery_priority(self, steps: int) -> None:
        """Lower the CPU priority (raise the nice value) of the calling thread, the main process's event
        loop that delivers, by `steps` below the workers'; threads it starts afterwards inherit it. Only
        on Linux, where a thread has a nice value of its own; a refusal leaves the priority as it was."""
        if steps <= 0 or not sys.platform.startswith("linux"):
            return
        thread = threading.get_native_id()
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + steps))

    async def _serve(self, slot: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One worker's notices and requests."""
        try:
            while line := await reader.readline():
                parts = line.decode("ascii", "replace").split()
                if parts == ["READY"]:
                    self._writers[slot] = writer
                    self._ready.add(slot)
                    if len(self._ready) == self.count:
                        self._all_ready.set()
                elif len(parts) == 2 and parts[0] == "Q":
                    self._received[slot] = self._received.get(slot, 0) + 1
                    if self.spool.adopt_new(parts[1]) is not None:
                        self._wake()
                elif len(parts) == 4 and parts[0] == "E":
                    count = await self._etrn_count(parts[2], parts[3] == "1")
                    writer.write(f"R {parts[1]} {count}\n".encode())
                elif len(parts) == 4 and parts[0] == "A":
                    answer = self._auth(parts[2], "" if parts[3] == "-" else parts[3])
                    if answer:
                        writer.write(f"a {parts[1]} {answer}\n".encode())
                elif len(parts) >= 2 and parts[0] == "m":
                    self._scraped(slot, parts[1], line)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _auth(self, op: str, ip: str) -> str:
        """A worker's AUTH question to the service's limiter: c(heck), f(ailed) or s(ucceeded); the answer
        is "<blocked 0|1> <delay>", none for a success."""
        limiter, now = self._limiter(), time.monotonic()
        if op == "s":
            limiter.record_success(ip, now)
            return ""
        if op == "c":
            blocked, delay = auth_limiter.check(limiter, ip, now)
        else:
            blocked, delay = auth_limiter.failed(limiter, ip, now), 0.0
        return f"{int(blocked)} {delay:g}"

    def _scraped(self, slot: int, number: str, line: bytes) -> None:
        try:
            samples = json.loads(line.split(b" ", 2)[2])
        except (IndexError, ValueError):
            samples = None
        waiting = self._scrapes.get(int(number)) if number.isdigit() else None
        if isinstance(samples, list):
            self._samples[slot] = samples
            if waiting is not None and not waiting.done():
                waiting.set_result(samples)

    async def metric_samples(self) -> WorkerSamples:
        """The workers' SMTP counters for /metrics: asked of each worker now (at most METRICS_TIMEOUT
        seconds; a worker that does not answer counts with its last answer), plus those of workers that
        exited."""
        asked = []
        for writer in list(self._writers.values()):
            number = next(self._numbers)
            answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
            self._scrapes[number] = answer
            asked.append((number, answer))
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):
                writer.write(f"M {number}\n".encode("ascii"))
        if asked:
            await asyncio.wait([answer for _, answer in asked], timeout=METRICS_TIMEOUT)
        for number, _ in asked:
            self._scrapes.pop(number, None)
        total = WorkerSamples()
        total.add(self._retired.items())
        for samples in self._samples.values():
            total.add(samples)
        return total

    async def _etrn_count(self, domain: str, subdomains: bool) -> int:
        try:
            return await self._etrn(domain, subdomains)
        except QueueError:
            return -1

    async def _rescan(self) -> None:
        while True:
            await asyncio.sleep(RESCAN_INTERVAL)
            if await self.spool.rescan():
                self._wake()

    def reload(self) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    async def stop(self) -> None:
        self._stopping = True
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in list(self._procs.values()):
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE + 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._spawner.shutdown(wait=False)
        self.counts.close()
        await self.spool.rescan()

    def _event(self, text: str, cause: str) -> None:
        self.events.emit(events.Event(events.SERVICE_STARTED, text, cause=cause))


def worker_command(
    fd: int, root: Path, config_path: str | None, addresses: Sequence[tuple[str, int]]
) -> list[str]:
    """How the main process starts a worker: `python -m smtpsvc serve --worker-fd N ...`, which
    `smtpsvc/__main__.py` hands to `worker_main` (read by `parse_worker_args`), not to the command line."""
    args = [sys.executable, "-m", "smtpsvc", "serve", "--worker-fd", str(fd), "--root", str(root)]
    if config_path:
        args += ["-c", config_path]
    for address in addresses:
        args += ["--listen", format_listen(address)]
    return args


def _block_sighup() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})


def _kill_started(spawned: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    if not spawned.cancelled() and spawned.exception() is None:
        spawned.result().kill()


class WorkerProcess:
    """A worker process as the pool sees it: its pid, signals, and an awaitable exit (a pidfd watched by
    the event loop where the system has them, else a thread blocked in waitpid)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)  # a no-op once it has exited (Popen polls first)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    async def wait(self) -> int:
        if self._popen.returncode is not None:
            return self._popen.returncode
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):  # not Linux 5.3+, or the process is gone already
            return await loop.run_in_executor(None, self._popen.wait)
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # a pidfd becomes readable when its process exits
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return self._popen.wait()  # it has exited: this only reaps it


# ------------------------------------------------------------------------------------- worker process


class MasterChannel:
    """The worker's side of the socket pair. Once the main process is gone (`run` has returned), nothing
    more is written: the notices are dropped (the next start's recovery finds those messages in queue/)
    and ETRN is answered as a queue that cannot be searched."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, metrics: Metrics | None = None
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._metrics = metrics  # this worker's SMTP counters, sent when the main process asks (/metrics)
        self._numbers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._auth_waiting: dict[int, asyncio.Future[tuple[bool, float] | None]] = {}
        # The answer when the main process does not (gone, or too slow): this worker's own count
        self._own_limiter = AuthLimiter()
        self._notices: list[bytes] = []  # Q lines not written yet
        self.gone = False  # the main process closed its end (it died, or was killed)

    def _write(self, data: bytes) -> None:
        if not self.gone and not self._writer.is_closing():
            self._writer.write(data)

    def ready(self) -> None:
        self._write(b"READY\n")

    def queued(self, queue_id: str) -> None:
        # The messages of one group commit are announced in one write (one wake-up of the main process),
        # at the end of this turn of the event loop.
        if not self._notices:
            asyncio.get_running_loop().call_soon(self._send_notices)
        self._notices.append(f"Q {queue_id}\n".encode("ascii"))

    def _send_notices(self) -> None:
        if self._notices:
            self._write(b"".join(self._notices))
            self._notices.clear()

    async def close(self) -> None:
        """At the stop: the last notices out (the main process rescans anyway when we exit), and the last
        counters, which the main process keeps counted once we are gone."""
        self._send_notices()
        self._metrics_asked("0")
        if not self.gone:
            with contextlib.suppress(ConnectionError, OSError, RuntimeError):  # it may go meanwhile
                await self._writer.drain()

    async def etrn(self, domain: str, subdomains: bool) -> int:
        if self.gone:
            raise QueueError("the main process is gone")
        number = next(self._numbers)
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        self._write(f"E {number} {domain} {int(subdomains)}\n".encode("ascii", "replace"))
        try:
            count = await asyncio.wait_for(answer, ETRN_TIMEOUT)
        except TimeoutError:
            raise QueueError("the main process did not answer the ETRN") from None
        finally:
            self._waiting.pop(number, None)
        if count < 0:
            raise QueueError("the queue could not be searched")
        return count

    # -- AuthGate (auth/limiter.py): the service's one limiter is the main process's
    async def check(self, ip: str) -> tuple[bool, float]:
        own = auth_limiter.check(self._own_limiter, ip, time.monotonic())
        return await self._ask_auth("c", ip) or own

    async def failed(self, ip: str) -> bool:
        own = auth_limiter.failed(self._own_limiter, ip, time.monotonic())
        answer = await self._ask_auth("f", ip)
        return own if answer is None else answer[0]

    def succeeded(self, ip: str) -> None:
        self._own_limiter.record_success(ip, time.monotonic())
        self._write(f"A 0 s {ip or '-'}\n".encode("ascii", "replace"))

    async def _ask_auth(self, op: str, ip: str) -> tuple[bool, float] | None:
        if self.gone:
            return None
        number = next(self._numbers)
        answer: asyncio.Future[tuple[bool, float] | None] = asyncio.get_running_loop().create_future()
        self._auth_waiting[number] = answer
        self._write(f"A {number} {op} {ip or '-'}\n".encode("ascii", "replace"))
        try:
            return await asyncio.wait_for(answer, AUTH_TIMEOUT)
        except TimeoutError:
            return None
        finally:
            self._auth_waiting.pop(number, None)

    def _metrics_asked(self, number: str) -> None:
        samples = [] if self._metrics is None else self._metrics.samples()
        self._write(f"m {number} {json.dumps(samples, separators=(',', ':'))}\n".encode())

    async def run(self) -> None:
        """Read answers until the main process goes away."""
        try:
            with contextlib.suppress(ConnectionError, OSError):
                while line := await self._reader.readline():
                    parts = line.decode("ascii", "replace").split()
                    if len(parts) == 3 and parts[0] == "R":
                        waiting = self._waiting.get(int(parts[1]))
                        if waiting is not None and not waiting.done():
                            waiting.set_result(int(parts[2]))
                    elif len(parts) == 4 and parts[0] == "a":
                        asked = self._auth_waiting.get(int(parts[1]))
                        if asked is not None and not asked.done():
                            asked.set_result((parts[2] == "1", float(parts[3])))
                    elif len(parts) == 2 and parts[0] == "M":
                        self._metrics_asked(parts[1])
        finally:
            self.gone = True
            for asked in self._auth_waiting.values():
                if not asked.done():
                    asked.set_result(None)
            for waiting in self._waiting.values():  # an ETRN under way gets its answer now
                if not waiting.done():
                    waiting.set_result(-1)


def run_worker(config: Config, config_path: str | None, fd: int) -> int:
    """`smtpsvc serve --worker-fd N` (started by the main process, never by hand)."""

    async def main() -> int:
        root = Path(config.server.root)
        log = EventLog(root / "log" / "events.jsonl", stream=sys.stderr)
        parent = os.getppid()  # the main process, for the event if it dies first
        sock = socket.socket(fileno=fd)
        counts = _receive_counts(sock)
        metrics = Metrics()  # the SMTP counters of this worker's sessions, added up by the main process
        log.subscribe(metrics.on_event)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=CHANNEL_LIMIT)
        channel = MasterChannel(reader, writer, metrics)
        live = LiveConfig(config)  # what this worker's parts read; its SIGHUP swaps it
        try:
            store = open_intake(config, channel.queued)
            store.spool.space.report = lambda full, text: log.emit(events.disk_space_event(full, text))
            plog = open_protocol_log(config, log, rotate=False)  # the main process rotates it
            context = session_context(
                live,
                Ingest(store, live, log),
                log,
                config_path=config_path,
                etrn=channel.etrn,
                resolver=sessions_resolver(config),
                protocol_log=plog,
                metrics=metrics,
            )
            context.auth_gate = channel
        except (QueueError, ReceivingError) as exc:
            log.emit(events.Event(events.MAILROOT_UNUSABLE, f"SMTP worker: {exc}", cause="worker-failed"))
            log.close()
            return 1
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Before READY: the main process may stop us the moment it reads it.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        # Ctrl-C reaches the whole process group; the main process stops us in order (SIGTERM), and a
        # worker leaving on its own would look like a crash to be restarted.
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(live, context, log, config_path))
        # Blocked since the pool started us (and `__main__`'s first lines): one sent meanwhile is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        smtp = SmtpServer(context, reuse_port=True)
        smtp.shared = counts
        await smtp.start(config.server.listen)
        gctune.after_start()
        channel.ready()
        listener = loop.create_task(channel.run())
        listener.add_done_callback(lambda _: stop.set())  # the main process is gone: so are we
        flusher = loop.create_task(_flush_every_second(log, plog))
        await stop.wait()
        if channel.gone:  # its end closed: the main process died (it stops us with SIGTERM, and waits)
            log.emit(orphaned_event(os.getpid(), parent))
            log.flush()
        await smtp.stop(grace=STOP_GRACE)
        await store.spool.drain()
        await channel.close()
        flusher.cancel()
        listener.cancel()
        if plog is not None:
            plog.close()
        log.close()
        return 0

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


@dataclass(frozen=True)
class WorkerArgs:
    """What `worker_command` passes to a worker (the options of `smtpsvc serve` it uses)."""

    fd: int
    root: str | None = None
    config_file: str | None = None
    listen: tuple[str, ...] = ()


def parse_worker_args(args: Sequence[str]) -> WorkerArgs:
    """`serve`'s options as `worker_command` writes them (`--worker-fd N`, `--root DIR`, `-c`/`--config
    FILE`, `--listen HOST:PORT`...; also `--option=value`). Raises ValueError naming what is wrong."""
    values: dict[str, list[str]] = {"--worker-fd": [], "--root": [], "--config": [], "--listen": []}
    rest = list(args)
    while rest:
        option = rest.pop(0)
        name, equals, value = option.partition("=")
        name = "--config" if name == "-c" else name
        if name not in values:
            raise ValueError(f"no such option for an SMTP worker: {option}")
        if not equals:
            if not rest:
                raise ValueError(f"option {option} requires a value")
            value = rest.pop(0)
        values[name].append(value)
    fds = values["--worker-fd"]
    if not fds or not fds[-1].isdigit():
        raise ValueError("--worker-fd requires a number: the descriptor of the main process's socket pair")
    last = {name: found[-1] for name, found in values.items() if found}  # as click: the last one wins
    return WorkerArgs(int(fds[-1]), last.get("--root"), last.get("--config"), tuple(values["--listen"]))


def worker_main(args: Sequence[str]) -> int:
    """`python -m smtpsvc serve --worker-fd N ...` (started by the main process, never by hand): the same
    configuration as `smtpsvc serve` would load from these options, and `run_worker`, without importing
    the command line. Exit codes as `serve`'s: 2 for a usage or configuration error, 1 when the worker
    cannot start, 0 after a stop."""
    try:
        options = parse_worker_args(args)
    except ValueError as exc:
        print(f"smtpsvc serve: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        path = cmdconfig.config_path(options.config_file)
        return run_worker(cmdconfig.load(path, options.root, options.listen), path, options.fd)
    except KeyboardInterrupt:  # Ctrl-C before its event loop ignores it: ends as the command line would
        print("Aborted!", file=sys.stderr, flush=True)
        return 1


def _receive_counts(sock: socket.socket) -> SessionCounts | None:
    """The main process's first message: this worker's slot and the table of open sessions. Without it
    (it cannot have happened, but a worker must start anyway) the limit counts this worker's sessions."""
    try:
        data, fds, _, _ = socket.recv_fds(sock, 64, 1)
        words = data.decode("ascii").split()
        if len(words) == 2 and words[0] == "S" and fds:
            return SessionCounts(fds[0], _slots_of(fds[0]), int(words[1]))
    except (OSError, ValueError):
        pass
    return None


def _slots_of(fd: int) -> int:
    return os.fstat(fd).st_size // 8


def orphaned_event(pid: int, parent: int) -> events.Event:
    return events.Event(
        events.SERVICE_STOPPED,
        f"SMTP worker {pid}: its main process (pid {parent}) is gone; the worker takes no new connections, "
        f"finishes the sessions under way (at most {STOP_GRACE:g}s) and exits; the next start of smtpsvc "
        "delivers the mail it accepted",
        cause="main-process-gone",
        level="warning",
    )


def _reload(live: LiveConfig, context: SessionContext, log: EventLog, config_path: str | None) -> None:
    """SIGHUP, passed on by the main process: the main process's reload of the receiving side, logged
    with this worker's pid."""
    for event in reload_receiving(live, context, config_path).events(worker_pid=os.getpid()):
        log.emit(event)


async def _flush_every_second(log: EventLog, plog: ProtocolLog | None) -> None:
    while True:
        await asyncio.sleep(1.0)
        log.flush()
        if plog is not None:
            plog.flush()
