"""Queue backends, opened: the one place that builds them. The service's queue at its start and a tool's
(`smtpsvc queue`, through admin/client.py): the spool in <root>/queue or the cluster's PostgreSQL queue, as
`queue.backend` says (`open_queue`); and an SMTP worker's intake into the service's spool (`open_intake`).

Light on purpose: every SMTP worker imports it (not `app`, which loads the admin web stack), and the
PostgreSQL backend and its driver are imported only when a PostgreSQL queue is opened.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from smtpsvc import events
from smtpsvc.config import Config
from smtpsvc.events import EventLog
from smtpsvc.queue.intake import IntakeSpool
from smtpsvc.queue.local import LocalSpool, LocalStore

if TYPE_CHECKING:
    from smtpsvc.queue.postgres import PostgresQueue


async def open_queue(config: Config, event_log: EventLog, *, for_tool: bool) -> LocalStore | PostgresQueue:
    """The queue `queue.backend` names, opened, for the service at its start and (`for_tool`) for the
    `smtpsvc queue` commands, which get it from the CLI (`app.open_queue`) through admin/client.py.
    The spool in <root>/queue: its lock, crash recovery, and messages copied in from another server adopted
    (event 9005). Or the cluster's PostgreSQL queue, its schema checked; the service LISTENs, renews its
    leases and buffers a large message in <root>/queue, a tool does none of that and keeps two connections.
    Unreadable messages are reported as event 9001. The caller closes it. Raises QueueLocked (another
    process holds the spool), QueueError, or OSError (the queue folder)."""
    cfg = config.queue
    folder = Path(config.server.root) / "queue"
    if cfg.backend == "postgres":
        from smtpsvc.queue.postgres import PostgresQueue  # and asyncpg: only for a PostgreSQL queue

        set_aside = _corrupt_reporter(event_log, "Queued message", "was frozen and set aside")
        if for_tool:
            pg = PostgresQueue(
                cfg.dsn, cfg.node_id, cfg.lease, listen=False, pool_size=2, on_corrupt=set_aside
            )
        else:
            pg = PostgresQueue(cfg.dsn, cfg.node_id, cfg.lease, tmp_dir=folder, on_corrupt=set_aside)
        await pg.open()
        return pg
    spool = LocalSpool(
        folder, on_corrupt=_corrupt_reporter(event_log, "Queue file", "was moved to queue/corrupt")
    )
    spool.open(scan=for_tool)  # the service indexes the queue in the background (Service._recover)
    if spool.adopted:
        event_log.emit(adopted_event(len(spool.adopted)))
    return LocalStore(spool, cfg.node_id)


def adopted_event(count: int) -> events.Event:
    return events.Event(
        events.RECATEGORIZED,
        f"{count} message(s) copied in from another server's queue were adopted and are due now "
        "(KB306043 Queue to Queue), routed by this server's config",
        cause="queue-adopted",
    )


def open_intake(config: Config, notify: Callable[[str], None]) -> LocalStore:
    """An SMTP worker's side of the service's spool (`queue/intake.py`): no recovery and no spool lock (the
    main process holds them), the workers' shared lock; `notify(id)` after each commit. Raises QueueError."""
    spool = IntakeSpool(Path(config.server.root) / "queue", notify)
    spool.open()
    return LocalStore(spool, config.queue.node_id)


def _corrupt_reporter(event_log: EventLog, what: str, done: str) -> Callable[[str, str], None]:
    """on_corrupt for a backend: event 9001 naming the unreadable message and what became of it."""

    def corrupt(name: str, reason: str) -> None:
        event_log.emit(
            events.Event(
                events.QUEUE_FILE_CORRUPT,
                f"{what} {name} is unreadable and {done}: {reason}",
                queue_id=name,
                cause="queue-file-corrupt",
            )
        )

    return corrupt
