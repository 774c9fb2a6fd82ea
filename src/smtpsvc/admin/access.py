"""Who may do what on the admin HTTP API (SPEC 1.5): a bearer token for any change; without it, read-only,
and only from loopback. /healthz is open to anyone who can reach the port (container health checks).

The token is `admin.token_file`'s content. Without that key the service makes its own random token at start
in `<root>/admin.token` (mode 0600), so the CLI on the same machine, run by the same user, can still change
the queue of the running service; the file's permissions are the authority, as with a local socket.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from enum import IntEnum
from pathlib import Path

from smtpsvc.config import Config
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


def service_token(config: Config) -> str:
    """The token the running service checks: the configured file's, or a fresh one written at start."""
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
        raise AccessError(f"cannot write the admin token {path}: {exc.strerror or exc}") from None
    return token


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
