"""Who may do what on the admin HTTP API (SPEC 1.5): a bearer token for any change; without it, read-only,
and only from loopback. /healthz is open to anyone who can reach the port (container health checks).

The token is `admin.token_file`'s content. Without that key the service makes its own random token at start
in `<root>/admin.token` (mode 0600), so the CLI on the same machine, run by the same user, can still change
the queue of the running service; the file's permissions are the authority, as with a local socket.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Callable
from enum import IntEnum
from pathlib import Path

from smtpsvc.config import Config
from smtpsvc.diskspace import is_full
from smtpsvc.safeio import PRIVATE, replace_file

COOKIE = "smtpsvc_admin"
ADMIN_ADDRESS_FILE = "admin.address"  # in the mailroot: where the running service's API really listens


class AccessError(Exception):
    """The token file cannot be read or made; the message names it."""


class Level(IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2


def token_path(config: Config) -> Path:
    if config.admin.token_file:
        return Path(config.admin.token_file)
    return Path(config.server.root) / "admin.token"


def read_token(config: Config) -> str:
    """The token as the CLI finds it; "" when there is none (read-only access then)."""
    try:
        return token_path(config).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def service_token(config: Config, on_full: Callable[[str], None] | None = None) -> str:
    """The token the running service checks: the configured file's, or a fresh one written at start.

    With `on_full`, a disk too full to write the fresh one does not stop the start (the service must start
    to drain its queue and free space): the previous run's token in the file stays in force, or, without
    one, a token nobody knows (the API then changes nothing: read-only from loopback); `on_full(text)`
    says which."""
    path = token_path(config)
    if config.admin.token_file:
        try:
            token = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise AccessError(f"admin.token_file {path} cannot be read: {exc.strerror or exc}") from None
        if len(token) < 16:
            raise AccessError(f"admin.token_file {path} holds a token shorter than 16 characters")
        return token
    token = secrets.token_urlsafe(32)
    try:
        # Made again at every start: atomic for the CLI reading it, not worth an fsync.
        replace_file(path, (token + "\n").encode(), mode=PRIVATE, durable=False)
    except OSError as exc:
        if on_full is None or not is_full(exc):
            raise AccessError(f"cannot write the admin token {path}: {exc.strerror or exc}") from None
        previous = _previous_token(path)
        why = f"The admin token cannot be renewed in {path}: the disk is full ({exc.strerror or exc})"
        if previous:
            on_full(f"{why}; the previous run's token in that file stays in force until a start can renew it")
            return previous
        on_full(
            f"{why}, and the file holds no token; the admin API accepts no changes until the service is "
            "started again with room on that disk (reading from loopback still works)"
        )
    return token


def _previous_token(path: Path) -> str:
    """The token an earlier start wrote, if the file still holds one and only its owner can read it (a
    token others could read is no secret: it is not used again)."""
    try:
        if os.name != "nt" and path.stat().st_mode & 0o077:
            return ""
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return token if len(token) >= 16 else ""


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def level_of(token: str, client_host: str | None, authorization: str, cookie: str) -> Level:
    presented = authorization[7:].strip() if authorization.lower().startswith("bearer ") else cookie
    if token and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return Level.WRITE
    return Level.READ if is_loopback(client_host) else Level.NONE
