"""Base for the small fake SMTP peers the delivery tests run on 127.0.0.1 (servers that are not our code):
listen on port 0, record commands and messages, stop. Subclasses write `_session`."""

from __future__ import annotations

import asyncio
import typing


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


class SmallBacklogPeer:
    """An SMTP server that is not our code and behaves like a modest real one: Python's
    `socketserver.ThreadingTCPServer`, a listen backlog of 5 (with Linux SYN cookies, connections past the
    backlog are "connected" on our side but never accepted, so they never see a greeting), one thread per
    session. While `down` it answers every RCPT with 451. It records, for each accepted connection, how many
    of its connections were open and how many had finished EHLO before it: what a slow start must respect.
    """

    def __init__(self, backlog: int = 5, host: str = "127.0.0.1", port: int = 0) -> None:
        import socketserver
        import threading

        peer = self
        self.down = True
        self.messages = 0
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.greeted = 0  # connections that finished EHLO
        self.opening = 0  # connections accepted that have not finished EHLO yet
        # At each accept: (open including this one, greeted before it, opening including this one).
        self.accepts: list[tuple[int, int, int]] = []
        self._lock = threading.Lock()

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with peer._lock:
                    peer.connections += 1
                    peer.open += 1
                    peer.opening += 1
                    peer.most_open = max(peer.most_open, peer.open)
                    peer.accepts.append((peer.open, peer.greeted, peer.opening))
                state = {"greeted": False, "closed": False}
                try:
                    peer._session(self.rfile, self.wfile, state)
                except OSError:
                    pass
                finally:
                    with peer._lock:
                        peer.open -= 0 if state["closed"] else 1
                        peer.opening -= 0 if state["greeted"] else 1

        class Server(socketserver.ThreadingTCPServer):
            request_queue_size = backlog
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> SmallBacklogPeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def _session(self, rfile: typing.BinaryIO, wfile: typing.BinaryIO, state: dict[str, bool]) -> None:
        # The counts change before the reply that ends a stage goes out: the client may act on it at once.
        wfile.write(b"220 backlog.test ESMTP\r\n")
        accepted = 0  # recipients of the transaction under way
        while line := rfile.readline():
            verb = line[:4].upper()
            if verb == b"MAIL":
                accepted = 0
                wfile.write(b"250 2.1.0 ok\r\n")
            elif verb == b"EHLO":
                with self._lock:
                    self.greeted += 1
                    if not state["greeted"]:
                        state["greeted"] = True
                        self.opening -= 1
                wfile.write(b"250-backlog.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                accepted += 0 if self.down else 1
                wfile.write(b"451 4.3.2 try again later\r\n" if self.down else b"250 2.1.5 ok\r\n")
            elif verb == b"DATA" and not accepted:
                wfile.write(b"554 5.5.1 no valid recipients\r\n")
            elif verb == b"DATA":
                wfile.write(b"354 go ahead\r\n")
                wfile.flush()
                while (data := rfile.readline()) and data != b".\r\n":
                    pass
                with self._lock:
                    self.messages += 1
                wfile.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                with self._lock:  # closed as far as the client knows once it has the 221
                    self.open -= 1
                    state["closed"] = True
                wfile.write(b"221 bye\r\n")
                return
            else:
                wfile.write(b"250 ok\r\n")
            wfile.flush()
