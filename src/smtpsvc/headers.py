"""Incremental header inspection of a message as it streams in: pure, bounded memory.

Counts the `Received:` trace fields of the header section (the hop count, RFC 5321 §6.3 loop detection)
without holding the message: only an unfinished line of at most `MAX_LINE` octets is kept between chunks.
"""

from __future__ import annotations

MAX_LINE = 1000


class HopCounter:
    def __init__(self) -> None:
        self.received = 0
        self._partial = b""
        self._done = False

    @property
    def done(self) -> bool:
        """True once the empty line ending the header section has been seen."""
        return self._done

    def feed(self, data: bytes) -> None:
        if self._done or not data:
            return
        buffer = self._partial + data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end].rstrip(b"\r")
            start = end + 1
            if not line:
                self._done = True
                return
            if line[:9].lower() == b"received:":
                self.received += 1
        # Keep only the start of an unfinished line: enough to recognise "Received:" when it completes.
        self._partial = buffer[start:][:MAX_LINE]
