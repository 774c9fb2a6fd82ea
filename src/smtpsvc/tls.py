"""TLS for the inbound service: the server certificate (`tls.cert`/`tls.key`, PEM), loaded at start and
again on SIGHUP (`receiving.reload_receiving` puts a new ServerCertificate in place only when the whole
reload has loaded; otherwise the one in use stays). Sessions already in TLS keep theirs, new STARTTLS
handshakes get the new one.
"""

from __future__ import annotations

import os
import ssl


class TlsError(Exception):
    """The certificate or key cannot be used; the message names the file and the problem."""


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 or newer, the system's default ciphers, our certificate chain."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key or None)
    except FileNotFoundError as exc:
        missing = exc.filename or (cert if not os.path.exists(cert) else key)
        raise TlsError(f"tls.cert/tls.key: {missing}: file not found") from exc
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"tls.cert {cert!r} / tls.key {key!r} cannot be loaded: {exc}") from exc
    return context


class ServerCertificate:
    """Holds the context handed to new STARTTLS handshakes; None when no certificate is configured."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.context: ssl.SSLContext | None = server_context(cert, key) if cert else None
