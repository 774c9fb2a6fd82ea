"""The open SMTP sessions of every worker process in one small shared memory (`server.workers` > 1), so that
`server.max_connections` limits the service, not each process.

One 8-byte slot per worker; each worker writes only its own slot (its number of open sessions) and reads
the sum before taking a connection. No lock: two workers taking a connection at the same instant may both
see room for one, so the service may go past the limit by at most one connection per other worker, for as
long as those sessions last. The main process reads the sum for /metrics and clears the slot of a worker
that exited (its sessions are gone with it).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile

_SLOT = struct.Struct("=q")  # aligned 8-byte stores: a reader sees a whole value, never half of one


class SessionCounts:
    """The table of open sessions: `create` in the main process, `attach` in a worker (its slot)."""

    def __init__(self, fd: int, slots: int, slot: int) -> None:
        self.fd = fd  # the main process passes it to each worker it starts
        self.slots = slots
        self.slot = slot  # 1..slots in a worker; 0 in the main process
        self._map = mmap.mmap(fd, slots * _SLOT.size)

    @classmethod
    def create(cls, slots: int) -> SessionCounts:
        """A zeroed table in memory no file system sees (memfd on Linux; an unlinked file elsewhere)."""
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("smtpsvc-sessions", os.MFD_CLOEXEC)
        else:  # pragma: no cover - BSD: an unlinked temporary file serves the same
            with tempfile.TemporaryFile() as file:
                fd = os.dup(file.fileno())
        os.ftruncate(fd, slots * _SLOT.size)
        return cls(fd, slots, 0)

    def set(self, count: int) -> None:
        """This worker's open sessions."""
        _SLOT.pack_into(self._map, (self.slot - 1) * _SLOT.size, count)

    def clear(self, slot: int) -> None:
        """The main process: worker `slot` exited."""
        _SLOT.pack_into(self._map, (slot - 1) * _SLOT.size, 0)

    def total(self) -> int:
        return sum(_SLOT.unpack_from(self._map, i * _SLOT.size)[0] for i in range(self.slots))

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
