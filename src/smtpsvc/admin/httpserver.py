"""Serve the admin application with uvicorn inside the service's own event loop (no thread, no process).

uvicorn's `serve()` would install its own signal handlers; the service owns SIGTERM/SIGHUP, so we drive the
server's startup, tick loop and shutdown ourselves. The application's lifespan runs (its shutdown stops the
admin jobs still running: admin/web.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from starlette.applications import Starlette


class AdminServer:
    def __init__(self, app: Starlette, host: str, port: int) -> None:
        self.config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http="h11",
            ws="none",
            lifespan="on",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=2,
            timeout_keep_alive=5,
        )
        self.server = uvicorn.Server(self.config)
        self._ticker: asyncio.Task[None] | None = None
        self.address: tuple[str, int] = (host, port)

    async def start(self) -> None:
        """Bind and serve; raises OSError when the address cannot be used."""
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        # We bind the socket ourselves: uvicorn turns a bind failure into sys.exit().
        sock = _listening_socket(self.config.host, self.config.port, self.config.backlog)
        try:
            await self.server.startup(sockets=[sock])
        except BaseException:
            sock.close()
            raise
        name = sock.getsockname()
        self.address = (name[0], name[1])
        self._ticker = asyncio.get_running_loop().create_task(self.server.main_loop(), name="admin-http")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._ticker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self.server.started:
            await self.server.shutdown()


def _listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
