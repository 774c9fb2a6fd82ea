"""A byte-level SMTP client for tests that must control exactly what goes on the wire (pipelining,
smuggling, trickling, hostile input). Replies are read whole (multi-line aware) with a timeout."""

from __future__ import annotations

import asyncio
import contextlib


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10.0) -> str:
        """One whole reply ("250-a\\n250 b"); "" when the server closed the connection."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                return "\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def command(self, line: str, timeout: float = 10.0) -> str:
        await self.send(line.encode() + b"\r\n")
        return await self.reply(timeout)

    async def closed(self, timeout: float = 10.0) -> bool:
        """True when the server has closed the connection (EOF) within `timeout`."""
        try:
            data = await asyncio.wait_for(self.reader.read(), timeout)
        except (ConnectionError, OSError):
            return True
        return data == b"" or self.reader.at_eof()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)
