"""Base for the small fake SMTP peers the delivery tests run on 127.0.0.1 (servers that are not our code):
listen on port 0, record commands and messages, stop. Subclasses write `_session`."""

from __future__ import annotations

import asyncio


class LoopbackPeer:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
