"""systemd's notify protocol (Type=notify), without a dependency: one datagram to $NOTIFY_SOCKET.

READY=1 when the listeners are up, STOPPING=1 when a stop begins, RELOADING=1 / READY=1 around a SIGHUP
reload, STATUS=... for `systemctl status`. A no-op when not run by systemd (no $NOTIFY_SOCKET) and on
platforms without AF_UNIX.
"""

from __future__ import annotations

import os
import socket


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send one notification; True when it was sent. Never raises: monitoring must not stop mail."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address or not hasattr(socket, "AF_UNIX"):
        return False
    if address.startswith("@"):  # an abstract socket (Linux)
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError:
        return False
    return True
