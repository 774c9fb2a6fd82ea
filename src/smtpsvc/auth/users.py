"""The SMTP AUTH accounts file (``auth.users_file``): scrypt password hashes, loaded, checked and saved.

The file is TOML written by ``smtpsvc users add|remove`` and readable by a person::

    # smtpsvc SMTP AUTH accounts; managed with `smtpsvc users add|remove|list`. Never store plain passwords.
    [users."alice@example.test"]
    hash = "scrypt$n=16384,r=8,p=1$<salt base64>$<key base64>"
    created = "2026-11-22T17:00:00Z"

``hash_password``/``verify_password`` produce and check the ``scrypt$n=…,r=…,p=…$salt$key`` strings; the
scrypt parameters are read back from each string, so they can be raised later without invalidating old
hashes, and they are capped (``MAX_N``/``MAX_R``/``MAX_P``, ``MAX_MEMORY``) so a tampered file cannot make
the service burn memory or CPU. ``UserStore`` is the loaded file: ``load`` parses and validates it without
hashing anything (cheap enough to call again on SIGHUP), ``verify`` checks a password, ``add``/``remove``
change it and ``save`` writes it atomically (``safeio.replace_file``: a temp file with mode 0600 in the same
folder, fsync, rename, fsync of the folder).
``users_path`` resolves ``auth.users_file`` against the configuration file's folder.

Note for the session: ``UserStore.verify`` costs about 50 ms of CPU (one scrypt with the default parameters),
also for unknown names (it hashes against a dummy so timing does not reveal which names exist). Call it
through ``asyncio.to_thread`` and never on the event loop.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smtpsvc.config import Config
from smtpsvc.safeio import PRIVATE, replace_file

__all__ = [
    "DEFAULT_N",
    "DEFAULT_P",
    "DEFAULT_R",
    "FILE_HEADER",
    "MAX_FILE_BYTES",
    "MAX_MEMORY",
    "MAX_N",
    "MAX_NAME_LENGTH",
    "MAX_P",
    "MAX_PASSWORD_LENGTH",
    "MAX_R",
    "UserStore",
    "UsersFileError",
    "check_name",
    "check_password",
    "hash_password",
    "users_path",
    "verify_password",
]

FILE_HEADER = (
    "# smtpsvc SMTP AUTH accounts; managed with `smtpsvc users add|remove|list`. Never store plain passwords."
)

MAX_NAME_LENGTH = 255
MAX_PASSWORD_LENGTH = 1024

DEFAULT_N = 16384  # 2**14: ~50 ms and 16 MiB per hash on a current CPU
DEFAULT_R = 8
DEFAULT_P = 1
MAX_N = 2**20
MAX_R = 32
MAX_P = 16
MAX_MEMORY = 128 * 1024 * 1024  # bytes scrypt may use for one hash (passed to hashlib.scrypt as maxmem)
MAX_FILE_BYTES = 16 * 1024 * 1024  # a larger accounts file is refused unread (ours: ~200 B per account)
_SALT_BYTES = 16
_KEY_BYTES = 32
_MIN_KEY_BYTES = 16
_MAX_KEY_BYTES = 64

_HASH_RE = re.compile(
    r"scrypt\$n=(\d{1,8}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/]+={0,2})\$([A-Za-z0-9+/]+={0,2})"
)


# --------------------------------------------------------------------------------------------- names


def check_name(name: str) -> str | None:
    """Why ``name`` cannot be an account name, or None when it can (1..255 chars, no control characters)."""
    if not name:
        return "the user name is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"the user name is longer than {MAX_NAME_LENGTH} characters"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        return "the user name contains a control character"
    return None


def check_password(password: str) -> str | None:
    """Why ``password`` cannot be used, or None when it can (1..1024 chars, encodable as UTF-8)."""
    if not password:
        return "the password is empty"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"the password is longer than {MAX_PASSWORD_LENGTH} characters"
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        return "the password is not valid Unicode text"
    return None


# --------------------------------------------------------------------------------------------- hashes


@dataclass(frozen=True, slots=True)
class _Scrypt:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def encode(self) -> str:
        salt = base64.b64encode(self.salt).decode("ascii")
        key = base64.b64encode(self.key).decode("ascii")
        return f"scrypt$n={self.n},r={self.r},p={self.p}${salt}${key}"


def _cost_problem(n: int, r: int, p: int) -> str | None:
    if n < 2 or n > MAX_N or n & (n - 1):
        return f"n must be a power of 2 between 2 and {MAX_N}"
    if not 1 <= r <= MAX_R:
        return f"r must be between 1 and {MAX_R}"
    if not 1 <= p <= MAX_P:
        return f"p must be between 1 and {MAX_P}"
    if _memory(n, r, p) > MAX_MEMORY:
        return f"n={n}, r={r}, p={p} need more than {MAX_MEMORY // (1024 * 1024)} MiB"
    return None


def _memory(n: int, r: int, p: int) -> int:
    """What OpenSSL's scrypt allocates (and checks against maxmem): 128·r·(n+2) for V plus 128·r·p for B."""
    return 128 * r * (n + 2 + p)


def _parse_hash(encoded: str) -> _Scrypt:
    """Parse ``scrypt$n=…,r=…,p=…$salt$key``; ValueError (with the reason) when it is not one we accept."""
    match = _HASH_RE.fullmatch(encoded)
    if match is None:
        raise ValueError('not an scrypt hash of the form "scrypt$n=16384,r=8,p=1$<salt>$<key>"')
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    problem = _cost_problem(n, r, p)
    if problem:
        raise ValueError(f"scrypt parameters out of range: {problem}")
    try:
        salt = base64.b64decode(match.group(4), validate=True)
        key = base64.b64decode(match.group(5), validate=True)
    except binascii.Error:
        raise ValueError("the salt or key is not valid base64") from None
    if len(salt) < 8:
        raise ValueError("the salt is shorter than 8 bytes")
    if not _MIN_KEY_BYTES <= len(key) <= _MAX_KEY_BYTES:
        raise ValueError(f"the key must be {_MIN_KEY_BYTES}..{_MAX_KEY_BYTES} bytes")
    return _Scrypt(n, r, p, salt, key)


def _derive(password: str, params: _Scrypt) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=params.salt,
        n=params.n,
        r=params.r,
        p=params.p,
        maxmem=MAX_MEMORY,
        dklen=len(params.key),
    )


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """Hash ``password`` with scrypt and a random salt: ``scrypt$n=16384,r=8,p=1$<salt b64>$<key b64>``.

    ValueError when the password is empty, longer than 1024 characters, or the parameters are out of range.
    """
    problem = check_password(password) or _cost_problem(n, r, p)
    if problem:
        raise ValueError(problem)
    salt = secrets.token_bytes(_SALT_BYTES)
    key = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=MAX_MEMORY, dklen=_KEY_BYTES
    )
    return _Scrypt(n, r, p, salt, key).encode()


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded`` (constant-time compare). Never raises: a malformed or
    out-of-range hash, or an unusable password, is simply False."""
    try:
        params = _parse_hash(encoded)
    except ValueError:
        return False
    if check_password(password):
        return False
    try:
        derived = _derive(password, params)
    except (ValueError, MemoryError):
        return False
    return hmac.compare_digest(derived, params.key)


def _dummy_hash(like: _Scrypt | None) -> str:
    """A well-formed hash no password matches, with the cost of ``like`` (or the defaults): verifying
    against it costs the same time as verifying a real account."""
    n, r, p = (like.n, like.r, like.p) if like else (DEFAULT_N, DEFAULT_R, DEFAULT_P)
    key_len = len(like.key) if like else _KEY_BYTES
    return _Scrypt(n, r, p, secrets.token_bytes(_SALT_BYTES), secrets.token_bytes(key_len)).encode()


# --------------------------------------------------------------------------------------------- the file


class UsersFileError(Exception):
    """The accounts file cannot be used; ``str()`` is ``file:line: problem`` (line when known)."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class _Account:
    hash: str
    created: str


_TOML_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")


def _toml_string(text: str) -> str:
    """A TOML basic string (control characters and DEL escaped)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _locate(text: str) -> dict[tuple[str, str], int]:
    """Line numbers of ``[users."name"]`` headers (key ``(name, "")``) and of the keys below them."""
    where: dict[tuple[str, str], int] = {}
    current: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            parsed = tomllib.loads(stripped)
        except (tomllib.TOMLDecodeError, RecursionError):
            continue
        if stripped.startswith("["):
            current = None
            users = parsed.get("users")
            if isinstance(users, dict) and len(users) == 1:
                current = next(iter(users))
                where.setdefault((current, ""), number)
        elif current is not None and len(parsed) == 1:
            where.setdefault((current, next(iter(parsed))), number)
    return where


def _created_text(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, str):
        return value
    raise ValueError('must be a date-time string like "2026-11-22T17:00:00Z"')


def _now_text() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class UserStore:
    """The SMTP AUTH accounts: name → scrypt hash. Names are case-sensitive."""

    def __init__(self, accounts: Mapping[str, _Account] | None = None) -> None:
        self._accounts: dict[str, _Account] = dict(accounts or {})
        self._dummy = ""
        self._refresh_dummy()
        self.problem: UsersFileError | None = None  # set by `unusable`

    @classmethod
    def unusable(cls, problem: UsersFileError) -> UserStore:
        """The accounts of a file that cannot be used: AUTH stays offered and every `verify` raises
        `problem` (the session answers 454 4.7.0, try again later), never a yes. The service starts all the
        same: mail flow must not wait for an accounts file an operator can mend and reload (SIGHUP)."""
        store = cls()
        store.problem = problem
        return store

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UserStore:
        """Read the accounts file; a missing file is an empty store. Raises UsersFileError (with the line
        when known) for unreadable files, bad TOML and bad entries. No hashing: cheap enough for SIGHUP."""
        file = Path(path)
        try:
            with open(file, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)  # no more: a hostile file must not take the memory
        except FileNotFoundError:
            return cls()
        except IsADirectoryError:
            raise UsersFileError(path, None, "is a folder, not a file; check auth.users_file") from None
        except OSError as exc:
            raise UsersFileError(path, None, f"cannot read: {exc.strerror or exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise UsersFileError(
                path, None, f"is larger than {MAX_FILE_BYTES:,} bytes, far more than any accounts file"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise UsersFileError(path, line, "not UTF-8 text") from None
        try:
            raw = tomllib.loads(text)
        except RecursionError:
            raise UsersFileError(path, None, "invalid TOML: values nested too deep") from None
        except tomllib.TOMLDecodeError as exc:
            found = _TOML_LINE_RE.search(str(exc))
            message = _TOML_LINE_RE.sub("", str(exc)).strip()
            raise UsersFileError(
                path, int(found.group(1)) if found else None, f"invalid TOML: {message}"
            ) from None
        return cls(_accounts_from(path, text, raw))

    @property
    def has_users(self) -> bool:
        """True when at least one account exists (AUTH is advertised only then), or when the file cannot be
        used (clients that need AUTH are told to try again later, not that it is not offered)."""
        return bool(self._accounts) or self.problem is not None

    def names(self) -> list[str]:
        """The account names, sorted."""
        return sorted(self._accounts)

    def __contains__(self, name: object) -> bool:
        return name in self._accounts

    def __len__(self) -> int:
        return len(self._accounts)

    def __repr__(self) -> str:
        if self.problem is not None:
            return "UserStore(unusable)"
        return f"UserStore({len(self._accounts)} accounts)"  # never the hashes

    def verify(self, name: str, password: str) -> bool:
        """True when ``name`` exists and ``password`` is its password. An unknown name costs the same scrypt
        time (a dummy hash) so timing does not reveal which names exist. ~50 ms CPU: use a worker thread."""
        if self.problem is not None:
            raise self.problem
        account = self._accounts.get(name)
        if account is None:
            verify_password(password, self._dummy)
            return False
        return verify_password(password, account.hash)

    # ------------------------------------------------------------------ changing

    def add(self, name: str, password: str) -> bool:
        """Add ``name`` or replace its password; True when it existed (password changed). ValueError for an
        invalid name or password."""
        problem = check_name(name) or check_password(password)
        if problem:
            raise ValueError(problem)
        old = self._accounts.get(name)
        created = old.created if old else _now_text()
        self._accounts[name] = _Account(hash_password(password), created)
        self._refresh_dummy()
        return old is not None

    def remove(self, name: str) -> bool:
        """Remove ``name``; False when there was no such account."""
        if self._accounts.pop(name, None) is None:
            return False
        self._refresh_dummy()
        return True

    def render(self) -> str:
        """The file text: the header comment, then one ``[users."name"]`` table per account, sorted."""
        lines = [FILE_HEADER]
        for name in self.names():
            account = self._accounts[name]
            lines += [
                "",
                f"[users.{_toml_string(name)}]",
                f"hash = {_toml_string(account.hash)}",
                f"created = {_toml_string(account.created)}",
            ]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically: a temp file (mode 0600) in the same folder, fsync, rename, fsync the
        folder. Keeps the owner and group of the file it replaces when allowed. Raises OSError."""
        file = Path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        payload = self.render().encode("utf-8")
        replace_file(file, payload, mode=PRIVATE, prepare=lambda fd: _keep_owner(fd, file))

    def _refresh_dummy(self) -> None:
        first = next(iter(self._accounts.values()), None)
        like: _Scrypt | None = None
        if first is not None:
            try:
                like = _parse_hash(first.hash)
            except ValueError:
                like = None
        self._dummy = _dummy_hash(like)


def _accounts_from(path: str | os.PathLike[str], text: str, raw: dict[str, Any]) -> dict[str, _Account]:
    where = _locate(text)
    for key in raw:
        if key != "users":
            raise UsersFileError(path, None, f'unknown key "{key}"; only [users."name"] tables belong here')
    users = raw.get("users", {})
    if not isinstance(users, dict):
        raise UsersFileError(path, None, 'users must be tables like [users."alice@example.test"]')
    accounts: dict[str, _Account] = {}
    for name, entry in users.items():
        line = where.get((name, ""))
        problem = check_name(name)
        if problem:
            raise UsersFileError(path, line, f"user {name!r}: {problem}")
        if not isinstance(entry, dict):
            raise UsersFileError(path, line, f'user "{name}": must be a table with hash and created')
        for key in entry:
            if key not in ("hash", "created"):
                raise UsersFileError(
                    path, where.get((name, key), line), f'user "{name}": unknown key "{key}" (hash, created)'
                )
        encoded = entry.get("hash")
        if not isinstance(encoded, str):
            raise UsersFileError(
                path, where.get((name, "hash"), line), f'user "{name}": hash is missing or not a string'
            )
        try:
            _parse_hash(encoded)
        except ValueError as exc:
            raise UsersFileError(
                path, where.get((name, "hash"), line), f'user "{name}": hash: {exc}'
            ) from None
        try:
            created = _created_text(entry.get("created", ""))
        except ValueError as exc:
            raise UsersFileError(
                path, where.get((name, "created"), line), f'user "{name}": created {exc}'
            ) from None
        accounts[name] = _Account(encoded, created)
    return accounts


def _keep_owner(fd: int, replaced: Path) -> None:
    """Give the new file the owner and group of the one it replaces (e.g. `sudo smtpsvc users add` must not
    leave a root-owned file the service cannot read). Best effort: only possible when we may chown."""
    if not hasattr(os, "fchown"):
        return
    with contextlib.suppress(OSError):
        st = replaced.stat()
        os.fchown(fd, st.st_uid, st.st_gid)


def users_path(config: Config, config_path: str | os.PathLike[str] | None) -> Path:
    """The accounts file: ``auth.users_file``, a relative path resolved against the configuration file's
    folder (or the current folder without one). Always absolute. ValueError when users_file is empty."""
    name = config.auth.users_file.strip()
    if not name:
        raise ValueError('auth.users_file is empty; set it to a file name, e.g. "users.toml"')
    file = Path(name).expanduser()
    if file.is_absolute():
        return file
    base = Path(config_path).absolute().parent if config_path else Path.cwd()
    return base / file
