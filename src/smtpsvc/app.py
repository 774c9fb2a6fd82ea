"""The composition root: builds the service from a Config, starts and stops its parts in order.

Start: mailroot folders → event log → queue (crash recovery; or the PostgreSQL queue of a cluster) →
scheduler → Pickup → SMTP listeners → admin HTTP API (`admin.listen`). A PostgreSQL queue that cannot be
used at start (server down, wrong DSN or password, no schema) stops the start with event 429 and exit 1, as
a locked or unwritable spool does: a node without its queue should not take connections (clients go to
another MX at once), and systemd's Restart=on-failure tries again. Once running, an outage of the database
only makes SMTP answer 4xx and delivery wait until it is back.

Stop (SIGTERM/SIGINT): the admin API closes; listeners close and idle sessions get 421; Pickup stops;
in-flight deliveries get a bounded grace period; the queue's pending commits finish (PostgreSQL: its
connections close, and the leases of deliveries cut short expire); the event log is flushed. SIGHUP reloads
the configuration file (listener addresses excepted: they need a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from smtpsvc import __version__, events, gctune
from smtpsvc.admin.access import ADMIN_ADDRESS_FILE, AccessError, service_token
from smtpsvc.admin.httpserver import AdminServer
from smtpsvc.admin.service import QueueAdmin
from smtpsvc.admin.web import AdminContext, build_app
from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.auth.users import UsersFileError, UserStore, users_path
from smtpsvc.config import Config, ConfigError, format_listen, load_config
from smtpsvc.delivery.scheduler import Scheduler
from smtpsvc.events import EventLog
from smtpsvc.folders.pickup import PickupScanner
from smtpsvc.ingest import Ingest
from smtpsvc.looplag import LoopLagMonitor
from smtpsvc.metrics import Metrics, QueueView
from smtpsvc.queue import pgschema
from smtpsvc.queue.base import QueueError, QueueStore
from smtpsvc.queue.local import LocalSpool, LocalStore
from smtpsvc.queue.postgres import PostgresQueue
from smtpsvc.routing.mx import MxResolver
from smtpsvc.sdnotify import notify
from smtpsvc.server.listener import SmtpServer
from smtpsvc.server.session import SessionContext
from smtpsvc.tls import ServerCertificate, TlsError
from smtpsvc.workers import WorkerPool

FOLDERS = ("pickup", "queue", "drop", "badmail", "log")
STOP_GRACE = 10.0
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
        self.config = config
        self.config_path = config_path
        self.root = Path(config.server.root)
        self.folders = {name: self.root / name for name in FOLDERS}
        self._log_stream = log_stream
        self._pickup_interval = pickup_interval
        self._tasks: list[asyncio.Task[None]] = []
        self._reroutes: set[asyncio.Task[None]] = set()  # re-categorization after a reload
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
        self._started_at = 0.0

    def _prepare_mailroot(self) -> None:
        for name, path in self.folders.items():
            try:
                path.mkdir(parents=True, exist_ok=True)
                probe = path / f".smtpsvc-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                text = f"The {name} folder {path} cannot be used: {exc.strerror or exc}"
                early = EventLog(None, stream=self._log_stream)  # no log folder to write to: stderr only
                early.emit(events.Event(events.MAILROOT_UNUSABLE, text, cause="mailroot-unusable"))
                early.close()
                raise MailrootError(text) from exc

    async def start(self) -> None:
        self._prepare_mailroot()
        self.events = EventLog(self.folders["log"] / "events.jsonl", stream=self._log_stream)
        try:
            self.store = await self._open_queue()
        except (QueueError, OSError) as exc:
            self.events.emit(events.Event(events.MAILROOT_UNUSABLE, str(exc), cause="queue-unusable"))
            self.events.close()
            raise MailrootError(str(exc)) from exc
        cfg = self.config
        self.queue_view = QueueView(self.store)
        self.metrics = Metrics(self.queue_view.envelopes, self.store.recent, self.queue_view.frozen_links)
        self.events.subscribe(self.metrics.on_event)
        self.ingest = Ingest(self.store, cfg, self.events, on_queued=lambda: self.scheduler.wake())
        resolver = MxResolver(cfg.resolver.nameservers, timeout=min(cfg.delivery.timeout, 30.0))
        self.scheduler = Scheduler(
            self.store, cfg, self.ingest, self.events, resolver, self.folders["drop"], self.folders["badmail"]
        )
        if isinstance(self.queue, PostgresQueue):
            # Another node's ETRN or `queue retry` lifts this node's per-destination backoff too.
            self.queue.on_forced_retry = self.scheduler.forget_backoff
        self.scheduler.delivery_observer = self.metrics.delivery_group
        self.pickup = PickupScanner(
            self.folders["pickup"],
            self.folders["badmail"],
            self.ingest,
            cfg,
            self.events,
            interval=self._pickup_interval,
        )
        self.pickup.open()
        try:
            certificate = ServerCertificate(cfg.tls.cert, cfg.tls.key)
            users = self._load_users(cfg)
        except (TlsError, UsersFileError) as exc:
            self.events.emit(events.Event(events.MAILROOT_UNUSABLE, str(exc), cause="config-unusable"))
            self.events.close()
            await self.store.close()
            raise MailrootError(str(exc)) from exc
        self.smtp = SmtpServer(
            SessionContext(
                config=cfg,
                ingest=self.ingest,
                events=self.events,
                certificate=certificate,
                users=users,
                limiter=AuthLimiter(),
                etrn=self.scheduler.etrn,
                resolver=resolver,
                metrics=self.metrics,
            ),
            reuse_port=cfg.server.workers > 1,
        )
        if cfg.server.workers > 1:
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
        if cfg.server.workers > 1 and isinstance(self.queue, LocalSpool):
            self.workers = WorkerPool(
                cfg.server.workers,
                self.config_path,
                self.root,
                self.queue,
                self.events,
                self.scheduler.wake,
                self.scheduler.etrn,
            )
            await self.workers.start(self.smtp.sockets)
            # Receiving before delivering when the CPU is short: clients wait for their 250, and the
            # queue is durable (Postfix's queue manager lags its smtpd the same way under load).
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
        self._tasks = [
            loop.create_task(self.scheduler.run(), name="scheduler"),
            loop.create_task(self.pickup.run(), name="pickup"),
            loop.create_task(self._flush_events(), name="event-log-flush"),
        ]
        self.loop_lag = LoopLagMonitor(self.metrics.loop_lag.observe)  # smtpsvc_event_loop_lag_seconds
        self._tasks.append(self.loop_lag.start())
        if cfg.categorizer.reset_message_status:
            try:
                text = f"{await self.scheduler.recategorize()} queued message(s) re-categorized and re-routed"
            except QueueError as exc:  # the database went away since the start: routing runs per attempt
                text = f"queued mail could not be re-categorized ({exc})"
            self.events.emit(
                events.Event(
                    events.RECATEGORIZED, f"ResetMessageStatus: {text} at start", cause="reset-message-status"
                )
            )
        self._started_at = time.time()
        listening = ", ".join(f"{h}:{p}" for h, p in self.smtp.sockets)
        if self.admin is not None:
            listening += f"; admin API on http://{format_listen(self.admin.address)}/"
        self.events.emit(
            events.Event(
                events.SERVICE_STARTED,
                f"smtpsvc started; root {self.root.resolve()}; listening on {listening}; "
                f"{await self._queue_size()} message(s) in the queue{self._queue_words()}",
            )
        )
        self.events.flush()
        notify(f"READY=1\nSTATUS=listening on {listening}")

    async def _open_queue(self) -> QueueStore:
        """The queue `queue.backend` names, opened: the spool under mailroot/queue (crash recovery, the
        lock), or the cluster's PostgreSQL queue (schema checked, LISTEN, lease renewal)."""
        cfg = self.config.queue
        if cfg.backend == "postgres":
            pg = PostgresQueue(
                cfg.dsn,
                cfg.node_id,
                cfg.lease,
                tmp_dir=self.folders["queue"],  # a message over 1 MiB is buffered here until its commit
                on_corrupt=self._corrupt_row,
            )
            await pg.open()
            self.queue = pg
            return pg
        spool = LocalSpool(self.folders["queue"], on_corrupt=self._corrupt)
        spool.open()
        self.queue = spool
        if spool.adopted:
            self.events.emit(
                events.Event(
                    events.RECATEGORIZED,
                    f"{len(spool.adopted)} message(s) copied in from another server's queue were "
                    "adopted and are due now (KB306043 Queue to Queue), routed by this server's config",
                    cause="queue-adopted",
                )
            )
        return LocalStore(spool, cfg.node_id)

    async def _queue_size(self) -> str:
        try:
            return str(await self.store.count())
        except QueueError:
            return "an unknown number of"

    def _queue_words(self) -> str:
        if not self.store.shared:
            return ""
        where = pgschema.describe(self.config.queue.dsn)
        return f" (the cluster queue in PostgreSQL at {where}, node {self.store.node_id})"

    async def _render_metrics(self) -> tuple[bytes, str]:
        await self.queue_view.refresh()
        return self.metrics.render()

    async def _start_admin(self, config: Config) -> None:
        if config.admin.listen is None:
            return
        self.admin_context = AdminContext(
            admin=QueueAdmin.attach(self.scheduler),
            token=service_token(config),
            badmail_dir=self.folders["badmail"],
            pickup_dir=self.folders["pickup"],
            events_path=self.folders["log"] / "events.jsonl",
            flush_events=self.events.flush,
            metrics=self._render_metrics,
            health=self._health,
        )
        host, port = config.admin.listen
        self.admin = AdminServer(build_app(self.admin_context), host, port)
        await self.admin.start()
        # Where the API really listens (port 0, or a config edited since the start): the CLI reads it.
        runtime = self.root / ADMIN_ADDRESS_FILE
        tmp = runtime.with_name(f".{runtime.name}.tmp")
        tmp.write_text(format_listen(self.admin.address) + "\n", encoding="utf-8")
        os.replace(tmp, runtime)

    async def _health(self) -> dict[str, object]:
        """/healthz: ok while the service accepts and delivers; 503 once it is stopping, or while its
        queue (a PostgreSQL server) cannot be reached: SMTP then answers 4xx."""
        status = "stopping" if self._stopped.is_set() else "ok"
        try:
            queued: int | None = await self.store.count()
        except QueueError:
            queued, status = None, "queue-unavailable" if status == "ok" else status
        return {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(time.time() - self._started_at, 1),
            "queue": queued,
            "in_flight": self.scheduler.inflight,
            "smtp": [f"{h}:{p}" for h, p in self.smtp.sockets],
            "workers": self.workers.status() if self.workers is not None else [],
        }

    def _load_users(self, config: Config) -> UserStore:
        if not config.auth.users_file:
            return UserStore()
        return UserStore.load(users_path(config, self.config_path))

    def _corrupt(self, name: str, reason: str) -> None:
        self.events.emit(
            events.Event(
                events.QUEUE_FILE_CORRUPT,
                f"Queue file {name} is unreadable and was moved to queue/corrupt: {reason}",
                queue_id=name,
                cause="queue-file-corrupt",
            )
        )

    def _corrupt_row(self, queue_id: str, reason: str) -> None:
        self.events.emit(
            events.Event(
                events.QUEUE_FILE_CORRUPT,
                f"Queued message {queue_id} is unreadable and was frozen and set aside: {reason}",
                queue_id=queue_id,
                cause="queue-file-corrupt",
            )
        )

    async def _flush_events(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.events.flush()

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
        await self.scheduler.stop(grace=STOP_GRACE)
        self._tasks[0].cancel()
        flush_task.cancel()
        self.loop_lag.stop()
        for reroute in self._reroutes:
            reroute.cancel()
        await asyncio.gather(*self._tasks, *self._reroutes, return_exceptions=True)
        await self.store.close()
        self.events.emit(events.Event(events.SERVICE_STOPPED, "smtpsvc stopped"))
        self.events.close()

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
        context = self.smtp.context
        token = self.admin_context.token if self.admin_context else ""
        try:
            config = load_config(self.config_path, os.environ, root_override=str(self.root))
            context.certificate.reload(config.tls.cert, config.tls.key)
            users = self._load_users(config)
            if self.admin_context is not None and config.admin.token_file:
                token = service_token(config)
        except (ConfigError, TlsError, UsersFileError, AccessError) as exc:
            self.events.emit(
                events.Event(
                    events.SERVICE_STARTED,
                    f"Configuration reload failed; keeping the old one: {exc}",
                    cause="config-reload-failed",
                )
            )
            return
        context.users = users
        previous, self.config = self.config, config
        for part in (self.ingest, self.scheduler, self.scheduler.reports, self.pickup, context):
            part.config = config
        if self.admin_context is not None:
            self.admin_context.admin.config = config
            self.admin_context.token = token
        self.scheduler.wake()
        self.events.emit(
            events.Event(events.SERVICE_STARTED, "Configuration reloaded", cause="config-reload")
        )
        task = asyncio.get_running_loop().create_task(self._reroute(previous))
        self._reroutes.add(task)
        task.add_done_callback(self._reroutes.discard)

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
        """SIGTERM and SIGINT set the returned event; SIGHUP reloads once the service has started (before,
        there is nothing to reload). Installed before `start`: the start announces READY=1 and event 9002,
        and a supervisor or a test may send SIGTERM the moment it reads them, which without a handler
        would kill the process instead of stopping it in order."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C arrives as KeyboardInterrupt
                loop.add_signal_handler(sig, stop.set)
        if hasattr(signal, "SIGHUP"):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(signal.SIGHUP, lambda: self.reload() if self._started_at else None)
        return stop

    async def run_until_signalled(self, stop: asyncio.Event | None = None) -> None:
        await (stop or self.handle_signals()).wait()
        await self.stop()


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
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())
