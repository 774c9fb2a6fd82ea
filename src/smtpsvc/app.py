"""The composition root: builds the service from a Config, starts and stops its parts in order.

Start: mailroot folders → event log → queue (crash recovery; or the PostgreSQL queue of a cluster) →
scheduler → Pickup → SMTP listeners → admin HTTP API (`admin.listen`). A PostgreSQL queue that cannot be
used at start (server down, wrong DSN or password, no schema) stops the start with event 429 and exit 1, as
a locked or unwritable spool does: a node without its queue should not take connections (clients go to
another MX at once), and systemd's Restart=on-failure tries again. Once running, an outage of the database
only makes SMTP answer 4xx and delivery wait until it is back.

Stop (SIGTERM/SIGINT): the admin API closes; listeners close and idle sessions get 421; Pickup stops;
in-flight deliveries get a bounded grace period; the queue's pending commits finish (PostgreSQL: its
connections close, and the leases of deliveries cut short expire); the event log is flushed.

The long-running tasks (scheduler, Pickup, event-log flush, queue recovery, loop-lag monitor, the workers'
keepers) run under `supervise.Supervisor`: one that dies is logged (event 9007) and restarted after a
backoff, and /healthz answers 503 meanwhile.

SIGHUP: `receiving.reload_receiving` (the workers run it too) with the admin token, all or nothing; every part
reads the configuration from `self.live`, so the reload reaches each at once. Keys read only at the start
(`config.RESTART_ONLY`) are named in a warning; queued mail whose route changed is re-routed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TextIO

from smtpsvc import __version__, events, gctune
from smtpsvc.admin.access import ADMIN_ADDRESS_FILE, AccessError, service_token
from smtpsvc.admin.httpserver import AdminServer
from smtpsvc.admin.service import QueueAdmin
from smtpsvc.admin.web import AdminContext, build_app
from smtpsvc.backends import adopted_event
from smtpsvc.backends import open_queue as open_queue  # the CLI hands it to the admin tools
from smtpsvc.config import Config, LiveConfig, format_listen, worker_count
from smtpsvc.delivery.drop import DropTransport
from smtpsvc.delivery.graph import GraphTransport
from smtpsvc.delivery.reports import Reporter
from smtpsvc.delivery.scheduler import Scheduler
from smtpsvc.delivery.smtp import SmtpTransport
from smtpsvc.delivery.tlsrpt import TlsCounts, TlsReporter
from smtpsvc.diskspace import SpaceWatcher, is_full
from smtpsvc.events import EventLog
from smtpsvc.folders.pickup import PickupScanner
from smtpsvc.ingest import Ingest
from smtpsvc.looplag import LoopLagMonitor
from smtpsvc.metrics import Metrics, QueueView
from smtpsvc.oauth import TokenBroker
from smtpsvc.protolog import ProtocolLog
from smtpsvc.queue import pgschema
from smtpsvc.queue.base import QueueError, QueueStore
from smtpsvc.queue.local import LocalSpool, LocalStore
from smtpsvc.queue.postgres import PostgresQueue
from smtpsvc.receiving import (
    ReceivingError,
    ReloadRefused,
    config_warning_events,
    new_resolver,
    open_protocol_log,
    reload_receiving,
    session_context,
)
from smtpsvc.routing.mtasts import MtaSts
from smtpsvc.safeio import replace_file
from smtpsvc.sdnotify import notify
from smtpsvc.server.listener import SmtpServer
from smtpsvc.supervise import Supervisor
from smtpsvc.tokens import TokenSource
from smtpsvc.workers import WorkerPool

FOLDERS = ("pickup", "queue", "drop", "badmail", "log")
STOP_GRACE = 10.0
MTA_STS_REFRESH_INTERVAL = 3600.0  # how often cached MTA-STS policies near expiry are fetched again
WORKERS_READY_TIMEOUT = 30.0  # server.workers: how long the start waits for every worker to listen


class MailrootError(Exception):
    """The mailroot cannot be used (event 429); the message names the folder and the OS error."""


class Service:
    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        log_stream: TextIO | None = sys.stderr,
        pickup_interval: float = 1.0,
    ) -> None:
        self.live = LiveConfig(config)  # what every running part reads; a reload swaps it, once
        self.config_path = config_path
        self.root = Path(config.server.root)
        self.folders = {name: self.root / name for name in FOLDERS}
        self._log_stream = log_stream
        self._pickup_interval = pickup_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._reroutes: set[asyncio.Task[None]] = set()  # re-categorization after a reload
        self._recovery: asyncio.Task[None] | None = None  # the local spool being indexed
        self.supervisor: Supervisor  # runs the long-lived tasks: one that dies is logged and restarted
        self._reload_pending = False  # a SIGHUP during the start: reloaded once started
        self._stopped = asyncio.Event()
        self.events: EventLog
        # The backend: the LocalSpool (whose synchronous API the tests read) or the PostgresQueue.
        self.queue: LocalSpool | PostgresQueue
        self.store: QueueStore  # the same queue behind the async interface every part uses
        self.ingest: Ingest
        self.scheduler: Scheduler
        self.pickup: PickupScanner
        self.smtp: SmtpServer
        self.admin: AdminServer | None = None
        self.workers: WorkerPool | None = None  # server.workers > 1: SMTP worker processes
        self.admin_context: AdminContext | None = None
        self.space = SpaceWatcher()  # a full disk: events 9010/9011, and what waits for room (the spool's)
        self._started_at = 0.0
        # OAuth 2.0 tokens for the transports ([oauth.NAME] profiles): the broker made at the start, unless
        # a TokenSource was put here before it (tests standing in for the provider).
        self.tokens: TokenSource | None = None
        self.protocol_log: ProtocolLog | None = None  # [protocol_log] enabled: this process's writer

    @property
    def config(self) -> Config:
        """The configuration in force (the last one loaded)."""
        return self.live.current

    def _prepare_mailroot(self) -> list[Path]:
        """Create the folders and check each can be written; returns those on a full disk. A full disk does
        not stop the start: the service must run to drain its queue and so free space."""
        full: list[Path] = []
        for name, path in self.folders.items():
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / f".smtpsvc-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                if is_full(exc) and path.is_dir():
                    full.append(path)
                    with contextlib.suppress(OSError):
                        probe.unlink()
                    continue
                text = f"The {name} folder {path} cannot be used: {exc.strerror or exc}"
                early = EventLog(None, stream=self._log_stream)  # no log folder to write to: stderr only
                early.emit(events.Event(events.MAILROOT_UNUSABLE, text, cause="mailroot-unusable"))
                early.close()
                raise MailrootError(text) from exc
        return full

    async def start(self) -> None:
        full = self._prepare_mailroot()
        self.events = EventLog(self.folders["log"] / "events.jsonl", stream=self._log_stream)
        self.supervisor = Supervisor(self.events)
        try:
            self.store = await self._open_queue()
        except (QueueError, OSError) as exc:
            self.events.emit(events.Event(events.MAILROOT_UNUSABLE, str(exc), cause="queue-unusable"))
            self.events.close()
            raise MailrootError(str(exc)) from exc
        if isinstance(self.queue, LocalSpool):
            self.space = self.queue.space  # one watcher: the spool's writes wait for it too
        self.space.report = lambda full, text: self.events.emit(events.disk_space_event(full, text))
        for path in full:
            self.space.full(path, "the start's write test", "The service starts anyway, to drain its queue.")
        cfg = self.config
        self.queue_view = QueueView(self.store)
        self.metrics = Metrics(self.queue_view.summary, self.store.recent, self.queue_view.frozen_links)
        self.events.subscribe(self.metrics.on_event)
        self.ingest = Ingest(self.store, self.live, self.events, on_queued=lambda: self.scheduler.wake())
        resolver = new_resolver(cfg)  # SMTP out, and the sessions' server.reverse_dns
        # OAuth 2.0 tokens ([oauth.NAME]) for XOAUTH2/OAUTHBEARER and Graph: one broker, one cache shared
        # by every connection; it reads the profiles from self.live, so a reload reaches it.
        self._broker = TokenBroker(self.live, warn=self._token_warning)
        self.tokens = self.tokens or self._broker
        self.smtp_transport = SmtpTransport(
            self.live,
            resolver,
            self.events,
            link_slot=self.store.link_slot if self.store.shared else None,
            tokens=self.tokens,
        )
        # [protocol_log]: one writer for this process's SMTP in and out; it rotates the file for the workers
        self.protocol_log = open_protocol_log(cfg, self.events, rotate=True)
        self.smtp_transport.protocol_log = self.protocol_log
        # MTA-STS policies (cached in queue/mta-sts.json) and the TLS-RPT counts (queue/tlsrpt.json).
        self.mta_sts = MtaSts(
            resolver,
            self.folders["queue"] / "mta-sts.json",
            ca_file=cfg.delivery.mta_sts_ca_file,
            port=cfg.delivery.mta_sts_port,
        )
        self.tls_counts = TlsCounts(self.folders["queue"] / "tlsrpt.json")
        self.smtp_transport.mta_sts, self.smtp_transport.tls_counts = self.mta_sts, self.tls_counts
        self.tlsrpt = TlsReporter(
            self.tls_counts,
            resolver,
            self.ingest,
            lambda: (
                self.config.server.hostname,
                self.config.delivery.tlsrpt_organization or self.config.server.hostname,
            ),
        )
        reports = Reporter(self.store, self.live, self.ingest, self.events, self.folders["badmail"])
        self.scheduler = Scheduler(
            self.store,
            self.live,
            reports,
            self.events,
            {
                "drop": DropTransport(self.folders["drop"], self.space),
                "smtp": self.smtp_transport,
                "graph": GraphTransport(self.live, self.tokens),
            },
            space=self.space,
            budget_file=self.folders["queue"] / "budgets.json",  # the providers' limits (delivery/budget.py)
        )
        if isinstance(self.queue, PostgresQueue):
            # Another node's ETRN or `queue retry` lifts this node's per-destination backoff too.
            self.queue.on_forced_retry = self.scheduler.forget_backoff
        self.scheduler.delivery_observer = self.metrics.delivery_group
        self.metrics.watch_budgets(self.scheduler.budget_views)
        self.pickup = PickupScanner(
            self.folders["pickup"],
            self.folders["badmail"],
            self.ingest,
            self.live,
            self.events,
            interval=self._pickup_interval,
        )
        self.pickup.open()
        try:
            context = session_context(
                self.live,
                self.ingest,
                self.events,
                config_path=self.config_path,
                etrn=self.scheduler.etrn,
                resolver=resolver,
                metrics=self.metrics,
                protocol_log=self.protocol_log,
            )
        except ReceivingError as exc:
            self.events.emit(events.Event(events.MAILROOT_UNUSABLE, str(exc), cause="config-unusable"))
            self.events.close()
            await self.store.close()
            raise MailrootError(str(exc)) from exc
        workers = worker_count(cfg)
        self.smtp = SmtpServer(context, reuse_port=workers > 1)
        if workers > 1:
            self.smtp.reserve()  # the workers receive; this process delivers (docs/architecture.md)
        else:
            await self.smtp.start()
        try:
            await self._start_admin(cfg)
        except (AccessError, OSError) as exc:
            await self.smtp.stop(grace=0)
            text = (
                str(exc)
                if isinstance(exc, AccessError)
                else f"The admin API cannot listen on {format_listen(cfg.admin.listen or ('', 0))}: "
                f"{exc.strerror or exc}"
            )
            self.events.emit(events.Event(events.MAILROOT_UNUSABLE, text, cause="config-unusable"))
            self.events.close()
            await self.store.close()
            raise MailrootError(text) from exc
        if workers > 1 and isinstance(self.queue, LocalSpool):
            self.workers = WorkerPool(
                workers,
                self.config_path,
                self.root,
                self.queue,
                self.events,
                self.scheduler.wake,
                self.scheduler.etrn,
                self.supervisor,
                limiter=lambda: self.smtp.context.limiter,  # the service's one AUTH failure limiter
            )
            self.smtp.shared = self.workers.counts  # the workers' open sessions (/metrics, max_connections)
            await self.workers.start(self.smtp.sockets)
            # With delivery_nice > 0, receiving goes before delivering when the CPU is short (0 by default:
            # a delivery that keeps up gives its files back to the spare pool the workers take from).
            self.workers.lower_delivery_priority(cfg.server.delivery_nice)
            if not await self.workers.wait_ready(WORKERS_READY_TIMEOUT):
                self.events.emit(
                    events.Event(
                        events.SERVICE_STARTED,
                        f"not every SMTP worker listens after {WORKERS_READY_TIMEOUT:g}s; "
                        "starting with those that do (see the events before this one)",
                        cause="worker-failed",
                    )
                )
        loop = asyncio.get_running_loop()
        supervise = self.supervisor.start  # a task that dies is logged (event 9007) and restarted
        self._tasks = [
            supervise("scheduler", self.scheduler.run),
            supervise("pickup", self.pickup.run),
            supervise("event-log-flush", self._flush_events),
        ]
        if isinstance(self.queue, LocalSpool):
            # The queue is indexed while mail is taken: SMTP answers within moments of the start whatever
            # the size of the queue; what is due is delivered as it is found.
            spool = self.queue
            self._recovery = supervise("queue-recovery", lambda: self._recover(spool))
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag.observe)  # smtpsvc_event_loop_lag_seconds
        self._tasks.append(supervise("event-loop-lag", self.loop_lag.run))
        self._tasks.append(supervise("tls-reports", self.tlsrpt.run))  # daily RFC 8460 reports
        self._tasks.append(supervise("mta-sts-refresh", self._refresh_mta_sts))
        if cfg.categorizer.reset_message_status:
            task = loop.create_task(self._reset_message_status(), name="reset-message-status")
            self._reroutes.add(task)
            task.add_done_callback(self._reroutes.discard)
        self._started_at = time.time()
        listening = ", ".join(f"{h}:{p}" for h, p in self.smtp.sockets)
        if self.admin is not None:
            listening += f"; admin API on http://{format_listen(self.admin.address)}/"
        self.events.emit(
            events.Event(
                events.SERVICE_STARTED,
                f"smtpsvc started; root {self.root.resolve()}; listening on {listening}; "
                f"{await self._queue_size()}{self._queue_words()}",
            )
        )
        for warning in config_warning_events(cfg):
            self.events.emit(warning)
        self.events.flush()
        notify(f"READY=1\nSTATUS=listening on {listening}")
        if self._reload_pending:  # a SIGHUP came during the start: the file may have changed since we read it
            self.reload()

    async def _refresh_mta_sts(self) -> None:
        """Cached MTA-STS policies are fetched again before they expire (RFC 8461 §5.1.2)."""
        while True:
            await asyncio.sleep(MTA_STS_REFRESH_INTERVAL)
            await self.mta_sts.refresh()

    def _token_warning(self, text: str) -> None:
        """The broker's notices (a renewal failed while the old token still works; a rotated refresh token
        that could not be saved): event 4000 at level warning, so an operator acts before mail waits."""
        self.events.emit(
            events.Event(events.REMOTE_DOMAIN_FAILED, text, level="warning", cause="oauth-token-failed")
        )

    async def _recover(self, spool: LocalSpool) -> None:
        """Index the spool in the background (LocalSpool.recover), then say what was found (events 9002,
        9005). Run again after an error (supervised), it indexes what the first run had not reached."""
        started = time.monotonic()
        if spool.recovering:
            await spool.recover(progress=lambda _: self.scheduler.wake())
        else:  # the recovery stopped with an error: what it had indexed stays, the rest is found now
            await spool.rescan()
        self.scheduler.wake()
        aside = f", {spool.set_aside} unusable file(s) moved to queue/corrupt" if spool.set_aside else ""
        self.events.emit(
            events.Event(
                events.SERVICE_STARTED,
                f"The queue is recovered: {spool.count()} message(s) indexed in "
                f"{time.monotonic() - started:.1f}s{aside}",
                cause="queue-recovered",
            )
        )
        if spool.adopted:
            self.events.emit(adopted_event(len(spool.adopted)))

    async def _reset_message_status(self) -> None:
        """ResetMessageStatus at start: every queued message re-categorized, in the background."""
        try:
            text = f"{await self.scheduler.recategorize()} queued message(s) re-categorized and re-routed"
        except QueueError as exc:  # the database went away since the start: routing runs per attempt
            text = f"queued mail could not be re-categorized ({exc})"
        self.events.emit(
            events.Event(
                events.RECATEGORIZED, f"ResetMessageStatus: {text} at start", cause="reset-message-status"
            )
        )

    async def _open_queue(self) -> QueueStore:
        """The queue `queue.backend` names, opened by `backends.open_queue`; `self.queue` is its backend."""
        store = await open_queue(self.config, self.events, for_tool=False)
        self.queue = store.spool if isinstance(store, LocalStore) else store
        return store

    async def _queue_size(self) -> str:
        if isinstance(self.queue, LocalSpool) and self.queue.recovering:
            return "the queue is being recovered in the background"
        try:
            return f"{await self.store.count()} message(s) in the queue"
        except QueueError:
            return "an unknown number of message(s) in the queue"

    def _queue_words(self) -> str:
        if not self.store.shared:
            return ""
        where = pgschema.describe(self.config.queue.dsn)
        return f" (the cluster queue in PostgreSQL at {where}, node {self.store.node_id})"

    async def _render_metrics(self) -> tuple[bytes, str]:
        await self.queue_view.refresh()
        if self.workers is not None:  # the SMTP sessions are the workers': their counters are added
            return self.metrics.render(await self.workers.metric_samples())
        return self.metrics.render()

    async def _start_admin(self, config: Config) -> None:
        if config.admin.listen is None:
            return
        self.admin_context = AdminContext(
            admin=QueueAdmin.attach(self.scheduler, summaries=self.queue_view.current),
            token=service_token(config, on_full=self._full_at_start),
            badmail_dir=self.folders["badmail"],
            pickup_dir=self.folders["pickup"],
            events_path=self.folders["log"] / "events.jsonl",
            flush_events=self._flush_logs,
            metrics=self._render_metrics,
            health=self._health,
        )
        host, port = config.admin.listen
        self.admin = AdminServer(build_app(self.admin_context), host, port)
        await self.admin.start()
        # Where the API really listens (port 0, or a config edited since the start): the CLI reads it.
        address = format_listen(self.admin.address) + "\n"
        path = self.root / ADMIN_ADDRESS_FILE
        try:
            if _read_text(path) != address:  # the same (a crash left it): nothing to write
                replace_file(path, address.encode(), durable=False)  # made at every start
        except OSError as exc:
            if not is_full(exc):
                raise
            with contextlib.suppress(OSError):
                path.unlink()  # stale: the CLI finds admin.listen in the configuration instead
            self._full_at_start(
                f"The admin API's address cannot be written to {path}: the disk is full "
                f"({exc.strerror or exc}); the CLI uses admin.listen from the configuration"
            )

    def _full_at_start(self, text: str) -> None:
        """A file the start writes could not be written for lack of space, and the start goes on."""
        self.events.emit(events.Event(events.DISK_FULL, text, cause="disk-full", level="warning"))

    async def _health(self) -> dict[str, object]:
        """/healthz: ok while the service accepts and delivers; 503 once it is stopping, while its queue
        (a PostgreSQL server) cannot be reached (SMTP then answers 4xx), or while one of its tasks (Pickup,
        the scheduler, ...) stopped with an error and waits to be restarted: `task-stopped: <names>`."""
        status = "stopping" if self._stopped.is_set() else "ok"
        try:
            queued: int | None = await self.store.count()
        except QueueError:
            queued, status = None, "queue-unavailable" if status == "ok" else status
        down = self.supervisor.down()
        if down and status == "ok":
            status = f"task-stopped: {', '.join(sorted(down))}"
        return {
            "status": status,
            "tasks_stopped": down,
            "version": __version__,
            "uptime_seconds": round(time.time() - self._started_at, 1),
            "queue": queued,
            "queue_recovering": isinstance(self.queue, LocalSpool) and self.queue.recovering,
            "in_flight": self.scheduler.inflight,
            "smtp": [f"{h}:{p}" for h, p in self.smtp.sockets],
            "workers": self.workers.status() if self.workers is not None else [],
        }

    def _flush_logs(self) -> None:
        """The event log and the protocol log (what a tracking search or the viewer reads) written out now."""
        self.events.flush()
        if self.protocol_log is not None:
            self.protocol_log.flush()

    async def _flush_events(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._flush_logs()

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        notify("STOPPING=1")
        if self.workers is not None:
            await self.workers.stop()  # they answer 421 and finish their commits, like our listeners
        if self.admin is not None:
            await self.admin.stop()
            with contextlib.suppress(OSError):
                (self.root / ADMIN_ADDRESS_FILE).unlink()
        await self.smtp.stop(grace=STOP_GRACE)
        pickup_task, flush_task = self._tasks[1], self._tasks[2]
        pickup_task.cancel()
        if self._recovery is not None:
            self._recovery.cancel()
            await asyncio.gather(self._recovery, return_exceptions=True)
        await self.scheduler.stop(grace=STOP_GRACE)
        self._tasks[0].cancel()
        flush_task.cancel()
        for task in self._tasks[3:]:  # the loop-lag monitor, TLS reports, MTA-STS refresh
            task.cancel()
        for reroute in self._reroutes:
            reroute.cancel()
        await asyncio.gather(*self._tasks, *self._reroutes, return_exceptions=True)
        self.tls_counts.save()
        await self.store.close()
        await self._broker.close()
        await self.space.close()
        if self.protocol_log is not None:
            self.protocol_log.close()
        self.events.emit(events.Event(events.SERVICE_STOPPED, "smtpsvc stopped"))
        self.events.close()  # a full disk: what the log file cannot take goes to stderr, counted

    def reload(self) -> None:
        """SIGHUP: re-read the configuration file and hand it to every part that routes or decides."""
        notify("RELOADING=1")
        try:
            self._reload()
            if self.workers is not None:
                self.workers.reload()
        finally:
            notify("READY=1")

    def _reload(self) -> None:
        """The receiving side's reload (the workers run the same), with the admin token: all or nothing.
        Every part reads the configuration from `self.live`, which it swaps."""
        outcome = reload_receiving(self.live, self.smtp.context, self.config_path, also=self._admin_token_of)
        for event in outcome.events():
            self.events.emit(event)
        if outcome.error:
            return
        self.scheduler.wake()
        task = asyncio.get_running_loop().create_task(self._reroute(outcome.previous))
        self._reroutes.add(task)
        task.add_done_callback(self._reroutes.discard)

    def _admin_token_of(self, config: Config) -> Callable[[], None]:
        """For `reload_receiving`: the admin token `config` names, read now (a file that cannot be read
        refuses the whole reload); what it returns puts the token in place."""
        context = self.admin_context
        if context is None or not config.admin.token_file:
            return lambda: None
        try:
            token = service_token(config)
        except AccessError as exc:
            raise ReloadRefused(str(exc)) from exc

        def install() -> None:
            context.token = token

        return install

    async def _reroute(self, previous: Config) -> None:
        """After a reload: queued mail whose route changed is re-categorized and tried now."""
        try:
            rerouted = await self.scheduler.recategorize(previous)
        except QueueError as exc:
            self.events.emit(
                events.Event(
                    events.RECATEGORIZED,
                    f"Queued mail could not be re-routed after the reload ({exc}); it follows the new "
                    "routes at its next attempt",
                    cause="no-route",
                )
            )
            return
        if rerouted:
            self.events.emit(
                events.Event(
                    events.RECATEGORIZED,
                    f"{rerouted} queued message(s) have a new route after the reload and are tried now",
                    cause="no-route",
                )
            )

    def handle_signals(self) -> asyncio.Event:
        """SIGTERM and SIGINT set the returned event; SIGHUP reloads, once the service has started (one
        during the start is remembered and done right after it). Installed before `start`: the start
        announces READY=1 and event 9002, and a supervisor or a test may send SIGTERM the moment it reads
        them, which without a handler would kill the process instead of stopping it in order. (From the
        process's first lines to here, `cli` keeps SIGHUP blocked for `serve`.)"""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C arrives as KeyboardInterrupt
                loop.add_signal_handler(sig, stop.set)
        if hasattr(signal, "SIGHUP"):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            if hasattr(signal, "pthread_sigmask"):  # held since `cli`'s first lines: one sent meanwhile
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        return stop

    def _on_sighup(self) -> None:
        if self._stopped.is_set():
            return  # stopping: the configuration no longer matters
        if self._started_at:
            self.reload()
        else:
            self._reload_pending = True

    async def run_until_signalled(self, stop: asyncio.Event | None = None) -> None:
        try:
            await (stop or self.handle_signals()).wait()
        except asyncio.CancelledError:
            # Where the loop takes no signal handlers (Windows), Ctrl-C reaches us as asyncio.run cancelling
            # this task: stop in order all the same (421 to the sessions, deliveries given their grace), in a
            # task of its own, as a cancelled task's own timeouts would read as cancelled too.
            await asyncio.shield(asyncio.ensure_future(self.stop()))
            raise
        await self.stop()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def token_source(config: Config) -> TokenBroker:
    """The OAuth broker a tool uses (`smtpsvc probe --auth`): the same one the service builds. Close it."""
    return TokenBroker(LiveConfig(config))


def run_service(config: Config, config_path: str | None) -> int:
    """Run in the foreground until SIGTERM/SIGINT; returns the process exit code."""

    async def main() -> int:
        service = Service(config, config_path)
        stop = service.handle_signals()
        try:
            await service.start()
        except MailrootError:
            return 1
        except OSError as exc:
            print(
                f"smtpsvc: cannot listen on {', '.join(f'{h}:{p}' for h, p in config.server.listen)}: "
                f"{exc.strerror or exc}",
                file=sys.stderr,
            )
            await service.store.close()
            return 1
        gctune.after_start()
        await service.run_until_signalled(stop)
        return 0

    try:
        import uvloop

        run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    except ImportError:  # Windows (uvloop is not installed there): asyncio's own loop
        run = asyncio.run
    try:
        return run(main())
    except KeyboardInterrupt:  # Ctrl-C where it is no loop signal (Windows): stopped in order above
        return 0
