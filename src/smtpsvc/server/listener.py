"""Inbound listeners: accept connections on `server.listen`, enforce `max_connections`, run sessions,
and stop gracefully (stop listening, 421 to idle sessions, let sessions finishing a DATA commit complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Sequence

from smtpsvc import events
from smtpsvc.config import Config
from smtpsvc.protocol import replies
from smtpsvc.server.counts import SessionCounts
from smtpsvc.server.session import Session, SessionContext, SmtpStream


class SmtpServer:
    def __init__(self, context: SessionContext, reuse_port: bool = False) -> None:
        self.context = context
        self.reuse_port = reuse_port  # server.workers: several processes accept on the same addresses
        self._servers: list[asyncio.Server] = []
        self._reserved: list[socket.socket] = []  # bound, never listening: see reserve()
        self._sessions: dict[asyncio.Task[None], Session] = {}
        self._last_limit_event = 0.0
        self.accepted = 0
        # An SMTP worker: the open sessions of every worker, so that max_connections is the service's limit
        self.shared: SessionCounts | None = None

    @property
    def config(self) -> Config:
        return self.context.config

    @property
    def sockets(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs; with port 0 in the config this tells the real port."""
        out = []
        for sock in [*self._reserved, *(s for server in self._servers for s in server.sockets)]:
            host, port = sock.getsockname()[:2]
            out.append((host, port))
        return out

    @property
    def active_sessions(self) -> int:
        """The open sessions; with SMTP workers, the whole service's (the main process has none)."""
        return len(self._sessions) if self.shared is None else self.shared.total()

    async def start(self, listen: Sequence[tuple[str, int]] | None = None) -> None:
        """Listen on `server.listen`, or on `listen` (a worker: the main process's real addresses)."""
        loop = asyncio.get_running_loop()
        for host, port in self.config.server.listen if listen is None else listen:
            # SmtpStream: asyncio.start_server's reader/writer semantics (64 KiB buffer limit) in one object
            server = await loop.create_server(
                lambda: SmtpStream(self._accept),
                host,
                port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                backlog=1024,
            )
            self._servers.append(server)

    def reserve(self) -> None:
        """Bind `server.listen` with SO_REUSEPORT but never listen (the main process with `server.workers`
        > 1): the ports are ours (a port 0 gets its number here) and stay ours while workers come and go,
        yet the kernel hands connections only to listening sockets, so the workers receive every one."""
        try:
            for host, port in self.config.server.listen:
                infos = socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                for family, kind, proto, _, address in dict.fromkeys(infos):
                    sock = socket.socket(family, kind, proto)
                    self._reserved.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    if family == socket.AF_INET6:  # as asyncio.start_server: one family per socket
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(address)
        except OSError:
            self._close_reserved()
            raise

    def _close_reserved(self) -> None:
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    def _accept(self, stream: SmtpStream) -> None:
        """A new connection (SmtpStream.connection_made): its session, or the refusal, runs as a task of its
        own, as asyncio.start_server's callback would (without a coroutine layer around Session.run)."""
        loop = asyncio.get_running_loop()
        limit = self.config.server.max_connections
        shared = self.shared
        if (len(self._sessions) if shared is None else shared.total()) >= limit:
            task = loop.create_task(self._refuse(stream, limit))
        else:
            self.accepted += 1
            session = Session(stream, self.context)
            task = loop.create_task(session.run())
            self._sessions[task] = session
            if shared is not None:
                shared.set(len(self._sessions))
        transport = stream.transport

        def done(task: asyncio.Task[None]) -> None:
            if self._sessions.pop(task, None) is not None and shared is not None:
                shared.set(len(self._sessions))
            if not stream.transport.is_closing():  # cancelled (stop) before it ever ran: nothing closed it
                stream.transport.close()
            exc = None if task.cancelled() else task.exception()  # as asyncio.start_server's callback
            if exc is not None:
                loop.call_exception_handler(
                    {
                        "message": "Unhandled exception in client_connected_cb",
                        "exception": exc,
                        "transport": transport,
                    }
                )
                transport.close()

        task.add_done_callback(done)

    async def _refuse(self, stream: SmtpStream, limit: int) -> None:
        now = time.monotonic()
        if now - self._last_limit_event > 60:  # one event a minute, not one per refused connection
            self._last_limit_event = now
            self.context.events.emit(
                events.Event(events.CONNECTION_LIMIT, events.connection_limit_text(limit))
            )
        with contextlib.suppress(ConnectionError, OSError):
            stream.transport.write(replies.TOO_MANY_CONNECTIONS.to_bytes())
            await asyncio.wait_for(stream.drain(), 5)
        stream.transport.close()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; idle sessions get 421 at once, busy ones `grace` seconds to finish."""
        self._close_reserved()
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + grace
        while self._sessions and time.monotonic() < deadline:
            for task, session in list(self._sessions.items()):
                if session.idle:
                    task.cancel()
            await asyncio.sleep(0.05)
        for task in list(self._sessions):
            task.cancel()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
