"""The receiving side as the service and each SMTP worker build it, and its SIGHUP reload: one path for both.

`session_context` builds what every SMTP session shares: the configuration holder, the certificate, the AUTH
accounts and failure limiter, ETRN, the resolver (for `server.reverse_dns`) and the metrics hook.
`reload_receiving` reads the configuration file again (keeping the command line's `--root` and `--listen`),
loads the certificate and the accounts it names, and only when all of that worked puts them in place and
swaps `live.current`, the one configuration every running part reads. A failure changes nothing: the caller
logs it (`Reload.events`).

Light on purpose: every SMTP worker imports it, so it must not import `app` or the admin web stack (that
would cost each worker +13 MiB and +0.4 s at its start, measured).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from smtpsvc import events
from smtpsvc.auth.limiter import AuthLimiter
from smtpsvc.auth.users import UsersFileError, UserStore, users_path
from smtpsvc.config import Config, ConfigError, LiveConfig, format_listen, load_config, restart_needed
from smtpsvc.events import EventLog
from smtpsvc.ingest import Ingest
from smtpsvc.protolog import ProtocolLog, ProtocolLogSettings
from smtpsvc.server.session import ReverseLookup, SessionContext, SessionObserver
from smtpsvc.tls import ServerCertificate, TlsError

if TYPE_CHECKING:
    from smtpsvc.routing.mx import MxResolver


class ReceivingError(Exception):
    """The certificate or the accounts file cannot be used; the message names the file and the problem."""


class ReloadRefused(Exception):
    """Raised by a caller's `also` step (see `reload_receiving`): what it reloads cannot be used."""


def load_users(config: Config, config_path: str | None) -> UserStore:
    """The AUTH accounts of `auth.users_file` (none when it is empty). Raises UsersFileError."""
    return UserStore.load(users_path(config, config_path)) if config.auth.users_file else UserStore()


def users_unusable_event(problem: UsersFileError) -> events.Event:
    """The accounts file cannot be used: what an operator must know, and what clients get meanwhile."""
    return events.Event(
        events.SERVICE_STARTED,
        f"The AUTH accounts file cannot be used: {problem}. Every AUTH is answered 454 4.7.0 (try again "
        "later) until it is mended; then reload (SIGHUP) or restart",
        cause="users-file-unusable",
        level="error",
    )


def new_resolver(config: Config) -> MxResolver:
    """The DNS resolver the configuration asks for (made at the start: a reload does not change it)."""
    from smtpsvc.routing.mx import MxResolver  # here: an SMTP worker may never need dnspython (below)

    return MxResolver(
        config.resolver.nameservers,
        timeout=min(config.delivery.timeout, 30.0),
        negative_cache_max=config.resolver.negative_cache_max,
    )


def sessions_resolver(config: Config) -> ReverseLookup:
    """What an SMTP worker's sessions ask of DNS (`server.reverse_dns`, their only question): the resolver
    of `config` (the start's: a reload does not change it), made now when the check is on, else at its first
    question (after a reload turned it on). Loading dnspython costs a worker's start about 0.04 s of CPU
    (measured), and most configurations never ask."""
    return new_resolver(config) if config.server.reverse_dns else _ResolverOnFirstUse(config)


class _ResolverOnFirstUse:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._resolver: MxResolver | None = None

    async def reverse_names(self, ip: str) -> list[str]:
        if self._resolver is None:
            self._resolver = new_resolver(self._config)
        return await self._resolver.reverse_names(ip)


def session_context(
    live: LiveConfig,
    ingest: Ingest,
    event_log: EventLog,
    *,
    config_path: str | None,
    etrn: Callable[[str, bool], Awaitable[int]],
    resolver: ReverseLookup,
    metrics: SessionObserver | None = None,
    protocol_log: ProtocolLog | None = None,
) -> SessionContext:
    """What the SMTP sessions of this process share. Raises ReceivingError."""
    config = live.current
    try:
        certificate = ServerCertificate(config.tls.cert, config.tls.key)
    except TlsError as exc:
        raise ReceivingError(str(exc)) from exc
    try:
        users = load_users(config, config_path)
    except UsersFileError as exc:  # the service starts: only AUTH waits for the file (454, try later)
        users = UserStore.unusable(exc)
        event_log.emit(users_unusable_event(exc))
    return SessionContext(
        live=live,
        ingest=ingest,
        events=event_log,
        certificate=certificate,
        users=users,
        limiter=AuthLimiter(),
        etrn=etrn,
        resolver=resolver,
        metrics=metrics,
        protocol_log=protocol_log,
    )


def open_protocol_log(config: Config, event_log: EventLog, *, rotate: bool) -> ProtocolLog | None:
    """The protocol log writer of this process when `[protocol_log] enabled` (rotating in the main process
    only); None when it is off, or when its folder cannot be made (said in a warning: mail flows without)."""
    settings = config.protocol_log
    if not settings.enabled:
        return None
    folder = settings.folder(config.server.root)
    try:
        return ProtocolLog(
            ProtocolLogSettings(folder, settings.max_size, settings.max_files),
            rotate=rotate,
            computer=config.server.hostname,
        )
    except OSError as exc:
        event_log.emit(
            events.Event(
                events.MAILROOT_UNUSABLE,
                f"The protocol log folder {folder} cannot be used ({exc.strerror or exc}); SMTP "
                "conversations are not logged until the service is restarted with a usable "
                "protocol_log.directory",
                cause="protocol-log-unusable",
                level="warning",
            )
        )
        return None


@dataclass(frozen=True, slots=True)
class Reload:
    """What a reload did: the configuration before and after it (the same one when it failed), why it
    failed, and the changed keys that wait for a restart (`config.RESTART_ONLY`)."""

    previous: Config
    current: Config
    error: str = ""
    restart_needed: tuple[str, ...] = ()

    def events(self, worker_pid: int = 0) -> list[events.Event]:
        """What to log: a failure (level error), or the reload and a warning naming the changed keys that
        wait for a restart. An SMTP worker (`worker_pid`) says which worker it is, and leaves the warning
        to its main process."""
        what = f"SMTP worker {worker_pid}: configuration" if worker_pid else "Configuration"
        if self.error:
            text = f"{what} reload failed; keeping the old one: {self.error}"
            return [events.Event(events.SERVICE_STARTED, text, cause="config-reload-failed", level="error")]
        done = [events.Event(events.SERVICE_STARTED, f"{what} reloaded", cause="config-reload")]
        if self.restart_needed and not worker_pid:
            keys, it = ", ".join(self.restart_needed), "them" if len(self.restart_needed) > 1 else "it"
            text = f"{keys} changed; restart the service for {it} to take effect"
            done.append(
                events.Event(events.SERVICE_STARTED, text, cause="config-restart-needed", level="warning")
            )
        if not worker_pid:
            done += config_warning_events(self.current)
        return done


def config_warning_events(config: Config) -> list[events.Event]:
    """What `config check` would warn about, as warning events: at the start and after each reload, so a
    mistake such as KB286673's typo in the verb mask shows in the event log too."""
    return [
        events.Event(
            events.SERVICE_STARTED, f"Configuration: {text}", cause="config-warning", level="warning"
        )
        for text in config.warnings
    ]


def reload_receiving(
    live: LiveConfig,
    context: SessionContext,
    config_path: str | None,
    also: Callable[[Config], Callable[[], None]] | None = None,
) -> Reload:
    """SIGHUP: the configuration file again, its certificate and accounts, all or nothing. `also` loads what
    else the caller reloads from the new configuration (raising ReloadRefused when it cannot) and returns
    how to put it in place; it runs last, after everything else has loaded."""
    previous = live.current
    try:
        config = _load_again(previous, config_path)
        certificate = ServerCertificate(config.tls.cert, config.tls.key)
        users = load_users(config, config_path)
        install_also = also(config) if also is not None else None
    except (ConfigError, TlsError, UsersFileError, ReloadRefused) as exc:
        return Reload(previous, previous, error=str(exc))
    # Everything loaded; nothing below can fail, so no part is left on the old configuration.
    context.certificate, context.users = certificate, users
    live.current = config
    if install_also is not None:
        install_also()
    return Reload(previous, config, restart_needed=tuple(restart_needed(previous, config)))


def _load_again(previous: Config, config_path: str | None) -> Config:
    """The configuration file and environment read again, with the command line's overrides kept: the
    mailroot always (it cannot move while running), the listen addresses when `--listen` gave them (else
    every reload would take them for a change that waits for a restart)."""
    listen = None
    if "server.listen" in previous.cli_overrides:
        listen = [format_listen(address) for address in previous.server.listen]
    root = str(previous.server.root)
    return load_config(config_path, os.environ, root_override=root, listen_override=listen)
