"""The spool as an SMTP worker process sees it (`server.workers` > 1).

A worker commits each message into the shared `queue/` exactly as the service does (the same files, the same
commit protocol, the same spool id), then tells the main process its id; the main process owns
the lock, the index and delivery, and adopts the message (`LocalSpool.adopt_new`). A notice lost with a
dying worker is made good by the main process's periodic `rescan`, and at the latest by the next start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smtpsvc.model import Envelope
from smtpsvc.queue.base import QueueError
from smtpsvc.queue.local import WORKERS_LOCK, LocalSpool

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no SMTP workers
    fcntl = None  # type: ignore[assignment]


class IntakeSpool(LocalSpool):
    def __init__(self, root: Path, notify: Callable[[str], None]) -> None:
        super().__init__(root)
        self._notify = notify

    def open(self, *, scan: bool = False) -> None:
        """No recovery (the main process did it before starting us): the spool id, and a shared hold on
        queue/.workers.lock for this process's life, so that no later start recovers the queue while we
        may still commit into it (LocalSpool._wait_for_old_workers)."""
        try:
            self.spool_id = (self.dir / "spool.id").read_text(encoding="ascii").strip()
            self._workers_lock = open(self.dir / WORKERS_LOCK, "a+b")  # noqa: SIM115 - held until we exit
        except OSError as exc:
            raise QueueError(f"cannot open the queue in {self.dir}: {exc.strerror or exc}") from exc
        if fcntl is not None:
            try:
                fcntl.flock(self._workers_lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                self._workers_lock.close()
                raise QueueError(f"the queue in {self.dir} is being recovered; try again") from exc

    def _index(self, envelope: Envelope, *, cache: bool = True) -> None:
        self._notify(envelope.id)  # committed: the main process takes it from here
