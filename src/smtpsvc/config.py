"""smtpsvc.toml (SPEC 1.3) parsed once into frozen dataclasses; the one reader of TOML and SMTPSVC__ vars.

``load_config`` reads the file, applies ``SMTPSVC__SECTION__KEY`` environment overrides and the CLI's
``--root``/``--listen``, validates every key and raises ``ConfigError`` listing *all* problems, each as
``file:line: key: problem``. ``render_example`` prints the commented example (every key with its default);
``render_effective`` prints the effective configuration with the verb mask decoded. One table (``_SCHEMA``)
drives parsing, defaults, the example and the effective rendering, so they cannot drift apart.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import json
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeAlias
from urllib.parse import urlsplit

from smtpsvc import verbmask
from smtpsvc.units import Rate, format_duration, format_size, parse_duration, parse_rate, parse_size

# Dotted keys (fnmatch patterns) that are parsed and validated but whose feature is not built yet.
# `config check` warns when the file or environment sets one. Empty now that every key is in effect; kept
# so that a key can be announced before its feature lands.
NOT_YET_EFFECTIVE: frozenset[str] = frozenset()

# Dotted keys the service reads only at its start (sockets, processes, the resolver, the queue backend, the
# number of deliveries at once): a reload that changes one says it waits for a restart (`restart_needed`).
RESTART_ONLY: tuple[str, ...] = (
    "server.listen",
    "server.workers",
    "server.delivery_nice",
    "resolver.nameservers",
    "resolver.negative_cache_max",
    "admin.listen",
    "queue.backend",
    "queue.dsn",
    "queue.node_id",
    "queue.lease",
    "delivery.max_connections",
    "protocol_log.enabled",
    "protocol_log.directory",
    "protocol_log.max_size",
    "protocol_log.max_files",
)

__all__ = [
    "NOT_YET_EFFECTIVE",
    "RESTART_ONLY",
    "AdminConfig",
    "AuthConfig",
    "BadmailConfig",
    "CategorizerConfig",
    "Config",
    "ConfigError",
    "ConfigProblem",
    "ConnectorAuth",
    "ConnectorConfig",
    "DeliveryConfig",
    "DomainsConfig",
    "ExtensionsConfig",
    "HostPort",
    "IPNetwork",
    "OAuthProfile",
    "ProtocolLogConfig",
    "QueueConfig",
    "RelayConfig",
    "RemoteDomain",
    "ResolverConfig",
    "ServerConfig",
    "TlsConfig",
    "auth_oauth_problems",
    "decide_workers",
    "default_config_path",
    "format_listen",
    "load_config",
    "parse_address_space",
    "parse_domain",
    "parse_host_port",
    "parse_listen",
    "parse_nameserver",
    "parse_network",
    "parse_smart_hosts",
    "render_effective",
    "render_example",
    "restart_needed",
    "warnings_for",
    "worker_count",
]

ENV_PREFIX = "SMTPSVC__"
CONFIG_ENV = "SMTPSVC_CONFIG"
DEFAULT_FILE_NAME = "smtpsvc.toml"
DEFAULTS_SOURCE = "<defaults>"

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


# --------------------------------------------------------------------------------------------- the result


@dataclass(frozen=True, slots=True)
class HostPort:
    """A smart host: a name (resolved via DNS) or an address literal (``literal``: connect to it as is).

    ``port`` None means ``delivery.remote_port``. ``str()`` gives back the IIS notation: ``[1.2.3.4]:2525``.
    """

    host: str
    port: int | None = None
    literal: bool = False

    def __str__(self) -> str:
        host = self.host
        if self.literal:
            host = f"[IPv6:{host}]" if ":" in host else f"[{host}]"
        return host if self.port is None else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    hostname: str
    root: Path
    listen: tuple[tuple[str, int], ...]
    max_connections: int
    workers: int | Literal["auto"]  # the setting; `worker_count` says how many processes that is
    delivery_nice: int
    connection_timeout: float
    data_timeout: float
    max_message_size: int
    max_session_size: int
    max_recipients: int
    max_hop_count: int
    max_errors: int
    reverse_dns: bool
    masquerade_domain: str
    inbound_command_support_options: int


@dataclass(frozen=True, slots=True)
class ExtensionsConfig:
    """``explicit``: the keys set in [extensions]; ``resolved``: each extension → (on, why) after the mask."""

    mask: int
    explicit: Mapping[str, bool]
    resolved: Mapping[str, tuple[bool, str]]

    def enabled(self, name: str) -> bool:
        return self.resolved[name.lower()][0]

    def why(self, name: str) -> str:
        return self.resolved[name.lower()][1]


@dataclass(frozen=True, slots=True)
class RemoteDomain:
    name: str
    relay: bool = False
    route: str = ""


@dataclass(frozen=True, slots=True)
class DomainsConfig:
    local: tuple[str, ...]
    remote: tuple[RemoteDomain, ...]


@dataclass(frozen=True, slots=True)
class RelayConfig:
    allow: tuple[IPNetwork, ...]
    deny: tuple[IPNetwork, ...]
    allow_authenticated: bool


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """IIS's Connection control (IPSecurity): who may connect at all. Empty lists (the default): everyone."""

    allow: tuple[IPNetwork, ...]  # non-empty: "Only the list below"
    deny: tuple[IPNetwork, ...]  # non-empty: "All except the list below"; wins over allow


@dataclass(frozen=True, slots=True)
class AuthConfig:
    users_file: str
    mechanisms: tuple[str, ...]
    require_tls: bool


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert: str
    key: str
    require: bool


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    smart_host: tuple[HostPort, ...]
    smart_host_auth: ConnectorAuth
    smart_host_type: str
    remote_port: int
    retry: tuple[float, ...]
    delay_notification: float
    expiration: float
    max_messages_per_connection: int
    max_connections: int
    max_connections_per_domain: int
    initial_connections_per_domain: int
    timeout: float
    connect_timeout: float
    greeting_timeout: float
    mail_timeout: float
    rcpt_timeout: float
    data_timeout: float
    data_block_timeout: float
    final_timeout: float
    tls: str
    send_ndr_copy_to: str
    suppress_xexch50_external: bool
    # MTA-STS and TLS reporting (routing/mtasts.py, delivery/tlsrpt.py; docs/delivery.md "MTA-STS").
    mta_sts_ca_file: str = ""
    mta_sts_port: int = 443  # testing only: RFC 8461 fetches from port 443
    tlsrpt_organization: str = ""
    # The provider's limits for the default smart host (delivery/budget.py), as a connector's below.
    smart_host_rate: Rate | None = None
    smart_host_recipients_per_day: int = 0
    dkim_on_error: str = "defer"  # a [[dkim]] key that cannot be used: "defer" or "send-unsigned"


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    nameservers: tuple[tuple[str, int], ...]
    negative_cache_max: float


@dataclass(frozen=True, slots=True)
class ConnectorAuth:
    """Outbound AUTH of a route: a connector's `auth`, or `delivery.smart_host_auth`. `mechanism` "auto"
    sends PLAIN, else LOGIN, with the password in `password_file`; "xoauth2" and "oauthbearer" log in as the
    mailbox `user` with a token of the `[oauth.NAME]` profile named by `oauth`."""

    user: str = ""
    password_file: str = ""
    mechanism: str = "auto"  # "auto" | "plain" | "login" | "xoauth2" | "oauthbearer"
    oauth: str = ""  # the [oauth.NAME] profile, for xoauth2 and oauthbearer

    @property
    def enabled(self) -> bool:
        """AUTH is sent: a user (a `password_file` alone sends none, as before)."""
        return bool(self.user)

    @property
    def bearer(self) -> bool:
        """Logs in with an OAuth 2.0 token instead of a password."""
        return self.mechanism in BEARER_MECHANISMS


@dataclass(frozen=True, slots=True)
class ConnectorConfig:
    name: str
    address_spaces: tuple[str, ...]
    cost: int
    smart_hosts: tuple[HostPort, ...]
    use_helo: bool
    tls: str
    auth: ConnectorAuth
    xexch50: bool
    # The Microsoft Graph transport (docs/delivery.md "Microsoft Graph"): transport = "graph" sends this
    # connector's mail with Graph sendMail as `mailbox` (empty: the envelope sender), logged in with the
    # [oauth.NAME] profile `oauth`; `ca_file` trusts a private CA for `graph_url`.
    transport: str = "smtp"
    oauth: str = ""
    mailbox: str = ""
    graph_url: str = "https://graph.microsoft.com/v1.0"
    ca_file: str = ""
    # The provider's limits (delivery/budget.py): messages per interval, recipients in any 24 hours.
    rate: Rate | None = None
    recipients_per_day: int = 0


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One [[dkim]] table: a key that signs mail whose From: domain is `domain` ("*": the default signer)."""

    domain: str
    selector: str
    key_file: str
    algorithm: str


@dataclass(frozen=True, slots=True)
class CategorizerConfig:
    reset_message_status: bool


@dataclass(frozen=True, slots=True)
class BadmailConfig:
    max_size: int


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: tuple[str, int] | None  # None: admin API off (listen = "")
    token_file: str


@dataclass(frozen=True, slots=True)
class QueueConfig:
    backend: str
    dsn: str
    node_id: str
    lease: float


@dataclass(frozen=True, slots=True)
class ProtocolLogConfig:
    """`[protocol_log]`: the W3C protocol log of every SMTP conversation (smtpsvc.protolog)."""

    enabled: bool = False
    directory: str = ""  # "": <root>/log/protocol
    max_size: int = 10 * 1024 * 1024
    max_files: int = 10

    def folder(self, root: Path | str) -> Path:
        """Where the files are: `directory` (a relative one under the mailroot); default root/log/protocol."""
        if not self.directory:
            return Path(root) / "log" / "protocol"
        path = Path(self.directory)
        return path if path.is_absolute() else Path(root) / path


@dataclass(frozen=True, slots=True)
class OAuthProfile:
    """One `[oauth.NAME]` table: where and how smtpsvc gets OAuth 2.0 access tokens (smtpsvc.oauth). Only
    file paths: the secrets stay in their files, so no repr, `config show` or event can carry one."""

    name: str
    provider: str  # "microsoft" | "google" | "generic"
    tenant: str
    client_id: str
    client_secret_file: str
    certificate_file: str
    key_file: str
    refresh_token_file: str
    scope: str  # the provider's default filled in
    token_url: str  # the provider's default filled in, {tenant} replaced
    ca_file: str

    @property
    def grant(self) -> str:
        """The grant the profile uses: "refresh_token" when it has a refresh token, else client credentials
        (with a certificate: a signed client assertion; else the client secret)."""
        return "refresh_token" if self.refresh_token_file else "client_credentials"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    extensions: ExtensionsConfig
    domains: DomainsConfig
    relay: RelayConfig
    connection: ConnectionConfig
    auth: AuthConfig
    tls: TlsConfig
    delivery: DeliveryConfig
    resolver: ResolverConfig
    connectors: tuple[ConnectorConfig, ...]
    categorizer: CategorizerConfig
    badmail: BadmailConfig
    admin: AdminConfig
    queue: QueueConfig
    source: str  # the file read, or "<defaults>"
    oauth: dict[str, OAuthProfile] = field(default_factory=dict)  # [oauth.NAME] by NAME
    dkim: tuple[DkimKey, ...] = ()  # [[dkim]] tables: DKIM signing keys
    protocol_log: ProtocolLogConfig = ProtocolLogConfig()  # [protocol_log]
    explicit_keys: frozenset[str] = field(default=frozenset())  # dotted keys set by file, env or CLI
    cli_overrides: frozenset[str] = field(default=frozenset())  # of those, set by `serve --root`/`--listen`

    @property
    def local_domains(self) -> tuple[str, ...]:
        """domains.local, or when empty: the domain of server.hostname (the hostname minus its first label),
        the hostname itself and "localhost" (mail addressed to this machine is local, as in Postfix's
        default mydestination)."""
        if self.domains.local:
            return self.domains.local
        host = self.server.hostname.lower().rstrip(".")
        names = [host.split(".", 1)[1] if "." in host else host, host, "localhost"]
        return tuple(dict.fromkeys(names))

    @property
    def warnings(self) -> list[str]:
        """`config check` warnings (also logged at the start and after a reload): keys set here whose
        feature is not built yet (see NOT_YET_EFFECTIVE), and a verb mask that looks like a mistake."""
        mask = verbmask.mask_warnings(
            "server.inbound_command_support_options", self.extensions.mask, self.extensions.explicit
        )
        return warnings_for(self.explicit_keys) + mask


class LiveConfig:
    """The configuration in force. Every running part reads it through one shared LiveConfig; a reload
    swaps `current` here, once, so no part can be left on the old configuration."""

    __slots__ = ("current",)

    def __init__(self, config: Config) -> None:
        self.current = config


# --------------------------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One problem: where (file, or ``$SMTPSVC__…`` for an env override; line when known), which key, what."""

    file: str
    line: int | None
    key: str
    problem: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return ": ".join(part for part in (where, self.key, self.problem) if part)


class ConfigError(Exception):
    """Every problem found in one load, in file order; ``str()`` is one ``file:line: key: problem`` a line."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems: list[ConfigProblem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# --------------------------------------------------------------------------------------------- value parsers

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"a string ({json.dumps(shown, ensure_ascii=False)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _need_str(value: object, example: str = "") -> str:
    if not isinstance(value, str):
        hint = f" like {example}" if example else ""
        raise ValueError(f"expected a string{hint}, got {_describe(value)}")
    return value


def _items(value: object, what: str) -> list[object]:
    if not isinstance(value, list):
        raise ValueError(f"expected an array of {what}, got {_describe(value)}")
    return value


def _each(value: object, what: str, convert: Callable[[Any], Any]) -> tuple[Any, ...]:
    out = []
    for number, item in enumerate(_items(value, what), 1):
        try:
            out.append(convert(item))
        except ValueError as exc:
            raise ValueError(f"item {number}: {exc}") from None
    return tuple(out)


def _port(text: str, *, allow_zero: bool = False) -> int:
    low = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= 65535:
        raise ValueError(f'invalid port "{text}": expected a number from {low} to 65535')
    return int(text)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def parse_domain(text: object, what: str = "domain") -> str:
    """A DNS name, lower-cased, without a trailing dot; internationalised names become their xn-- form."""
    raw = _need_str(text, '"example.com"')
    name = raw.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f'invalid {what} "{raw}"') from None
    if len(name) > 253 or not _DOMAIN_RE.fullmatch(name):
        raise ValueError(f'invalid {what} "{raw}": expected a DNS name like "example.com"')
    return name


def parse_address_space(text: object) -> str:
    """A connector address space: ``*`` (everything else), ``*.example.com`` or ``example.com``."""
    raw = _need_str(text, '"example.com" or "*.example.com" or "*"')
    space = raw.strip()
    if space == "*":
        return space
    if space.startswith("*."):
        return "*." + parse_domain(space[2:], "address space")
    return parse_domain(space, "address space")


def parse_network(text: object) -> IPNetwork:
    """A client network: CIDR (host bits are masked off) or a bare address (/32 or /128)."""
    raw = _need_str(text, '"192.0.2.0/24"')
    try:
        return ipaddress.ip_network(raw.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f'invalid network "{raw}": expected an address or CIDR like "192.0.2.0/24"'
        ) from None


def parse_listen(text: object) -> tuple[str, int]:
    """``"0.0.0.0:25"``, ``"[::1]:2525"`` or ``"localhost:2525"`` → (host, port); port 0 = any free port."""
    raw = _need_str(text, '"0.0.0.0:25"')
    value = raw.strip()
    hint = 'expected HOST:PORT, e.g. "0.0.0.0:25" or "[::1]:2525"'
    bracketed = re.fullmatch(r"\[([^\]]*)\]:(.*)", value)
    if bracketed:
        try:
            host = str(ipaddress.IPv6Address(bracketed.group(1)))
        except ValueError:
            raise ValueError(f'invalid listen address "{raw}": [{bracketed.group(1)}] is not IPv6') from None
        return host, _port(bracketed.group(2), allow_zero=True)
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f'invalid listen address "{raw}": {hint}')
    if ":" in host:
        raise ValueError(f'invalid listen address "{raw}": write IPv6 addresses in brackets, e.g. "[::1]:25"')
    if not _is_ipv4(host):
        host = parse_domain(host, "listen host")
    return host, _port(port, allow_zero=True)


def format_listen(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(text: object) -> HostPort:
    """One smart host: ``host``, ``host:port``, ``[1.2.3.4]``, ``[1.2.3.4]:2525``, ``[IPv6:::1]:25``.

    A bare IPv4 address counts as a literal (no DNS lookup), as if written in brackets.
    """
    raw = _need_str(text, '"relay.example.com:25" or "[192.0.2.1]"')
    value = raw.strip()
    if not value:
        raise ValueError("empty host")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ValueError(f'invalid host "{raw}": missing "]"')
        inner, rest = value[1:close], value[close + 1 :]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
        try:
            address = ipaddress.ip_address(inner)
        except ValueError:
            raise ValueError(f'invalid host "{raw}": [{inner}] is not an IP address literal') from None
        if rest and not rest.startswith(":"):
            raise ValueError(f'invalid host "{raw}": expected ":PORT" after "]"')
        return HostPort(str(address), _port(rest[1:]) if rest else None, True)
    try:
        return HostPort(str(ipaddress.IPv6Address(value)), None, True)
    except ValueError:
        pass
    host, sep, port = value.rpartition(":") if ":" in value else (value, "", "")
    if ":" in host:
        raise ValueError(f'invalid host "{raw}": write IPv6 literals as "[IPv6:2001:db8::1]:25"')
    number = _port(port) if sep else None
    if _is_ipv4(host):
        return HostPort(host, number, True)
    return HostPort(parse_domain(host, "host name"), number, False)


def parse_smart_hosts(text: object) -> tuple[HostPort, ...]:
    """``delivery.smart_host``: one or more hosts separated by ``;`` (empty string: none)."""
    raw = _need_str(text, '"relay.example.com:25;[192.0.2.1]"')
    hosts = []
    for part in raw.split(";"):
        if part.strip():
            try:
                hosts.append(parse_host_port(part))
            except ValueError as exc:
                raise ValueError(f'"{part.strip()}": {exc}') from None
    return tuple(hosts)


def parse_nameserver(text: object) -> tuple[str, int]:
    """``"127.0.0.1"``, ``"127.0.0.1:5353"``, ``"::1"`` or ``"[::1]:5353"`` → (ip, port); default port 53."""
    raw = _need_str(text, '"127.0.0.1:5353"')
    value = raw.strip()
    try:
        return str(ipaddress.ip_address(value)), 53
    except ValueError:
        pass
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(.*))?", value)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
    else:
        host, _, port = value.rpartition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f'invalid nameserver "{raw}": expected an IP address, optionally with :PORT'
        ) from None
    return str(address), 53 if port is None else _port(port)


def _format_nameserver(server: tuple[str, int]) -> str:
    host, port = server
    if port == 53:
        return host
    return format_listen(server)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _str(value: object) -> str:
    return _need_str(value)


def _int(low: int, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ValueError(f"must be {bound}, got {value}")
        return value

    return convert


def _workers(value: object) -> int | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, str) and value.strip().isdigit():  # an env override: its default is text ("auto")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f'expected "auto" or a number of processes from 1 to 64, got {_describe(value)}')
    return _int(1, 64)(value)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), else all of them."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def can_share_ports() -> bool:
    """Several processes may accept on one port (SO_REUSEPORT, spreading connections): Linux and the BSDs,
    not Windows (its SO_REUSEADDR lets a second process steal a port, not share it)."""
    return hasattr(socket, "SO_REUSEPORT") and os.name != "nt"


def decide_workers(setting: int | Literal["auto"], backend: str, cores: int, share_ports: bool) -> int:
    """How many SMTP processes a setting means. "auto": one per core, so the service uses the machine as
    installed (docs/performance.md), but a single process where workers cannot run (the PostgreSQL queue:
    its nodes scale instead; no SO_REUSEPORT) or would gain nothing (one core). At most 64. Pure."""
    if setting != "auto":
        return setting
    if backend != "local" or not share_ports:
        return 1
    return max(1, min(cores, 64))


def can_run_python_again() -> bool:
    """A worker is a new run of this interpreter: a user that may not run it (e.g. a Python installed
    under a home folder closed to the service's user) gets one process with "auto", not a deaf service
    whose workers cannot start."""
    return bool(sys.executable) and os.access(sys.executable, os.X_OK)


def worker_count(cfg: Config) -> int:
    """The number of processes receiving SMTP with this configuration (`server.workers` decided)."""
    possible = can_share_ports() and (cfg.server.workers != "auto" or can_run_python_again())
    return decide_workers(cfg.server.workers, cfg.queue.backend, usable_cores(), possible)


def _choice(*options: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        shown = ", ".join(f'"{o}"' for o in options)
        if not isinstance(value, str) or value.strip().lower() not in options:
            raise ValueError(f"expected one of {shown}, got {_describe(value)}")
        return value.strip().lower()

    return convert


def _duration_or_zero(value: object) -> float:
    """A duration that may be "0s" (for a key where 0 turns something off)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'expected a duration string like "30s", got {_describe(value)}')
    return parse_duration(value)


def _duration(value: object) -> float:
    seconds = _duration_or_zero(value)
    if seconds <= 0:
        raise ValueError(f'must be longer than 0, got "{value}"')
    return seconds


def _size(value: object) -> int:
    if isinstance(value, float):
        raise ValueError(f'expected bytes as an integer or a string like "100MB", got {_describe(value)}')
    return parse_size(value)


def _retry(value: object) -> tuple[float, ...]:
    schedule = _each(value, 'durations like "15m"', _duration)
    if not schedule:
        raise ValueError('must not be empty; e.g. ["15m", "30m", "60m", "240m"] (the last repeats)')
    return schedule


def _hostname(value: object) -> str:
    raw = _need_str(value, '"mail.example.com"')
    if not raw.strip():
        raise ValueError('must not be empty; e.g. "mail.example.com"')
    parse_domain(raw, "host name")
    return raw.strip().rstrip(".")


def _root(value: object) -> Path:
    text = _need_str(value, '"mailroot" or "/var/spool/smtpsvc"')
    if not text.strip():
        raise ValueError('must not be empty; e.g. "mailroot"')
    return Path(text)


def _optional_domain(value: object) -> str:
    text = _need_str(value, '"example.com"')
    return parse_domain(text) if text.strip() else ""


def _listen_list(value: object) -> tuple[tuple[str, int], ...]:
    if isinstance(value, str):  # one address is fine too (handy in SMTPSVC__SERVER__LISTEN)
        return (parse_listen(value),)
    listen = _each(value, 'addresses like "0.0.0.0:25"', parse_listen)
    if not listen:
        raise ValueError('must not be empty; e.g. ["0.0.0.0:25"]')
    return listen


def _admin_listen(value: object) -> tuple[str, int] | None:
    text = _need_str(value, '"127.0.0.1:8025" (or "" for no admin API)')
    return parse_listen(text) if text.strip() else None


def _send_ndr_copy_to(value: object) -> str:
    text = _need_str(value, '"postmaster@example.com"').strip()
    if text and (text.count("@") != 1 or not all(text.split("@"))):
        raise ValueError(f'invalid address "{text}": expected "user@domain" or ""')
    return text


def _mechanisms(value: object) -> tuple[str, ...]:
    def one(item: object) -> str:
        name = _need_str(item, '"PLAIN"').strip().upper()
        if name not in ("PLAIN", "LOGIN"):
            raise ValueError(f'unsupported mechanism "{item}"; supported: "PLAIN", "LOGIN"')
        return name

    return _each(value, 'mechanisms like "PLAIN"', one)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f'; did you mean "{close[0]}"?' if close else ""


# IIS and Exchange names an administrator may type that no one key carries as its `iis` name (keys that do
# are hinted from the schema): the keys that do their job instead.
_IIS_ONLY_HINTS = {
    # Exchange 5.5 IMS registry value (Q206968): bits 1 deny list, 2 allow list, 8 authenticated clients.
    "relayflags": (
        "relay.deny, relay.allow, relay.allow_authenticated",
        "Exchange 5.5 RelayFlags bits 1, 2 and 8, Q206968; bit 4, RelayLocalIPList, has no equivalent",
    ),
    # The metabase blob behind the Connection dialog (IIsIPSecuritySetting's IPGrant/IPDeny name the keys).
    "ipsecurity": (
        "connection.allow, connection.deny",
        'IIS Connection control, IPSecurity: "Only the list below" and "All except the list below"',
    ),
    "grantbydefault": (
        "connection.allow, connection.deny",
        'IIS Connection control: GrantByDefault true is a deny list ("All except the list below")',
    ),
}


def _iis_hint(word: str) -> str:
    """A did-you-mean for an IIS metabase or Exchange registry name (any case): the smtpsvc key(s) that
    replace it; "" when `word` is not one."""
    if word.lower() in _IIS_ONLY_HINTS:
        replacements, why = _IIS_ONLY_HINTS[word.lower()]
        return f"; did you mean {replacements}? ({why})"
    for section, keys in _SCHEMA.items():
        for key in keys:
            if key.iis and key.iis.lower() == word.lower():
                return f'; did you mean "{section}.{key.name}"? (the IIS name {key.iis})'
    return ""


def _table(value: object, what: str, known: Sequence[str]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"expected {what}, got {_describe(value)}")
    for key in value:
        if key not in known:
            raise ValueError(f'unknown key "{key}"{_suggest(key, known)} (known: {", ".join(known)})')
    return value


def _remote_domain(value: object) -> RemoteDomain:
    table = _table(value, 'a table like { name = "partner.test", relay = true }', ("name", "relay", "route"))
    if "name" not in table:
        raise ValueError('missing "name"')
    try:
        return RemoteDomain(
            name=parse_domain(table["name"]),
            relay=_bool(table.get("relay", False)),
            route=_str(table.get("route", "")).strip(),
        )
    except ValueError as exc:
        raise ValueError(f"{table.get('name', '?')}: {exc}") from None


def _remote_domains(value: object) -> tuple[RemoteDomain, ...]:
    return _each(value, 'tables like { name = "partner.test", relay = true }', _remote_domain)


# -- outbound AUTH: a connector's `auth` and `delivery.smart_host_auth` (one table, one parser) ---------
AUTH_MECHANISMS = ("auto", "plain", "login", "xoauth2", "oauthbearer")
BEARER_MECHANISMS = ("xoauth2", "oauthbearer")
_AUTH_KEYS = ("user", "password_file", "mechanism", "oauth")
_AUTH_DEFAULT: dict[str, object] = {"user": "", "password_file": ""}


def _connector_auth(value: object) -> ConnectorAuth:
    table = _table(value, 'a table like { user = "", password_file = "" }', _AUTH_KEYS)
    auth = ConnectorAuth(
        user=_str(table.get("user", "")).strip(),
        password_file=_str(table.get("password_file", "")),
        mechanism=_choice(*AUTH_MECHANISMS)(table.get("mechanism", "auto")),
        oauth=_str(table.get("oauth", "")).strip(),
    )
    if auth.bearer:
        example = f'{{ mechanism = "{auth.mechanism}", user = "relay@contoso.com", oauth = "m365" }}'
        if not auth.user:
            raise ValueError(
                f'mechanism = "{auth.mechanism}" needs user, the mailbox to log in as: {example}'
            )
        if not auth.oauth:
            raise ValueError(
                f'mechanism = "{auth.mechanism}" needs oauth, the name of an [oauth.NAME] profile: {example}'
            )
        if auth.password_file:
            raise ValueError(
                f'password_file is not used with mechanism = "{auth.mechanism}": the token of the '
                "[oauth.NAME] profile replaces the password; remove password_file"
            )
        return auth
    if auth.oauth:
        raise ValueError(
            f'oauth = "{auth.oauth}" needs mechanism = "xoauth2" (Microsoft 365, Google) or "oauthbearer"'
        )
    if auth.user and not auth.password_file:
        raise ValueError("user is set but password_file is not: name the file that holds the password")
    if auth.mechanism != "auto" and not auth.user:
        raise ValueError(f'mechanism = "{auth.mechanism}" needs user and password_file')
    return auth


def _show_auth(auth: ConnectorAuth) -> dict[str, str]:
    shown = {"user": auth.user, "password_file": auth.password_file}  # the file's name, never its content
    if auth.mechanism != "auto":
        shown["mechanism"] = auth.mechanism
    if auth.oauth:
        shown["oauth"] = auth.oauth
    return shown


def auth_oauth_problems(cfg: Config, profiles: Collection[str]) -> list[tuple[str, str, int | None, str]]:
    """The auth tables whose `oauth` names no `[oauth.NAME]` profile among `profiles`, as (section, key,
    connector index or None, problem) for `_Loader.report`. Wired into `_cross_checks` with the oauth
    profiles (`cfg.oauth`) where both exist: `for s, k, i, p in auth_oauth_problems(cfg, cfg.oauth):
    loader.report(s, k, p, i)`."""
    known = sorted(profiles)
    hint = f"; known: {', '.join(known)}" if known else "; there is no [oauth.NAME] profile"
    tables: list[tuple[str, str, int | None, ConnectorAuth]] = [
        ("delivery", "smart_host_auth", None, cfg.delivery.smart_host_auth)
    ]
    tables += [("connector", "auth", index, c.auth) for index, c in enumerate(cfg.connectors)]
    return [
        (section, key, index, f'oauth = "{auth.oauth}" names no [oauth.{auth.oauth}] profile{hint}')
        for section, key, index, auth in tables
        if auth.bearer and auth.oauth not in profiles
    ]


def _connector_name(value: object) -> str:
    name = _need_str(value, '"partners"').strip()
    if not name:
        raise ValueError("must not be empty")
    return name


def _address_spaces(value: object) -> tuple[str, ...]:
    spaces = _each(value, 'domains like "partner.test"', parse_address_space)
    if not spaces:
        raise ValueError('must not be empty; e.g. ["partner.test", "*.partner.test"] or ["*"]')
    return spaces


# -- the Microsoft Graph transport's connector keys: transport, oauth, mailbox, graph_url, ca_file

CONNECTOR_TRANSPORTS = ("smtp", "graph")
GRAPH_URL = "https://graph.microsoft.com/v1.0"
_MAILBOX_RE = re.compile(r"[^@\s/?#%]+@[A-Za-z0-9.-]+")  # it becomes a URL path segment: no / ? # %


def _graph_mailbox(value: object) -> str:
    mailbox = _need_str(value, '"relay@contoso.com"').strip()
    if mailbox and not _MAILBOX_RE.fullmatch(mailbox):
        raise ValueError(f'"{mailbox}" is not a mailbox address like "relay@contoso.com"')
    return mailbox


def _graph_url(value: object) -> str:
    url = _need_str(value, f'"{GRAPH_URL}"').strip().rstrip("/")
    if not re.fullmatch(r"https://[^/\s?#]+(/[^\s?#]*)?", url):
        raise ValueError(f'"{url}" is not an https:// URL like "{GRAPH_URL}"')
    return url


def _check_graph_connector(loader: _Loader, values: Mapping[str, Any], index: int) -> None:
    """A graph connector logs in with an OAuth profile and has no SMTP next hop; an SMTP connector carries
    no Graph keys (a forgotten `transport = "graph"` would otherwise send by SMTP silently)."""
    if values["transport"] != "graph":
        for key in ("oauth", "mailbox", "ca_file"):
            if values[key]:
                loader.report("connector", key, f'{key} is used by transport = "graph" only', index)
        return
    if not values["oauth"]:
        loader.report(
            "connector",
            "oauth",
            'transport = "graph" needs oauth = "NAME", an [oauth.NAME] profile with the Graph scope',
            index,
        )
    if values["smart_hosts"]:
        loader.report(
            "connector", "smart_hosts", 'transport = "graph" sends to graph_url: remove smart_hosts', index
        )
    if values["auth"] is not None and values["auth"].user:
        loader.report(
            "connector", "auth", 'transport = "graph" logs in with its oauth profile: remove auth', index
        )


def _host_of(url: str) -> str:
    return urlsplit(url).hostname or ""


def _same_host(scope: str, url: str) -> bool:
    """Whether an OAuth scope such as https://graph.microsoft.com/.default is for the host of `url`."""
    return _host_of(scope).lower() == _host_of(url).lower()


def check_graph_oauth_profiles(loader: _Loader, cfg: Config, profiles: Iterable[str]) -> None:
    """Cross-check (wired where `Config.oauth` is known): each graph connector's `oauth` names an
    [oauth.NAME] profile."""
    known = set(profiles)
    for index, connector in enumerate(cfg.connectors):
        if connector.transport == "graph" and connector.oauth and connector.oauth not in known:
            names = f"; known: {', '.join(sorted(known))}" if known else "; there is no [oauth.NAME] profile"
            loader.report(
                "connector",
                "oauth",
                f'{connector.name}: oauth = "{connector.oauth}" names no [oauth.{connector.oauth}] '
                f"profile{names}",
                index,
            )


# --------------------------------------------------------------------------------------------- the schema

_COMPUTED = object()  # a default worked out at load time (hostname, node id)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class _Key:
    """One config key: its TOML default, how to parse it, how to show a parsed value back as TOML, its doc."""

    name: str
    default: object
    parse: Callable[[Any], Any]
    doc: str
    iis: str = ""
    show: Callable[[Any], Any] = _same
    text: bool = False  # a plain string: an env override is taken verbatim unless it is a quoted TOML string


def _k(
    name: str,
    default: object,
    parse: Callable[[Any], Any],
    doc: str,
    iis: str = "",
    show: Callable[[Any], Any] = _same,
) -> _Key:
    return _Key(name, default, parse, doc, iis, show, text=isinstance(default, str) or default is _COMPUTED)


def _show_durations(values: tuple[float, ...]) -> list[str]:
    return [format_duration(v) for v in values]


def _budget_keys(prefix: str, what: str) -> tuple[_Key, ...]:
    """A provider's sending limits (Exchange Online: 30 messages a minute, 10,000 recipients a day per
    mailbox): `rate` and `recipients_per_day` of a connector, `smart_host_...` of the default smart host."""
    return (
        _k(
            prefix + "rate",
            "",
            parse_rate,
            f'messages {what} may send in any interval, "N/s|min|h|day" (e.g. "30/min"); "" = no limit; '
            "more wait in the queue",
            show=lambda v: str(v) if v is not None else "",
        ),
        _k(
            prefix + "recipients_per_day",
            0,
            _int(0),
            f"recipients {what} may send to in any 24 hours; 0 = no limit; more wait in the queue",
        ),
    )


# "dane-or-mta-sts": enforce what the domain publishes (DANE TLSA records where DNSSEC-signed, else its
# MTA-STS policy for MX delivery; docs/delivery.md), opportunistic otherwise.
_TLS_POLICIES = ("none", "opportunistic", "required", "dane-or-mta-sts")
_smart_host_type = _choice("always", "after_direct")
_tls_policy = _choice(*_TLS_POLICIES)
_backend = _choice("local", "postgres")

_SCHEMA: dict[str, tuple[_Key, ...]] = {
    "server": (
        _k(
            "hostname",
            _COMPUTED,
            _hostname,
            "name in the banner, EHLO, Received and DSNs; default: this machine's FQDN",
            "FullyQualifiedDomainName",
        ),
        _k(
            "root",
            "mailroot",
            _root,
            "mailroot: pickup/, queue/, drop/, badmail/, log/ (relative to the working directory)",
            show=str,
        ),
        _k(
            "listen",
            ["127.0.0.1:2525"],
            _listen_list,
            'addresses to accept SMTP on; production: ["0.0.0.0:25"]',
            show=lambda v: [format_listen(a) for a in v],
        ),
        _k("max_connections", 1000, _int(1), "inbound sessions at once; past it: 421 4.7.0 and event 402"),
        _k(
            "workers",
            "auto",
            _workers,
            'processes accepting SMTP on the listen addresses (SO_REUSEPORT); "auto": one per core (1 with '
            "the PostgreSQL queue or without SO_REUSEPORT); 1: a single process for everything",
        ),
        _k(
            "delivery_nice",
            0,
            _int(0, 19),
            "with workers > 1 (Linux): how much lower the delivering main process's CPU priority is than "
            "the workers'; when the CPU is short, mail being received goes first; 0 (the default): the same",
        ),
        _k(
            "connection_timeout",
            "10m",
            _duration,
            "idle limit, and the deadline for one command line",
            show=format_duration,
        ),
        _k("data_timeout", "10m", _duration, "limit for a whole DATA/BDAT transfer", show=format_duration),
        _k(
            "max_message_size",
            2097152,
            _size,
            'bytes (or "2MB"); advertised as SIZE',
            "MaxMessageSize",
            show=format_size,
        ),
        _k(
            "max_session_size",
            10485760,
            _size,
            "bytes a session may send in all",
            "MaxSessionSize",
            show=format_size,
        ),
        _k("max_recipients", 100, _int(1), "per message; excess RCPT: 452 4.5.3", "MaxRecipients"),
        _k(
            "max_hop_count",
            15,
            _int(1),
            "Received headers; past it: 554 5.4.6 at end of DATA (Pickup: Badmail)",
        ),
        _k("max_errors", 10, _int(1), "bad commands per session before 421"),
        _k("reverse_dns", False, _bool, '"unverified" in Received when the PTR does not match'),
        _k(
            "masquerade_domain",
            "",
            _optional_domain,
            'domain that replaces the sender\'s in MAIL FROM; "" = off',
        ),
        _k(
            "inbound_command_support_options",
            verbmask.DEFAULT_MASK,
            _int(0, verbmask.MAX_MASK),
            "verb mask (SPEC 2.2); 3503297 stops advertising 8BITMIME (KB286673)",
            "SmtpInboundCommandSupportOptions",
        ),
    ),
    "extensions": tuple(
        _k(
            name,
            default,
            _bool,
            f"overrides mask bit 0x{verbmask.MASK_CONTROLLED[name].bit:X} when set"
            if name in verbmask.MASK_CONTROLLED
            else "advertise " + verbmask.EHLO_KEYWORDS[name],
        )
        for name, default in verbmask.EXTENSION_DEFAULTS.items()
    ),
    "domains": (
        _k(
            "local",
            [],
            lambda v: _each(v, 'domains like "example.com"', parse_domain),
            "default and alias local domains, delivered to drop/; [] = the domain of server.hostname",
            show=list,
        ),
        _k(
            "remote",
            [],
            _remote_domains,
            'e.g. [{ name = "partner.test", relay = true, route = "partners" }]',
            show=lambda v: [{"name": d.name, "relay": d.relay, "route": d.route} for d in v],
        ),
    ),
    "relay": (
        _k(
            "allow",
            ["127.0.0.1/32", "::1/128"],
            lambda v: _each(v, 'networks like "192.0.2.0/24"', parse_network),
            'client networks that may relay ("only the list below")',
            show=lambda v: [str(n) for n in v],
        ),
        _k(
            "deny",
            [],
            lambda v: _each(v, 'networks like "192.0.2.0/24"', parse_network),
            "client networks that may never relay; checked first",
            show=lambda v: [str(n) for n in v],
        ),
        _k("allow_authenticated", True, _bool, "authenticated clients may relay", "RelayForAuth"),
    ),
    "connection": (
        _k(
            "allow",
            [],
            lambda v: _each(v, 'networks like "192.0.2.0/24"', parse_network),
            'networks that may connect ("Only the list below"); [] with deny [] = everyone; loopback too '
            "must be listed",
            "IPGrant",
            show=lambda v: [str(n) for n in v],
        ),
        _k(
            "deny",
            [],
            lambda v: _each(v, 'networks like "192.0.2.0/24"', parse_network),
            'networks that may not connect ("All except the list below"); wins over allow',
            "IPDeny",
            show=lambda v: [str(n) for n in v],
        ),
    ),
    "auth": (
        _k("users_file", "users.toml", _str, "SMTP AUTH accounts, managed by `smtpsvc users` (hashes only)"),
        _k("mechanisms", ["PLAIN", "LOGIN"], _mechanisms, "SASL mechanisms offered", show=list),
        _k("require_tls", True, _bool, "AUTH offered only inside TLS; false allows it in plaintext"),
    ),
    "tls": (
        _k("cert", "", _str, "PEM certificate (chain); STARTTLS is advertised only when set"),
        _k("key", "", _str, 'PEM private key ("" = in the cert file)'),
        _k("require", False, _bool, '"Require TLS encryption" for inbound mail'),
    ),
    "delivery": (
        _k(
            "smart_host",
            "",
            parse_smart_hosts,
            '"host", "host:port" or "[1.2.3.4]:port"; several separated by ";"',
            show=lambda v: ";".join(str(h) for h in v),
        ),
        _k(
            "smart_host_auth",
            _AUTH_DEFAULT,
            _connector_auth,
            "outbound AUTH to the smart host: the table of a connector's auth",
            show=_show_auth,
        ),
        _k(
            "smart_host_type",
            "always",
            _smart_host_type,
            '"always" (IIS 2) | "after_direct" (IIS 1: DNS first)',
        ),
        _k("remote_port", 25, _int(1, 65535), "port for outbound SMTP", "RemoteSmtpPort"),
        _k(
            "retry",
            ["15m", "30m", "60m", "240m"],
            _retry,
            "retry intervals; the last repeats",
            "SmtpRemoteProgressiveRetry",
            show=_show_durations,
        ),
        _k(
            "delay_notification",
            "12h",
            _duration,
            "delay DSN after this long",
            "SmtpRemoteDelayExpireMinutes",
            show=format_duration,
        ),
        _k(
            "expiration",
            "2d",
            _duration,
            "NDR 4.4.7 after this long",
            "SmtpRemoteNDRExpireMinutes",
            show=format_duration,
        ),
        _k("max_messages_per_connection", 20, _int(1), "then reconnect", "MaxBatchedMessages"),
        _k("max_connections", 1000, _int(1), "outbound connections at once", "MaxOutConnections"),
        _k(
            "max_connections_per_domain",
            100,
            _int(1),
            "outbound connections to one domain",
            "MaxOutConnectionsPerDomain",
        ),
        _k(
            "initial_connections_per_domain",
            2,
            _int(1),
            "slow start: connections a destination gets at first; each one that greets adds one, up to "
            "max_connections_per_domain, and each that fails takes one away",
        ),
        _k(
            "timeout",
            "10m",
            _duration,
            "limit for the replies without a limit of their own (EHLO, STARTTLS, AUTH, RSET, XEXCH50) "
            "and the TLS handshake",
            "RemoteTimeout",
            show=format_duration,
        ),
        _k(
            "connect_timeout",
            "30s",
            _duration,
            "TCP connect to one host, then the next",
            show=format_duration,
        ),
        _k(
            "greeting_timeout",
            "5m",
            _duration,
            "the 220 greeting (RFC 5321 4.5.3.2); none in time: the next host",
            show=format_duration,
        ),
        _k("mail_timeout", "5m", _duration, "the reply to MAIL FROM", show=format_duration),
        _k("rcpt_timeout", "5m", _duration, "the reply to each RCPT TO", show=format_duration),
        _k("data_timeout", "2m", _duration, "the 354 reply to DATA", show=format_duration),
        _k(
            "data_block_timeout",
            "3m",
            _duration,
            "sending each block of the message (the peer must keep reading)",
            show=format_duration,
        ),
        _k(
            "final_timeout", "10m", _duration, "the reply after the message's final dot", show=format_duration
        ),
        _k(
            "tls",
            "dane-or-mta-sts",
            _tls_policy,
            '"dane-or-mta-sts" (a host with DNSSEC-signed TLSA records is verified by DANE; else MX '
            "delivery enforces the MTA-STS policy a domain publishes; else opportunistic) | "
            '"none" | "opportunistic" | "required"',
        ),
        _k(
            "mta_sts_ca_file",
            "",
            _str,
            "a private CA (PEM) trusted for the MTA-STS policy servers besides the system's CAs",
        ),
        _k(
            "mta_sts_port",
            443,
            _int(1),
            "TESTING ONLY: the HTTPS port of the mta-sts.<domain> policy servers (RFC 8461 says 443)",
        ),
        _k(
            "tlsrpt_organization",
            "",
            _str,
            'organization-name of our TLS reports (RFC 8460); "" = server.hostname',
        ),
        _k(
            "send_ndr_copy_to",
            "",
            _send_ndr_copy_to,
            'address that gets a copy of every NDR; "" = none',
            "SendNdrTo",
        ),
        _k(
            "suppress_xexch50_external",
            True,
            _bool,
            "never send XEXCH50 to external domains (we default it on)",
            "SMTPSVC\\XEXCH50\\SuppressExternal",
        ),
        _k(
            "dkim_on_error",
            "defer",
            _choice("defer", "send-unsigned"),
            'a [[dkim]] key that cannot be used: "defer" the message (cause dkim-key-unusable) or '
            '"send-unsigned"',
        ),
        *_budget_keys("smart_host_", "the default smart host"),
    ),
    "resolver": (
        _k(
            "nameservers",
            [],
            lambda v: _each(v, 'addresses like "127.0.0.1:5353"', parse_nameserver),
            '["127.0.0.1:5353"]; [] = the system resolver',
            show=lambda v: [_format_nameserver(s) for s in v],
        ),
        _k(
            "negative_cache_max",
            "5m",
            _duration_or_zero,
            "longest a negative answer (NXDOMAIN, NODATA) is cached; RFC 2308: min(SOA TTL, MINIMUM), never "
            'without an SOA; "0s" = never',
            show=format_duration,
        ),
    ),
    "categorizer": (
        _k(
            "reset_message_status",
            False,
            _bool,
            "re-categorize every queued message at start",
            "ResetMessageStatus",
        ),
    ),
    "badmail": (
        _k(
            "max_size",
            "100MB",
            _size,
            "cap on the badmail folder; 0 = keep nothing",
            "MaxBadMailFolderSize",
            show=format_size,
        ),
    ),
    "admin": (
        _k(
            "listen",
            "127.0.0.1:8025",
            _admin_listen,
            'HTTP API, web queue viewer, /metrics, /healthz; "" = off',
            show=lambda v: "" if v is None else format_listen(v),
        ),
        _k("token_file", "", _str, "bearer token required for changes; without it: loopback, read-only"),
    ),
    "protocol_log": (
        _k(
            "enabled",
            False,
            _bool,
            "write the W3C protocol log of every SMTP conversation, in and out (smtpsvc track reads it)",
            "LogType",
        ),
        _k(
            "directory",
            "",
            _str,
            'its folder; "" = <root>/log/protocol; relative: to the root',
            "LogFileDirectory",
        ),
        _k(
            "max_size",
            "10MB",
            _size,
            "a file past this size is renamed smtp-<time>.log and a new one started",
            "LogFileTruncateSize",
            show=format_size,
        ),
        _k("max_files", 10, _int(1), "rotated files kept; the oldest beyond it are removed"),
    ),
    "queue": (
        _k("backend", "local", _backend, '"local" (files under root/queue) | "postgres" (a cluster)'),
        _k("dsn", "", _str, 'postgresql://USER:PASSWORD@HOST:5432/DATABASE, needed by backend = "postgres"'),
        _k(
            "node_id",
            _COMPUTED,
            _connector_name,
            "this node's name in a cluster, unique per node; default: server.hostname",
        ),
        _k(
            "lease",
            "30s",
            _duration,
            "how long a claimed delivery stays with one node: a dead node's mail waits this long",
            show=format_duration,
        ),
    ),
}

_CONNECTOR_KEYS: tuple[_Key, ...] = (
    _k("name", _COMPUTED, _connector_name, "route name (domains.remote route = ...)"),
    _k("address_spaces", _COMPUTED, _address_spaces, '"*" = everything else', show=list),
    _k("cost", 1, _int(0), "lowest available cost wins"),
    _k(
        "smart_hosts",
        [],
        lambda v: _each(v, 'hosts like "relay.partner.test:25"', parse_host_port),
        "[] = route by MX",
        show=lambda v: [str(h) for h in v],
    ),
    _k("use_helo", False, _bool, '"Send HELO instead of EHLO"'),
    _k(
        "tls",
        "opportunistic",
        _tls_policy,
        '"none" | "opportunistic" | "required" | "dane-or-mta-sts" '
        "(with smart_hosts: DANE where signed, else opportunistic)",
    ),
    _k(
        "auth",
        _AUTH_DEFAULT,
        _connector_auth,
        'outbound AUTH on this route; mechanism = "auto" (PLAIN, else LOGIN) | "plain" | "login" | '
        '"xoauth2" | "oauthbearer" (with oauth = "NAME" of an [oauth.NAME] profile)',
        show=_show_auth,
    ),
    _k("xexch50", False, _bool, "send the XEXCH50 blob on this route (internal peers only)"),
    # -- the Microsoft Graph transport (connector keys of its own; see _check_graph_connector)
    _k("transport", "smtp", _choice(*CONNECTOR_TRANSPORTS), '"smtp" | "graph" (Microsoft Graph sendMail)'),
    _k("oauth", "", _str, 'transport = "graph": the [oauth.NAME] profile that logs in to Graph'),
    _k("mailbox", "", _graph_mailbox, 'transport = "graph": the sending mailbox; "" = the envelope sender'),
    _k("graph_url", GRAPH_URL, _graph_url, 'transport = "graph": the Graph endpoint (national clouds)'),
    _k("ca_file", "", _str, 'transport = "graph": a private CA for graph_url; "" = the system\'s CAs'),
    *_budget_keys("", "this connector"),
)
_CONNECTOR_EXAMPLE: dict[str, object] = {
    "name": "partners",
    "address_spaces": ["partner.test", "*.partner.test"],
}

# [oauth.NAME]: token profiles (smtpsvc.oauth). Parsed key by key like a section, then checked as a whole
# (which credential, which defaults) by _oauth_profile.
OAUTH_PROVIDERS = ("microsoft", "google", "generic")
OAUTH_DEFAULT_SCOPE = {
    "microsoft": "https://outlook.office365.com/.default",
    "google": "https://mail.google.com/",
}
OAUTH_DEFAULT_TOKEN_URL = {
    "microsoft": "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
    "google": "https://oauth2.googleapis.com/token",
}
_OAUTH_KEYS: tuple[_Key, ...] = (
    _k("provider", _COMPUTED, _choice(*OAUTH_PROVIDERS), '"microsoft" | "google" | "generic"'),
    _k("tenant", "", _str, "Entra tenant (directory) ID or domain, e.g. contoso.onmicrosoft.com (microsoft)"),
    _k("client_id", _COMPUTED, _str, "the application (client) ID"),
    _k("client_secret_file", "", _str, "file holding the client secret (not the secret itself)"),
    _k("certificate_file", "", _str, "PEM certificate uploaded to the app registration (with key_file)"),
    _k("key_file", "", _str, "PEM private key of certificate_file"),
    _k("refresh_token_file", "", _str, "file holding a refresh token; replaced when the provider rotates it"),
    _k(
        "scope",
        "",
        _str,
        "default: microsoft https://outlook.office365.com/.default, google https://mail.google.com/",
    ),
    _k(
        "token_url", "", _str, "token endpoint; default per provider (override for national clouds and tests)"
    ),
    _k("ca_file", "", _str, "PEM CA certificates to trust for the token endpoint (default: the system's)"),
)
_OAUTH_EXAMPLE: dict[str, object] = {
    "provider": "microsoft",
    "tenant": "contoso.onmicrosoft.com",
    "client_id": "00000000-0000-0000-0000-000000000000",
    "client_secret_file": "/etc/smtpsvc/m365.secret",
}


def _oauth_profile(loader: _Loader, name: str, value: object) -> OAuthProfile | None:
    """One [oauth.NAME] table checked key by key, then as a whole; every problem reported (once per key),
    None when there is one."""
    section = f"oauth.{name}"
    if not isinstance(value, dict):
        loader.report(section, "", f"expected a table [oauth.{name}], got {_describe(value)}")
        return None
    before = len(loader.problems)
    if "provider" not in value:
        loader.report(section, "provider", 'missing "provider": "microsoft", "google" or "generic"')
    if "client_id" not in value:
        loader.report(section, "client_id", 'missing "client_id": the application (client) ID')
    v = loader.section(section, value, _OAUTH_KEYS)
    if v["provider"] is None or v["client_id"] is None:
        return None
    for key in ("tenant", "client_id", "scope", "token_url"):
        v[key] = v[key].strip()
    reported = {p.key for p in loader.problems[before:]}
    for key, problem in _oauth_problems(v):
        if f"{section}.{key}".rstrip(".") not in reported:
            loader.report(section, key, problem)
    if len(loader.problems) > before:
        return None
    provider = v["provider"]
    v["scope"] = v["scope"] or OAUTH_DEFAULT_SCOPE.get(provider, "")
    v["token_url"] = (v["token_url"] or OAUTH_DEFAULT_TOKEN_URL[provider]).replace("{tenant}", v["tenant"])
    return OAuthProfile(name=name, **v)


def _oauth_problems(v: Mapping[str, str]) -> list[tuple[str, str]]:
    """(key, problem) for a profile's keys taken together: which credential, what the provider needs."""
    found: list[tuple[str, str]] = []
    provider = v["provider"]
    if not v["client_id"]:
        found.append(("client_id", "must not be empty: the application (client) ID"))
    if bool(v["certificate_file"]) != bool(v["key_file"]):
        have, lacking = ("certificate_file", "key_file")[:: 1 if v["certificate_file"] else -1]
        found.append((have, f"{have} is set but {lacking} is not: a client assertion needs both"))
    if v["client_secret_file"] and v["certificate_file"]:
        found.append(("certificate_file", "set client_secret_file or certificate_file + key_file, not both"))
    if not (v["client_secret_file"] or v["certificate_file"] or v["refresh_token_file"]):
        problem = (
            "no credential: set client_secret_file, or certificate_file + key_file, or refresh_token_file"
        )
        found.append(("", problem))
    if provider == "google" and not (v["refresh_token_file"] and v["client_secret_file"]):
        problem = "Google gives mail access through the refresh-token grant: set refresh_token_file and"
        found.append(
            ("refresh_token_file", problem + " client_secret_file (of the OAuth client that obtained it)")
        )
    if provider == "microsoft" and not v["tenant"] and not v["token_url"]:
        found.append(("tenant", 'missing "tenant": the directory ID or e.g. contoso.onmicrosoft.com'))
    if provider == "generic":
        found += [
            (k, f'missing "{k}" (required with provider = "generic")')
            for k in ("scope", "token_url")
            if not v[k]
        ]
    url = v["token_url"]
    if url and (not url.lower().startswith("https://") or not _url_host(url)):
        found.append(("token_url", f'must be an https:// URL (it carries the secret), got "{url}"'))
    return found


def _url_host(url: str) -> str:
    try:
        return urlsplit(url).hostname or ""
    except ValueError:  # a bad port or IPv6 literal
        return ""


def _oauth_profiles(loader: _Loader, value: object) -> dict[str, OAuthProfile]:
    if not isinstance(value, dict):
        loader.report("oauth", "", f"expected tables [oauth.NAME], got {_describe(value)}")
        return {}
    keys = {k.name for k in _OAUTH_KEYS}
    if any(name in keys and not isinstance(table, dict) for name, table in value.items()):
        loader.report("oauth", "", "name the profile: [oauth.NAME] (e.g. [oauth.m365]), not [oauth]")
        return {}
    profiles = {name: _oauth_profile(loader, name, table) for name, table in value.items()}
    if value:
        loader.explicit.add("oauth")
    return {name: profile for name, profile in profiles.items() if profile is not None}


_SECTION_DOCS: dict[str, str] = {
    "server": "inbound SMTP",
    "extensions": "named switches; a key set here overrides the mask's bit, an unset one follows it",
    "domains": "what is ours (drop/) and which remote domains we relay for",
    "relay": "who may relay (SPEC 2.3: deny, then allow, then authenticated)",
    "connection": "who may connect at all: IIS Connection control (IPSecurity); refused with 554 at connect",
    "auth": "SMTP AUTH",
    "tls": "inbound STARTTLS",
    "delivery": "outbound SMTP",
    "resolver": "DNS",
    "connector": "Exchange SMTP connector / IIS remote domain; repeat [[connector]] for more",
    "categorizer": "the pre-categorization and pre-routing stages",
    "badmail": "what cannot be delivered or returned",
    "protocol_log": "the SMTP protocol log (IIS's W3C log): every command and reply, in and out",
    "admin": "the admin HTTP API",
    "queue": "the spool",
    "oauth": "OAuth 2.0 token profiles [oauth.NAME] (Microsoft 365, Google); repeat for more",
    "dkim": "DKIM signing keys, chosen by the From: domain; repeat [[dkim]] (two for a domain: dual signing)",
}
_SECTION_ORDER = (
    "server", "extensions", "domains", "relay", "connection", "auth", "tls", "delivery", "resolver",
    "connector", "categorizer", "badmail", "protocol_log", "admin", "queue", "oauth", "dkim",
)  # fmt: skip


# --------------------------------------------------------------------------------------------- line numbers

_BARE_KEY = r"[A-Za-z0-9_-]+"
_KEY_PART = rf"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|{_BARE_KEY})"""
_HEADER_RE = re.compile(rf"\s*(\[\[?)\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*\]\]?\s*(?:#.*)?")
_KEYLINE_RE = re.compile(rf"\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_PART_RE = re.compile(rf""""((?:[^"\\]|\\.)*)"|'([^']*)'|({_BARE_KEY})""")


def _key_path(text: str) -> list[str]:
    return [a or b or c for a, b, c in _PART_RE.findall(text)]


class _Locator:
    """Finds the line of a key in TOML text: (section, array index or None, key) → 1-based line."""

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str, int | None, str], int] = {}
        table: list[str] = []
        index: int | None = None
        counts: dict[str, int] = {}
        in_multiline = False
        for number, line in enumerate(text.splitlines(), 1):
            inside = in_multiline
            if (line.count('"""') + line.count("'''")) % 2:
                in_multiline = not in_multiline
            if inside:
                continue
            header = _HEADER_RE.fullmatch(line)
            if header:
                table = _key_path(header.group(2))
                if header.group(1) == "[[":
                    counts[table[0]] = counts.get(table[0], 0) + 1
                index = counts[table[0]] - 1 if table[0] in counts else None
                self._remember((table[0], index, table[1] if len(table) > 1 else ""), number)
                if len(table) == 2:  # [oauth.NAME]: its problems are reported as section "oauth.NAME"
                    self._remember((".".join(table), None, ""), number)
                continue
            keyline = _KEYLINE_RE.match(line)
            if keyline:
                path = table + _key_path(keyline.group(1))
                where = (path[0], index if table else None, path[1] if len(path) > 1 else "")
                if len(path) == 1:
                    where = ("", None, path[0])
                self._remember(where, number)
                if len(path) == 3 and index is None:  # a key of [oauth.NAME]
                    self._remember((f"{path[0]}.{path[1]}", None, path[2]), number)

    def _remember(self, where: tuple[str, int | None, str], number: int) -> None:
        self._lines.setdefault(where, number)

    def line(self, section: str, index: int | None, key: str) -> int | None:
        for where in ((section, index, key), (section, index, ""), ("", None, section)):
            if where in self._lines:
                return self._lines[where]
        return None


# --------------------------------------------------------------------------------------------- loading


def default_config_path(
    env: Mapping[str, str], cwd: str | os.PathLike[str], cli_path: str | os.PathLike[str] | None = None
) -> Path | None:
    """SPEC 1.1: ``-c FILE``, else ``$SMTPSVC_CONFIG``, else ``./smtpsvc.toml`` when it exists, else None."""
    if cli_path is not None and str(cli_path):
        return Path(cwd, cli_path)
    if env.get(CONFIG_ENV):
        return Path(cwd, env[CONFIG_ENV])
    candidate = Path(cwd, DEFAULT_FILE_NAME)
    return candidate if candidate.is_file() else None


class _Loader:
    """Collects every problem while building the dataclasses; remembers where each key came from."""

    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self.locator = _Locator(text)
        self.overridden: dict[tuple[str, str], str] = {}  # (section, key) → "$SMTPSVC__…" / "--root" / …
        self.problems: list[ConfigProblem] = []
        self.explicit: set[str] = set()
        self.connector_names: set[str] = set()

    def report(self, section: str, key: str, problem: str, index: int | None = None) -> None:
        label = f"{section}[{index + 1}]" if index is not None else section
        dotted = ".".join(part for part in (label, key) if part)
        origin = self.overridden.get((section, key))
        if origin is not None:
            self.problems.append(ConfigProblem(origin, None, dotted, problem))
        else:
            self.problems.append(
                ConfigProblem(self.source, self.locator.line(section, index, key), dotted, problem)
            )

    def unknown_keys(
        self, section: str, table: Mapping[str, object], keys: Sequence[_Key], index: int | None
    ) -> None:
        known = [k.name for k in keys]
        for name in table:
            if name in known:
                continue
            elsewhere = [s for s, ks in _SCHEMA.items() if s != section and any(k.name == name for k in ks)]
            hint = (
                f"; it belongs in [{elsewhere[0]}]" if elsewhere else _iis_hint(name) or _suggest(name, known)
            )
            self.report(section, name, f'unknown key "{name}"{hint}', index)

    def section(
        self, section: str, table: Mapping[str, object], keys: Sequence[_Key], index: int | None = None
    ) -> dict[str, Any]:
        self.unknown_keys(section, table, keys, index)
        values: dict[str, Any] = {}
        for key in keys:
            if key.name not in table:
                values[key.name] = None if key.default is _COMPUTED else key.parse(key.default)
                if key.default is _COMPUTED and index is not None:
                    self.report(section, key.name, f'missing "{key.name}" (required in [[{section}]])', index)
                continue
            self.explicit.add(f"{section}.{key.name}")
            try:
                values[key.name] = key.parse(table[key.name])
            except ValueError as exc:
                self.report(section, key.name, str(exc), index)
                values[key.name] = None if key.default is _COMPUTED else key.parse(key.default)
        return values


def _toml_error(source: str, text: str, exc: tomllib.TOMLDecodeError) -> ConfigProblem:
    message = str(exc)
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match:
        return ConfigProblem(source, int(match.group(2)), "", f"{match.group(1)} (column {match.group(3)})")
    match = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if match:
        return ConfigProblem(source, max(1, len(text.splitlines())), "", f"{match.group(1)} (at end of file)")
    return ConfigProblem(source, None, "", message)


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(source, None, "", f"cannot read the config file: {exc}")]) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_toml_error(source, text, exc)]) from None


def _env_value(raw: str, key: _Key | None) -> object:
    """An override's value: TOML when it parses as one value (5, true, ["1s"]), else the plain string."""
    try:
        parsed = tomllib.loads(f"value = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    if set(parsed) != {"value"}:
        return raw
    value = parsed["value"]
    if key is not None and key.text and not isinstance(value, str):
        return raw
    return value


def _apply_env(loader: _Loader, raw: dict[str, Any], env: Mapping[str, str]) -> None:
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        dotted = ".".join(parts)
        if len(parts) != 2 or not all(parts):
            problem = "expected SMTPSVC__SECTION__KEY, e.g. SMTPSVC__SERVER__MAX_RECIPIENTS"
            loader.problems.append(ConfigProblem(f"${name}", None, dotted, problem))
            continue
        section, key = parts
        if section in ("connector", "oauth"):
            what = "[[connector]] tables" if section == "connector" else "[oauth.NAME] profiles"
            problem = f"{what} cannot be set from the environment; use the config file"
            loader.problems.append(ConfigProblem(f"${name}", None, dotted, problem))
            continue
        if section not in _SCHEMA:
            problem = f'unknown section "{section}"{_suggest(section, _SECTION_ORDER)}'
            loader.problems.append(ConfigProblem(f"${name}", None, dotted, problem))
            continue
        keys = {k.name: k for k in _SCHEMA[section]}
        if key not in keys:
            problem = f'unknown key "{key}"{_iis_hint(key) or _suggest(key, keys)}'
            loader.problems.append(ConfigProblem(f"${name}", None, dotted, problem))
            continue
        table = raw.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = _env_value(env[name], keys[key])
            loader.overridden[(section, key)] = f"${name}"


def _check_sections(loader: _Loader, raw: Mapping[str, object]) -> None:
    every_key = {k.name: s for s, keys in _SCHEMA.items() for k in keys}
    for name, value in raw.items():
        if name in ("connector", "oauth", "dkim") or (name in _SCHEMA and isinstance(value, dict)):
            continue
        if name in _SCHEMA:
            loader.report(name, "", f"expected a table [{name}], got {_describe(value)}")
        elif not isinstance(value, dict) and name in every_key:
            loader.report(
                "", name, f'unknown key "{name}" outside any section; it belongs in [{every_key[name]}]'
            )
        elif not isinstance(value, dict) and _iis_hint(name):
            loader.report("", name, f'unknown key "{name}" outside any section{_iis_hint(name)}')
        else:
            loader.report(name, "", f'unknown section "{name}"{_suggest(name, _SECTION_ORDER)}')


def _connectors(loader: _Loader, value: object) -> tuple[ConnectorConfig, ...]:
    if isinstance(value, dict):
        loader.report("connector", "", "write [[connector]] (an array of tables), not [connector]")
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        loader.report("connector", "", f"expected [[connector]] tables, got {_describe(value)}")
        return ()
    connectors: list[ConnectorConfig] = []
    for index, table in enumerate(value):
        values = loader.section("connector", table, _CONNECTOR_KEYS, index)
        _check_graph_connector(loader, values, index)
        name = values["name"]
        if name in loader.connector_names:
            loader.report("connector", "name", f'duplicate connector name "{name}"', index)
        if name is not None:
            loader.connector_names.add(name)
        if name is not None and values["address_spaces"] is not None:
            connectors.append(ConnectorConfig(**values))
    if value:
        loader.explicit.add("connector")
    return tuple(connectors)


_DKIM_KEYS: tuple[_Key, ...] = (
    _k(
        "domain",
        _COMPUTED,
        _str,
        'the From: domain it signs for, e.g. "example.com"; "*" = the default signer',
    ),
    _k(
        "selector",
        _COMPUTED,
        _str,
        'the selector: the record is at <selector>._domainkey.<domain>, e.g. "s2026"',
    ),
    _k("key_file", _COMPUTED, _str, "the private key (PEM), readable by the service only (mode 0600)"),
    _k(
        "algorithm", "rsa-sha256", _choice("rsa-sha256", "ed25519-sha256"), '"rsa-sha256" or "ed25519-sha256"'
    ),
)
_DKIM_EXAMPLE: dict[str, object] = {
    "domain": "example.com",
    "selector": "s2026",
    "key_file": "/etc/smtpsvc/dkim/example.com.s2026.pem",
}
_SELECTOR_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*"
)


def _dkim_keys(loader: _Loader, value: object) -> tuple[DkimKey, ...]:
    if isinstance(value, dict):
        loader.report("dkim", "", "write [[dkim]] (an array of tables, one per key), not [dkim]")
        return ()
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        loader.report("dkim", "", f"expected [[dkim]] tables, got {_describe(value)}")
        return ()
    keys: list[DkimKey] = []
    seen: set[tuple[str, str]] = set()
    for index, table in enumerate(value):
        before = len(loader.problems)
        v = loader.section("dkim", table, _DKIM_KEYS, index)
        if len(loader.problems) > before:
            continue
        domain = v["domain"].strip().lower().rstrip(".")
        if domain != "*":
            try:
                domain = parse_domain(domain)
            except ValueError as exc:
                loader.report("dkim", "domain", str(exc), index)
                continue
        if not _SELECTOR_RE.fullmatch(v["selector"]):
            loader.report(
                "dkim",
                "selector",
                f'"{v["selector"]}" is not a selector (letters, digits, -, _, dots)',
                index,
            )
            continue
        if not v["key_file"].strip():
            loader.report("dkim", "key_file", "key_file is empty: give the path of the private key", index)
            continue
        if (domain, v["selector"]) in seen:
            loader.report("dkim", "selector", f'{domain}: selector "{v["selector"]}" is given twice', index)
            continue
        seen.add((domain, v["selector"]))
        keys.append(DkimKey(domain, v["selector"], v["key_file"].strip(), v["algorithm"]))
    if value:
        loader.explicit.add("dkim")
    return tuple(keys)


def _cross_checks(loader: _Loader, cfg: Config) -> None:
    if cfg.queue.backend == "postgres" and not cfg.queue.dsn:
        loader.report(
            "queue",
            "dsn",
            'queue.backend = "postgres" needs queue.dsn, e.g. "postgresql://smtpsvc:PASSWORD@db.example:5432/smtpsvc"'
            " (or SMTPSVC__QUEUE__DSN)",
        )
    if cfg.server.workers != "auto" and cfg.server.workers > 1 and cfg.queue.backend == "postgres":
        loader.report(
            "server",
            "workers",
            "server.workers > 1 needs the local queue; with PostgreSQL, run one node per core instead",
        )
    if cfg.server.workers != "auto" and cfg.server.workers > 1 and not can_share_ports():
        loader.report("server", "workers", "server.workers > 1 needs SO_REUSEPORT (Linux, BSD), not Windows")
    if cfg.tls.require and not cfg.tls.cert:
        loader.report(
            "tls", "require", "tls.require = true needs tls.cert (STARTTLS cannot be offered without it)"
        )
    if cfg.tls.key and not cfg.tls.cert:
        loader.report("tls", "key", "tls.key is set but tls.cert is empty")
    for section, key, index, problem in auth_oauth_problems(cfg, cfg.oauth):
        loader.report(section, key, problem, index)
    check_graph_oauth_profiles(loader, cfg, cfg.oauth)
    for index, connector in enumerate(cfg.connectors):
        profile = cfg.oauth.get(connector.oauth) if connector.transport == "graph" else None
        if (
            profile is not None
            and profile.provider == "microsoft"
            and not _same_host(profile.scope, connector.graph_url)
        ):
            # Entra issues a token for one resource: the default scope (Exchange Online's SMTP) is refused by
            # Graph with 401, so every message would wait. Say so now, not at the first delivery.
            loader.report(
                "connector",
                "oauth",
                f"{connector.name}: Graph at {connector.graph_url} needs a token for Graph, but "
                f'[oauth.{profile.name}] asks for scope "{profile.scope}": give the profile scope = '
                f'"https://{_host_of(connector.graph_url)}/.default" (a profile of its own if SMTP uses '
                "the other)",
                index,
            )
    routes = loader.connector_names
    for domain in cfg.domains.remote:
        if domain.route and domain.route not in routes:
            known = f"; known: {', '.join(sorted(routes))}" if routes else "; there is no [[connector]]"
            loader.report(
                "domains", "remote", f'{domain.name}: route "{domain.route}" names no [[connector]]{known}'
            )


def load_config(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    root_override: str | None = None,
    listen_override: Sequence[str] | None = None,
) -> Config:
    """Read ``path`` (None: built-in defaults), apply env and CLI overrides, validate, build the Config.

    ``env`` None means ``os.environ``; pass ``{}`` for none. Raises ConfigError with every problem found.
    """
    environment = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is None:
        source, text = DEFAULTS_SOURCE, ""
    else:
        source = str(path)
        text, raw = _read(Path(path))
    loader = _Loader(source, text)
    _apply_env(loader, raw, environment)
    if root_override is not None:
        raw.setdefault("server", {})["root"] = root_override
        loader.overridden[("server", "root")] = "--root"
    if listen_override:
        raw.setdefault("server", {})["listen"] = list(listen_override)
        loader.overridden[("server", "listen")] = "--listen"
    _check_sections(loader, raw)

    def table(name: str) -> dict[str, Any]:
        value = raw.get(name, {})
        return loader.section(name, value if isinstance(value, dict) else {}, _SCHEMA[name])

    server = table("server")
    server["hostname"] = server["hostname"] or socket.getfqdn()
    explicit = {k: v for k, v in table("extensions").items() if f"extensions.{k}" in loader.explicit}
    mask = server["inbound_command_support_options"]
    queue = table("queue")
    queue["node_id"] = queue["node_id"] or server["hostname"]
    domains = DomainsConfig(**table("domains"))
    if any(d.route for d in domains.remote):
        loader.explicit.add("domains.remote.route")
    connectors = _connectors(loader, raw.get("connector", []))
    oauth = _oauth_profiles(loader, raw.get("oauth", {}))
    dkim = _dkim_keys(loader, raw.get("dkim", []))
    cfg = Config(
        server=ServerConfig(**server),
        extensions=ExtensionsConfig(
            mask=mask,
            explicit=MappingProxyType(explicit),
            resolved=MappingProxyType(verbmask.effective_extensions(mask, explicit)),
        ),
        domains=domains,
        relay=RelayConfig(**table("relay")),
        connection=ConnectionConfig(**table("connection")),
        auth=AuthConfig(**table("auth")),
        tls=TlsConfig(**table("tls")),
        delivery=DeliveryConfig(**table("delivery")),
        resolver=ResolverConfig(**table("resolver")),
        connectors=connectors,
        categorizer=CategorizerConfig(**table("categorizer")),
        badmail=BadmailConfig(**table("badmail")),
        protocol_log=ProtocolLogConfig(**table("protocol_log")),
        admin=AdminConfig(**table("admin")),
        queue=QueueConfig(**queue),
        source=source,
        oauth=oauth,
        dkim=dkim,
        explicit_keys=frozenset(loader.explicit),
        cli_overrides=frozenset(f"{s}.{k}" for (s, k), by in loader.overridden.items() if by[:2] == "--"),
    )
    _cross_checks(loader, cfg)
    if loader.problems:
        ordered = sorted(loader.problems, key=lambda p: (p.file != source, p.line is None, p.line or 0))
        raise ConfigError(ordered)
    return cfg


def restart_needed(old: Config, new: Config) -> list[str]:
    """The keys of RESTART_ONLY whose value differs between the configuration in force and a reloaded one
    (the PostgreSQL keys only when a PostgreSQL queue is in force or asked for: a local spool has no use for
    them, and `queue.node_id` follows `server.hostname` when it is not set)."""
    unused = {"queue.dsn", "queue.node_id", "queue.lease"}
    if "postgres" in (old.queue.backend, new.queue.backend):
        unused = set()
    return [key for key in RESTART_ONLY if key not in unused and _value_of(old, key) != _value_of(new, key)]


def _value_of(config: Config, dotted: str) -> object:
    section, key = dotted.split(".")
    return getattr(getattr(config, section), key)


def warnings_for(keys: Iterable[str]) -> list[str]:
    """For `config check`: a line per set key (e.g. ``Config.explicit_keys``) whose feature is not built."""
    return [
        f"{key}: accepted but not yet in effect"
        for key in sorted(set(keys))
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_YET_EFFECTIVE)
    ]


# --------------------------------------------------------------------------------------------- rendering


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", name) else json.dumps(name)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot render {value!r} as TOML")


def _doc_line(key: _Key) -> str:
    return f"# {key.doc}" + (f" ({key.iis})" if key.iis else "")


def render_example() -> str:
    """The commented example: every key with its default, commented out (remove the ``#`` to set one).

    Doc lines start with ``# ``; setting lines with ``#`` and no space, so removing that one character from
    every setting line yields a file that loads to the defaults plus one example connector.
    """
    hostname = socket.getfqdn()
    dynamic = {("server", "hostname"): hostname, ("queue", "node_id"): hostname}
    out = [
        "# smtpsvc.toml: every key is optional; the values shown are the defaults.",
        "# Durations are strings with a unit (500ms, 30s, 15m, 12h, 2d);",
        "# sizes are integers (bytes) or strings with KB, MB or GB (1KB = 1024 bytes).",
        "# Environment variables SMTPSVC__SECTION__KEY=value override this file.",
    ]
    # The tables that are not one plain section: commented out, each with an example of its own.
    examples: dict[str, tuple[str, tuple[_Key, ...], dict[str, object]]] = {
        "connector": ("#[[connector]]", _CONNECTOR_KEYS, _CONNECTOR_EXAMPLE),
        "dkim": ("#[[dkim]]", _DKIM_KEYS, _DKIM_EXAMPLE),
        "oauth": ("#[oauth.m365]", _OAUTH_KEYS, _OAUTH_EXAMPLE),
    }
    for section in _SECTION_ORDER:
        out += ["", f"# {_SECTION_DOCS[section]}"]
        if section in examples:
            header, keys, example = examples[section]
            out.append(header)
            for key in keys:
                value = example.get(key.name, key.default)
                out += [_doc_line(key), f"#{_toml_key(key.name)} = {_toml_value(value)}"]
            continue
        out.append(f"[{section}]")
        for key in _SCHEMA[section]:
            value = dynamic.get((section, key.name), key.default)
            out += [_doc_line(key), f"#{_toml_key(key.name)} = {_toml_value(value)}"]
    return "\n".join(out) + "\n"


def _section_lines(keys: Sequence[_Key], obj: object) -> list[str]:
    return [f"{_toml_key(k.name)} = {_toml_value(k.show(getattr(obj, k.name)))}" for k in keys]


def _workers_meaning(cfg: Config) -> str:
    count = worker_count(cfg)
    if count == 1:
        why = ""
        if cfg.server.workers == "auto":
            if cfg.queue.backend != "local":
                why = " (the PostgreSQL queue: run one node per core instead)"
            elif not can_share_ports():
                why = " (no SO_REUSEPORT on this system)"
            elif not can_run_python_again():
                why = f" (this user may not run {sys.executable} again to start workers)"
            else:
                why = " (one core)"
        return f"one process receives SMTP and delivers{why}"
    cores = f" ({usable_cores()} cores)" if cfg.server.workers == "auto" else ""
    return f"{count} SMTP worker processes{cores}; the main process delivers, runs Pickup and the admin API"


def render_effective(cfg: Config) -> str:
    """The effective configuration as TOML (it loads back to the same values), the verb mask decoded."""
    out = [f"# effective configuration; source: {cfg.source}"]
    for section in _SECTION_ORDER:
        if section == "connector":
            for connector in cfg.connectors:
                out += ["", "[[connector]]", *_section_lines(_CONNECTOR_KEYS, connector)]
            continue
        if section == "dkim":  # the key file's path only: the private key stays in its file
            for key in cfg.dkim:
                out += ["", "[[dkim]]", *_section_lines(_DKIM_KEYS, key)]
            continue
        if section == "oauth":  # file paths only: the secrets stay in their files
            for name, profile in cfg.oauth.items():
                out += ["", f"[oauth.{_toml_key(name)}]", *_section_lines(_OAUTH_KEYS, profile)]
            continue
        out += ["", f"[{section}]"]
        if section == "extensions":
            explicit = cfg.extensions.explicit
            out += [f"{_toml_key(name)} = {_toml_value(value)}" for name, value in explicit.items()]
            table = verbmask.render(cfg.extensions.mask, explicit)
            out += ["# " + line if line else "#" for line in table.splitlines()]
            continue
        if section == "server":
            sizes = (cfg.server.max_message_size, cfg.server.max_session_size)
            out.append(f"# max_message_size = {sizes[0]} bytes, max_session_size = {sizes[1]} bytes")
            out.append(f"# workers = {_toml_value(cfg.server.workers)}: {_workers_meaning(cfg)}")
        out += _section_lines(_SCHEMA[section], getattr(cfg, section))
    return "\n".join(out) + "\n"
