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
from smtpsvc.queue.local import LocalSpool


class IntakeSpool(LocalSpool):
    def __init__(self, root: Path, notify: Callable[[str], None]) -> None:
        super().__init__(root)
        self._notify = notify

    def open(self) -> None:
        """No lock and no recovery (the main process did both before starting us): the spool id only."""
        try:
            self.spool_id = (self.dir / "spool.id").read_text(encoding="ascii").strip()
        except OSError as exc:
            raise QueueError(f"cannot read {self.dir / 'spool.id'}: {exc.strerror or exc}") from exc

    def _index(self, envelope: Envelope) -> None:
        self._notify(envelope.id)  # committed: the main process takes it from here
