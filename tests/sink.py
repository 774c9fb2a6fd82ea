"""A test SMTP server that is not our code: aiosmtpd on 127.0.0.1, port 0, in its own thread and loop.

Recipients whose local part starts with "reject" get 550 5.1.1, with "defer" get 450 4.2.0 (every one does
while `handler.defer_everything` is set); everything else is accepted and the message recorded byte for byte.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class SinkHandler:
    messages: list[Received] = field(default_factory=list)
    rcpt_attempts: list[str] = field(default_factory=list)
    defer_everything: bool = False  # a peer that is "down" for mail (450 to every RCPT) until switched back

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        self.rcpt_attempts.append(address)
        local = address.split("@", 1)[0].lower()
        if self.defer_everything:
            return "450 4.3.2 Service not available, try later"
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if local.startswith("defer"):
            return f"450 4.2.0 <{address}>: Mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content))
        )
        return "250 2.0.0 Ok: queued"


class Sink:
    def __init__(self) -> None:
        self.handler = SinkHandler()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._sessions: list[SMTP] = []

    def start(self, port: int = 0) -> Sink:
        """Listen on 127.0.0.1:`port` (0: any free port; `self.port` tells)."""
        self._thread.start()

        def protocol() -> SMTP:
            session = SMTP(self.handler, hostname="sink.test", decode_data=False, data_size_limit=0)
            self._sessions.append(session)
            return session

        async def serve() -> asyncio.AbstractServer:
            return await self._loop.create_server(protocol, "127.0.0.1", port)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for session in self._sessions:  # like a server going away: open connections are closed
                if session.transport is not None:
                    session.transport.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def connections(self) -> int:
        """How many SMTP connections the sink has accepted."""
        return len(self._sessions)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages
