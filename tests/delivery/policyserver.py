"""An HTTPS server on loopback serving an MTA-STS policy file (a helper for the MTA-STS tests).

It answers ``GET /.well-known/mta-sts.txt`` with `policy` (a test may change it, `status` and
`content_type` while it runs) from a background thread, with a trustme certificate for the names given;
`requests` counts the fetches.
"""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

import trustme


class PolicyServer:
    def __init__(self, ca: trustme.CA, *names: str) -> None:
        self.policy = ""
        self.status = 200
        self.content_type = "text/plain"
        self.location = ""  # set with status 301/302 to test that redirects are refused
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append((self.path, self.headers.get("Host", "")))
                body = server.policy.encode() if self.path == "/.well-known/mta-sts.txt" else b"not here"
                status = server.status if self.path == "/.well-known/mta-sts.txt" else 404
                self.send_response(status)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(body)))
                if server.location:
                    self.send_header("Location", server.location)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet test output

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*names).configure_cert(context)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="PolicyServer", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def __enter__(self) -> PolicyServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
