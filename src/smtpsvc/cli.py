"""The `smtpsvc` command line: `serve`, `config`, `users`, `relay check`, `queue`, `db`, `badmail`,
`sendmail`, `events`, `track`, `probe`, `dkim`, `tlsrpt`, `import iis`.

Thin by design: it finds and loads the configuration, then hands over to the service or prints. Exit codes:
0 ok, 1 the operation failed (the message says why), 2 usage or configuration error.
"""

from __future__ import annotations

import signal
import sys

# First, before the imports below (and the service's, at `serve`) take their tenth of a second: SIGHUP's
# default action kills the process, and `serve` installs its handler only once its event loop runs. A SIGHUP
# meanwhile (a reload sent right after the start, one passed on to a worker being restarted, a terminal that
# closes) would end it silently. `serve` holds SIGHUP blocked until its handler is in place (`app`,
# `workers`), so one sent meanwhile is delivered then, not lost. Other commands keep the default: closing
# their terminal still ends them.
if sys.argv[1:2] == ["serve"] and hasattr(signal, "pthread_sigmask"):
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})

import asyncio
import dataclasses
import getpass
import ipaddress
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from smtpsvc import __version__
from smtpsvc.admin import badmail as badmail_admin
from smtpsvc.admin import sendmail as sendmail_admin
from smtpsvc.admin import tracking
from smtpsvc.admin.client import RemoteAdmin, ServiceSilent, open_admin
from smtpsvc.admin.jobs import BulkRequest, JobState, JobStatus
from smtpsvc.admin.probe import DaneProbe, OAuthLogin, ProbeReport, TargetError, split_target
from smtpsvc.admin.probe import probe as probe_peer
from smtpsvc.admin.service import LIST_LIMIT, TRACK_LIMIT, AdminError, QueueAdmin
from smtpsvc.auth.users import UsersFileError, UserStore, check_name, check_password, users_path
from smtpsvc.cmdconfig import config_path as _config_path
from smtpsvc.cmdconfig import load as _load
from smtpsvc.config import (
    Config,
    ConfigError,
    load_config,
    render_effective,
    render_example,
)
from smtpsvc.delivery.tlsrpt import TlsCounts
from smtpsvc.dsn import split_headers
from smtpsvc.migrate import ImportFailed
from smtpsvc.migrate.iis import Credential, convert
from smtpsvc.migrate.metabase import choose_server, read_export
from smtpsvc.migrate.tomlout import render, report_lines
from smtpsvc.model import Envelope, rfc5322_date
from smtpsvc.protocol import AddressError, parse_path
from smtpsvc.queue import pgschema
from smtpsvc.queue.pgschema import DatabaseError
from smtpsvc.receiving import new_resolver
from smtpsvc.routing.categorizer import (
    check_recipient,
    connection_allowed,
    explain,
    postmaster_address,
    route_for,
)
from smtpsvc.routing.mtasts import (
    FetchError,
    MtaSts,
    Policy,
    PolicyError,
    mx_allowed,
    parse_policy,
    parse_sts_record,
    parse_tlsrpt_record,
)
from smtpsvc.routing.mx import DnsError, MxResolver

config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Configuration file (default: $SMTPSVC_CONFIG, else ./smtpsvc.toml if present, "
    "else built-in defaults).",
)


class _Commands(click.Group):
    """The `smtpsvc` group, which is also `sendmail`, `mailq` and `newaliases` when linked under those names
    (`ln -s $(command -v smtpsvc) /usr/sbin/sendmail`), as Postfix's sendmail is. `smtpsvc sendmail ...` is
    taken before click parses it: sendmail's options are getopt's (`-oi`, `-ti`, `--`), not click's."""

    def main(self, args: Any = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        invoked = os.path.basename(sys.argv[0]) if args is None else ""
        argv = list(sys.argv[1:] if args is None else args)
        if invoked in ("sendmail", "newaliases"):
            sys.exit(sendmail_door(argv if invoked == "sendmail" else ["-bi", *argv], invoked))
        if invoked == "mailq":
            sys.exit(sendmail_door(["-bp", *argv], invoked))
        if argv[:1] == ["sendmail"]:
            sys.exit(sendmail_door(argv[1:]))
        return super().main(args, prog_name, **extra)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smtpsvc")
def main() -> None:
    """smtpsvc: a durable SMTP relay with Pickup, Queue, Drop and Badmail folders."""


@main.command()
@config_option
@click.option("--root", metavar="DIR", help="Mailroot folder (overrides server.root).")
@click.option(
    "--listen", metavar="HOST:PORT", multiple=True, help="Listen address (overrides server.listen)."
)
@click.option("--worker-fd", type=int, hidden=True, help="Run as an SMTP worker of the main process.")
def serve(config_file: str | None, root: str | None, listen: tuple[str, ...], worker_fd: int | None) -> None:
    """Run the service in the foreground until SIGTERM or Ctrl-C."""
    path = _config_path(config_file)
    config = _load(path, root, listen)
    if worker_fd is not None:
        # A worker only receives: it must not load the admin web stack that the composition root pulls in.
        from smtpsvc.workers import run_worker

        raise SystemExit(run_worker(config, path, worker_fd))
    from smtpsvc.app import run_service  # imported here so `config` commands stay light

    raise SystemExit(run_service(config, path))


@main.group()
def config() -> None:
    """Check, show or write an example of the configuration."""


@config.command("check")
@config_option
def config_check(config_file: str | None) -> None:
    """Validate the configuration; exit 2 with `file:line: key: problem` lines on error."""
    path = _config_path(config_file)
    cfg = _load(path)
    for warning in cfg.warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(f"{path or 'built-in defaults'}: OK")


@config.command("show")
@config_option
def config_show(config_file: str | None) -> None:
    """Print the effective configuration, with the verb mask decoded."""
    click.echo(render_effective(_load(_config_path(config_file))), nl=False)


@config.command("example")
def config_example() -> None:
    """Print a fully commented example configuration."""
    click.echo(render_example(), nl=False)


# --------------------------------------------------------------------------------------------- users


@main.group()
def users() -> None:
    """Manage SMTP AUTH accounts (password hashes, never plain text)."""


def _users_file(config_file: str | None) -> Path:
    path = _config_path(config_file)
    try:
        return users_path(_load(path), path)
    except ValueError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None


def _load_users(file: Path) -> UserStore:
    try:
        return UserStore.load(file)
    except UsersFileError as exc:
        click.echo(f"error: {exc}", err=True)
        click.echo("Fix or remove that entry (a text editor will do), then try again.", err=True)
        raise SystemExit(1) from None


def _save_users(store: UserStore, file: Path) -> None:
    try:
        store.save(file)
    except OSError as exc:
        click.echo(f"error: cannot write {file}: {exc.strerror or exc}", err=True)
        click.echo("Check that the folder exists and that you may write to it (run as its owner).", err=True)
        raise SystemExit(1) from None


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line.removesuffix("\n").removesuffix("\r")
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


@users.command("add")
@config_option
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def users_add(config_file: str | None, name: str, password_stdin: bool) -> None:
    """Add account NAME, or change its password if it exists (prompts twice unless --password-stdin)."""
    problem = check_name(name)
    if problem:
        click.echo(f"error: {problem}; use 1 to 255 characters without control characters.", err=True)
        raise SystemExit(2)
    file = _users_file(config_file)
    store = _load_users(file)
    password = _read_password(password_stdin)
    problem = check_password(password)
    if problem:
        click.echo(f"error: {problem}; the password must be 1 to 1024 characters. Nothing changed.", err=True)
        raise SystemExit(2)
    changed = store.add(name, password)
    _save_users(store, file)
    click.echo(f"password changed for {name}" if changed else f"added {name}")


@users.command("remove")
@config_option
@click.argument("name")
def users_remove(config_file: str | None, name: str) -> None:
    """Remove account NAME."""
    file = _users_file(config_file)
    store = _load_users(file)
    if not store.remove(name):
        click.echo(
            f"error: no such user: {name} in {file} (see `smtpsvc users list`; names are case-sensitive)",
            err=True,
        )
        raise SystemExit(1)
    _save_users(store, file)
    click.echo(f"removed {name}")


@users.command("list")
@config_option
def users_list(config_file: str | None) -> None:
    """Print the account names, one a line (never the hashes)."""
    file = _users_file(config_file)
    store = _load_users(file)
    for name in store.names():
        click.echo(name)
    if not store.has_users:
        click.echo(f"no accounts in {file}; add one with `smtpsvc users add NAME`", err=True)


# --------------------------------------------------------------------------------------------- relay


@main.group()
def relay() -> None:
    """Explain relay decisions."""


@relay.command("check")
@config_option
@click.option("--client", "client_ip", required=True, metavar="IP", help="The client's IP address.")
@click.option("--rcpt", required=True, metavar="ADDR", help="The recipient address (RCPT TO).")
@click.option("--auth", "auth_user", metavar="USER", help="Assume the client authenticated as USER.")
def relay_check(config_file: str | None, client_ip: str, rcpt: str, auth_user: str | None) -> None:
    """Show whether CLIENT may send to RCPT through this server, and the rule that decides (SPEC 2.3)."""
    cfg = _load(_config_path(config_file))
    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        click.echo(
            f"smtpsvc: --client {client_ip!r} is not an IP address (e.g. 192.0.2.10 or 2001:db8::1)", err=True
        )
        raise SystemExit(2) from None
    text = rcpt if rcpt.startswith("<") else f"<{rcpt}>"
    try:
        path = parse_path(text, utf8=True, allow_postmaster=True)
    except AddressError as exc:
        click.echo(f"smtpsvc: --rcpt {rcpt!r} is not a valid address: {exc}", err=True)
        raise SystemExit(2) from None
    address = postmaster_address(path.address, cfg)
    decision = check_recipient(
        client_ip, address, cfg, authenticated=auth_user is not None, source_route=path.source_route
    )
    who = f", authenticated as {auth_user}" if auth_user else ""
    click.echo(f"client {client_ip}{who} -> recipient {address}")
    click.echo(f"connection: {_connection_verdict(cfg, client_ip)}")
    if decision.allowed:
        click.echo("decision: accepted")
    else:
        click.echo(f'decision: refused with "550 5.7.1 Unable to relay for <{address}>"')
    click.echo(f"rule: {decision.rule}: {explain(decision.rule)}")


def _connection_verdict(cfg: Config, client_ip: str) -> str:
    """`relay check`'s line on connection control ([connection]): may the client connect at all?"""
    rules = cfg.connection
    if not rules.allow and not rules.deny:
        return "accepted (connection.allow and connection.deny are empty: everyone may connect)"
    if connection_allowed(client_ip, rules.allow, rules.deny):
        return "accepted (" + ("in connection.allow)" if rules.allow else "not in connection.deny)")
    allowed_alone = connection_allowed(client_ip, rules.allow, ())
    return (
        f'refused with "554 5.7.1 {cfg.server.hostname} Access denied: {client_ip} may not connect '
        f'(connection control)" ({"in connection.deny" if allowed_alone else "not in connection.allow"}); '
        "it never gets to RCPT, the decision below is the relay rules' alone"
    )


# --------------------------------------------------------------------------------------------- queue


@main.group()
def queue() -> None:
    """Inspect and repair the queue: through the running service's admin API, or on the files of a stopped
    one (with its lock); with queue.backend = "postgres", on the cluster's database from any node. Each
    command says which."""


Admin = QueueAdmin | RemoteAdmin
T = TypeVar("T")


def _with_admin(config_file: str | None, work: Callable[[Admin], Awaitable[T]], quiet: bool = False) -> T:
    """Open the queue (its files, the running service's API, or the cluster's database), say which on
    stderr unless `quiet`, run `work` on it in one event loop, and turn an AdminError into exit 1."""
    config = _load(_config_path(config_file))

    async def main() -> T:
        from smtpsvc.app import open_queue  # the composition root builds the queue; imported when needed

        async with open_admin(config, open_queue) as admin:
            if not quiet:
                click.echo(f"smtpsvc: working on {admin.where}", err=True)
            return await work(admin)

    try:
        return asyncio.run(main())
    except AdminError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def _fail(exc: AdminError) -> NoReturn:
    click.echo(f"smtpsvc: {exc}", err=True)
    raise SystemExit(1)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


@queue.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document (for scripts).")
@click.option("--state", type=click.Choice(["ready", "retry", "frozen"]), help="Only messages in this state.")
@click.option("--to", "to", metavar="ADDR", help="Only messages with this recipient.")
@click.option("--domain", metavar="D", help="Only messages with a recipient at this domain.")
@click.option("--link", metavar="L", help="Only messages waiting for this next hop (see `queue summary`).")
@click.option(
    "--limit", type=click.IntRange(min=1), default=LIST_LIMIT, show_default=True, help="The oldest N at most."
)
def queue_list(
    config_file: str | None,
    as_json: bool,
    state: str | None,
    to: str | None,
    domain: str | None,
    link: str | None,
    limit: int,
) -> None:
    """List queued messages, the oldest first: id, state, age, size, sender, recipients, next attempt,
    last error, and the node delivering it right now (in a cluster)."""
    if (
        as_json
    ):  # the document GET /api/queue answers: {"where", "queued", "limit", "frozen_links", "messages"}
        document = _with_admin(
            config_file, lambda admin: admin.listing(state or "", to or "", domain or "", link or "", limit)
        )
        click.echo(json.dumps(document, indent=2))
        return
    entries = _with_admin(
        config_file, lambda admin: admin.entries(state or "", to or "", domain or "", link or "", limit)
    )
    now = time.time()
    if not entries:
        filtered = state or to or domain or link
        click.echo("no message matches" if filtered else "the queue is empty")
        return
    for entry in entries:
        env = entry.envelope
        status = entry.status(now)  # the state and next attempt `queue summary` and the API show
        due = status.next_attempt
        when = "now" if due is not None and due <= now else (_age(due - now) if due else "-")
        held = f"  leased by {entry.leased_by}" if entry.leased_by else ""
        click.echo(
            f"{env.id}  {status.state:<6} age {_age(now - env.received_at):>4}  {env.size:>8} B  "
            f"from <{env.sender}>  next {when}{held}"
        )
        for r in env.recipients:
            last = f"  last: {r.last_reply}" if r.last_reply and r.pending else ""
            click.echo(
                f"    {r.state.value:<9} {r.address}  (route {r.route or '-'}, {r.attempts} attempts){last}"
            )
    if len(entries) >= limit:
        click.echo(f"(the oldest {limit} shown; there may be more: --limit, or `smtpsvc queue summary`)")


@queue.command("summary")
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document (for scripts).")
def queue_summary(config_file: str | None, as_json: bool) -> None:
    """Per next hop (link): messages, recipients, oldest age, state, next retry (like qshape)."""
    now = time.time()
    links = _with_admin(config_file, lambda admin: admin.summary(now))
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(link) for link in links], indent=2))
        return
    if not links:
        click.echo("the queue is empty")
        return
    click.echo(f"{'link':<30} {'messages':>8} {'rcpts':>6} {'oldest':>7}  {'state':<7} next")
    for link in links:
        due = link.next_attempt
        when = "-" if due is None else ("now" if due <= now else f"in {_age(due - now)}")
        click.echo(
            f"{link.link:<30} {link.messages:>8} {link.recipients:>6} {_age(link.oldest_age):>7}  "
            f"{link.state:<7} {when}"
        )
        if link.budget:  # the link's provider limits (connector rate, recipients_per_day)
            click.echo(f"  {link.budget}")


@queue.command("show")
@config_option
@click.argument("queue_id")
@click.option("--transcript", is_flag=True, help="Also print the last SMTP conversations.")
def queue_show(config_file: str | None, queue_id: str, transcript: bool) -> None:
    """Envelope, headers, per-recipient history and (with --transcript) the delivery transcripts."""

    async def read(admin: Admin) -> tuple[Envelope, bytes, str]:
        return await admin.get(queue_id), await admin.headers(queue_id), await admin.leased_by(queue_id)

    env, headers, leased_by = _with_admin(config_file, read)
    click.echo(f"id:        {env.id}")
    click.echo(
        f"received:  {rfc5322_date(env.received_at)} from {env.source.value} "
        f"{env.client_ip or ''} {('(' + env.helo + ')') if env.helo else ''}".rstrip()
    )
    click.echo(f"sender:    <{env.sender}>{'  authenticated as ' + env.auth_user if env.auth_user else ''}")
    click.echo(f"size:      {env.size} bytes{'  frozen' if env.frozen else ''}")
    if leased_by:
        click.echo(f"leased by: {leased_by} (being delivered now)")
    for r in env.recipients:
        click.echo(f"recipient: {r.address}  {r.state.value}  route {r.route or '-'}  attempts {r.attempts}")
        for attempt in r.history:
            click.echo(f"    {rfc5322_date(attempt.time)}  {attempt.host or '-'}  {attempt.reply}")
    click.echo("")
    click.echo(headers.decode("utf-8", "replace").rstrip())
    if transcript:
        if not env.transcripts:
            click.echo("\n(no SMTP transcript: the message has not been tried by SMTP yet)")
        for lines in env.transcripts:
            click.echo("")
            for line in lines:
                click.echo(line)


def _one_target(queue_id: str | None, **others: object) -> None:
    given = [bool(queue_id), *(bool(v) for v in others.values())]
    if sum(given) != 1:
        names = " | ".join(["ID", *(f"--{k}" for k in others)])
        click.echo(f"smtpsvc: give exactly one of {names}", err=True)
        raise SystemExit(2)


def _link_of_domain(config_file: str | None, domain: str) -> str:
    """The next hop a domain's mail waits on: the domain itself for MX routing, else its connector, the
    smart host or drop (a frozen smart host link holds every domain routed through it)."""
    return route_for(f"postmaster@{domain.rstrip('.')}", _load(_config_path(config_file))).link


def _freeze_or_thaw(verb: str, doc: str) -> None:
    @queue.command(verb, help=doc)
    @config_option
    @click.argument("queue_id", required=False)
    @click.option(
        "--link", metavar="L", help="Every message waiting for this next hop (see `queue summary`)."
    )
    @click.option("--domain", metavar="D", help="The link this domain's mail goes through.")
    @click.option("--all", "every", is_flag=True, help="Every queued message.")
    def change(
        config_file: str | None, queue_id: str | None, link: str | None, domain: str | None, every: bool
    ) -> None:
        _one_target(queue_id, link=link, domain=domain, all=every)
        if domain:
            link = _link_of_domain(config_file, domain)

        async def act(admin: Admin) -> str:
            if link or every:
                return _done_line(await _run_job(admin, BulkRequest(verb, link=link or "")), admin.where)
            envelope = await (admin.freeze if verb == "freeze" else admin.thaw)(str(queue_id))
            return f"{envelope.id}: {verb} done on {admin.where}"

        click.echo(_with_admin(config_file, act, quiet=True))


_freeze_or_thaw(
    "freeze",
    "Hold a message, a whole link, or every message (Exchange Queue Viewer Freeze): its mail is kept and "
    "still accepted, and nothing is delivered until thawed.",
)
_freeze_or_thaw("thaw", "Release a frozen message, link, or every frozen message.")


@queue.command("retry")
@config_option
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
@click.option("--domain", metavar="D", help="Messages with a pending recipient at this domain.")
@click.option("--link", metavar="L", help="Messages waiting for this next hop.")
def queue_retry(
    config_file: str | None, queue_id: str | None, every: bool, domain: str | None, link: str | None
) -> None:
    """Force Connection: attempt now (on a stopped service: as soon as it starts)."""
    _one_target(queue_id, all=every, domain=domain, link=link)

    async def act(admin: Admin) -> str:
        if queue_id:
            await admin.retry(queue_id)
            return f"{queue_id}: retry done on {admin.where}"
        status = await _run_job(admin, BulkRequest("retry", domain=domain or "", link=link or ""))
        return _done_line(status, admin.where)

    click.echo(_with_admin(config_file, act, quiet=True))


@queue.command("recategorize")
@config_option
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
def queue_recategorize(config_file: str | None, queue_id: str | None, every: bool) -> None:
    """Re-run categorizer and router (ResetMessageStatus, KB279616) on one message or --all."""
    _one_target(queue_id, all=every)

    async def act(admin: Admin) -> str:
        if queue_id:
            count = await admin.recategorize(queue_id)
            return f"{count} message(s) re-categorized on {admin.where}; they are due now"
        return _done_line(await _run_job(admin, BulkRequest("recategorize")), admin.where)

    click.echo(_with_admin(config_file, act, quiet=True))


@queue.command("delete")
@config_option
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message (needs --yes).")
@click.option("--ndr", is_flag=True, help="Return it (each) to the sender first, with status 4.3.2.")
@click.option("--yes", is_flag=True, help="Confirm --all: every queued message is destroyed.")
def queue_delete(config_file: str | None, queue_id: str | None, every: bool, ndr: bool, yes: bool) -> None:
    """Delete a message, or --all, without a report (the default) or with an NDR to its sender (--ndr)."""
    _one_target(queue_id, all=every)
    if every and not yes:
        click.echo(
            "smtpsvc: delete --all destroys every queued message"
            f"{' (each returned to its sender with an NDR)' if ndr else ', without any report'}; "
            "nothing was deleted. Add --yes to confirm (see `smtpsvc queue summary` first).",
            err=True,
        )
        raise SystemExit(2)

    async def act(admin: Admin) -> str:
        if every:
            return _done_line(await _run_job(admin, BulkRequest("delete", ndr=ndr)), admin.where)
        await admin.delete(str(queue_id), ndr=ndr)
        return f"{queue_id}: deleted{' with an NDR to the sender' if ndr else ''} on {admin.where}"

    click.echo(_with_admin(config_file, act, quiet=True))


@queue.command("jobs")
@config_option
@click.argument("job_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (for scripts).")
@click.option("--wait", is_flag=True, help="With ID: follow the job (progress bar) until it ends.")
def queue_jobs(config_file: str | None, job_id: str | None, as_json: bool, wait: bool) -> None:
    """The bulk jobs of the running service (retry, freeze, thaw, delete, recategorize of many messages),
    running and recent, newest first; or one job."""
    if wait and not job_id:
        click.echo("smtpsvc: --wait needs a job ID (see `smtpsvc queue jobs`)", err=True)
        raise SystemExit(2)

    async def one(admin: Admin) -> JobStatus:
        status = await admin.job(str(job_id))
        return await _follow(admin, status) if wait else status

    if job_id:
        status = _with_admin(config_file, one, quiet=True)
        click.echo(json.dumps(status.to_json(), indent=2) if as_json else _job_details(status))
        if wait and status.state is JobState.FAILED:
            raise SystemExit(1)
        return

    async def recent(admin: Admin) -> tuple[list[JobStatus], str]:
        if isinstance(admin, RemoteAdmin):
            return await admin.recent_jobs(), f"no jobs on {admin.where}"
        return [], (  # the queue opened by this command: its bulk commands run within themselves
            f"no jobs on {admin.where} (here a bulk command runs within the command itself; a running "
            "service lists the jobs started through its admin API or viewer at GET /api/jobs)"
        )

    found, none = _with_admin(config_file, recent, quiet=True)
    if as_json:
        click.echo(json.dumps([status.to_json() for status in found], indent=2))
        return
    if not found:
        click.echo(none)
    now = time.time()
    for status in found:
        click.echo(
            f"{status.id}  {status.state.value:<7} {_done_of(status):>15}  "
            f"{_age(now - status.started):>4} ago  {status.request.description}: {_outcome_text(status)}"
        )


async def _run_job(admin: Admin, request: BulkRequest) -> JobStatus:
    """Start a bulk job (in the service, or in this process on a stopped service's files), follow it to its
    end with a progress bar, and return it done; a failed job is an AdminError with its error."""
    status, started = await admin.start_job(request)
    if not started:
        click.echo(f"smtpsvc: job {status.id} is already doing this ({status.request.description})", err=True)
    status = await _follow(admin, status)
    if status.state is JobState.FAILED:
        raise AdminError(
            f"job {status.id} ({status.request.description}) failed{_after(status)}: {status.error}"
        )
    return status


async def _follow(admin: Admin, status: JobStatus) -> JobStatus:
    """Poll a job until it ends, however long that takes, with short requests: a poll that gets no answer
    is tried again, never reported as the failure of work that goes on. Ctrl-C stops the watching."""
    remote = isinstance(admin, RemoteAdmin)
    bar = _ProgressBar(sys.stderr.isatty())
    pause, longest = 0.05, (1.0 if remote else 0.2)  # a quick job answers quickly, a long one is not hammered
    try:
        while status.state is JobState.RUNNING:
            bar.show(status)
            await asyncio.sleep(pause)
            pause = min(pause * 2, longest)
            try:
                status = await admin.job(status.id)
            except ServiceSilent:
                bar.note("the service is slow to answer; still waiting for the job (Ctrl-C stops watching)")
            except AdminError as exc:
                raise AdminError(
                    f"{exc}\njob {status.id} ({status.request.description}) was at {_done_of(status)} "
                    "message(s) when last seen; what it changed stays changed: see `smtpsvc queue summary`"
                ) from None
    except asyncio.CancelledError:
        bar.clear()
        if remote:
            click.echo(
                f"smtpsvc: stopped watching; job {status.id} ({status.request.description}) goes on in the "
                f"service: follow it with `smtpsvc queue jobs {status.id} --wait` "
                f"(or GET /api/jobs/{status.id})",
                err=True,
            )
        else:
            click.echo(
                f"smtpsvc: interrupted; job {status.id} ({status.request.description}) stops at the end of "
                f"its batch (it had done {_done_of(status)} message(s) when last seen): what it changed "
                "stays changed, and its event 9006 says how far it got",
                err=True,
            )
        raise
    finally:
        bar.clear()
    return status


class _ProgressBar:
    """On a terminal, one line on stderr redrawn with \r; otherwise (a pipe, a log) a line every 10 s."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty
        self.shown = 0  # characters on the terminal line now
        self.started = time.monotonic()
        self.printed = self.started

    def show(self, status: JobStatus) -> None:
        now = time.monotonic()
        if self.tty:
            columns = shutil.get_terminal_size().columns - 1
            self._draw(progress_line(status, now - self.started)[:columns])
        elif now - self.printed >= 10:
            self.printed = now
            click.echo(f"smtpsvc: job {status.id}: {_done_of(status)} message(s)", err=True)

    def note(self, text: str) -> None:
        if self.tty:
            self._draw(text)
        else:
            click.echo(f"smtpsvc: {text}", err=True)

    def clear(self) -> None:
        if self.shown:
            click.echo("\r" + " " * self.shown + "\r", nl=False, err=True)
            self.shown = 0

    def _draw(self, line: str) -> None:
        click.echo("\r" + line.ljust(self.shown), nl=False, err=True)
        self.shown = len(line)


def progress_line(status: JobStatus, elapsed: float, width: int = 24) -> str:
    """The progress bar's text: `retry of every message [######------]  50%  500/1000  12s`."""
    head = f"{status.request.description} "
    if not status.total:
        return f"{head}[working]  {status.done} message(s)  {elapsed:.0f}s"
    part = min(status.done / status.total, 1.0)
    filled = int(part * width)
    bar = "#" * filled + "-" * (width - filled)
    return f"{head}[{bar}] {part:4.0%}  {status.done}/{status.total}  {elapsed:.0f}s"


def _done_of(status: JobStatus) -> str:
    return f"{status.done}/{status.total}" if status.total is not None else str(status.done)


def _after(status: JobStatus) -> str:
    return f" after {status.done} of {status.total} message(s)" if status.total else ""


def _outcome_text(status: JobStatus) -> str:
    if status.result is not None:
        return status.result.message
    return status.error or "running"


def _done_line(status: JobStatus, where: str) -> str:
    """A finished job's result, in the words the command printed before jobs existed."""
    request, result = status.request, status.result
    count = result.count if result else 0
    if request.kind == "retry":
        line = f"{count} message(s) due now on {where}"
    elif request.kind == "recategorize":
        line = f"{count} message(s) re-categorized on {where}; they are due now"
    elif request.link:
        line = f"link {request.link}: {request.kind} done ({count} message(s) wait on it) on {where}"
    elif request.kind in ("freeze", "thaw"):
        line = f"{count} message(s) {'frozen' if request.kind == 'freeze' else 'thawed'} on {where}"
    else:
        line = f"{count} message(s) deleted{' with an NDR to each sender' if request.ndr else ''} on {where}"
    if result is not None and result.left:
        line += (
            f"; {result.left} being delivered right now left in the queue (freeze them, then delete again)"
        )
    return line


def _job_details(status: JobStatus) -> str:
    lines = [
        f"job:       {status.id}",
        f"what:      {status.request.description}",
        f"state:     {status.state.value}",
        f"progress:  {_done_of(status)} message(s)",
        f"started:   {rfc5322_date(status.started)}",
    ]
    if status.finished is not None:
        lines.append(f"finished:  {rfc5322_date(status.finished)} ({status.finished - status.started:.1f} s)")
    if status.result is not None:
        lines.append(f"result:    {status.result.message}")
    if status.error:
        lines.append(f"error:     {status.error}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ db


@main.group()
def db() -> None:
    """Create or upgrade the PostgreSQL queue schema (queue.backend = "postgres", queue.dsn)."""


def _schema_command(config_file: str | None, step: Callable[[str], Coroutine[Any, Any, str]]) -> None:
    cfg = _load(_config_path(config_file))
    try:
        click.echo(asyncio.run(step(cfg.queue.dsn)))
    except DatabaseError as exc:
        click.echo(f"smtpsvc: {exc}", err=True)
        raise SystemExit(1) from None


@db.command("init")
@config_option
def db_init(config_file: str | None) -> None:
    """Create the schema in the empty database queue.dsn names (an initialised one is left as it is)."""
    _schema_command(config_file, pgschema.init)


@db.command("migrate")
@config_option
def db_migrate(config_file: str | None) -> None:
    """Upgrade the schema to this version of smtpsvc (safe to run from several nodes at once)."""
    _schema_command(config_file, pgschema.migrate_dsn)


# --------------------------------------------------------------------------------------------- badmail


@main.group()
def badmail() -> None:
    """Inspect Badmail and replay items through Pickup (works while the service runs)."""


def _badmail_dirs(config_file: str | None) -> tuple[Path, Path]:
    root = Path(_load(_config_path(config_file)).server.root)
    return root / "badmail", root / "pickup"


@badmail.command("list")
@config_option
def badmail_list(config_file: str | None) -> None:
    """One line per item: name, kind (failure, delay, relayed, other), size, age, first reason."""
    folder, _ = _badmail_dirs(config_file)
    found = badmail_admin.items(folder)
    if not found:
        click.echo("Badmail is empty")
    now = time.time()
    for item in found:
        click.echo(
            f"{item.name}  {item.kind:<7}  {item.size:>8} B  {_age(now - item.mtime):>4}  {item.reason}"
        )


@badmail.command("show")
@config_option
@click.argument("name")
def badmail_show(config_file: str | None, name: str) -> None:
    """The reasons (.bdr), the envelope (.bdp) and the message headers (.bad)."""
    folder, _ = _badmail_dirs(config_file)
    try:
        item, envelope, content = badmail_admin.show(folder, name)
    except AdminError as exc:
        _fail(exc)
    for reason in item.reasons:
        click.echo(f"reason:   {reason}")
    if envelope is not None:
        click.echo(f"envelope: {json.dumps(envelope)[:2000]}")
    click.echo("")
    click.echo(split_headers(content[:65536]).decode("utf-8", "replace").rstrip())


@badmail.command("replay")
@config_option
@click.argument("name", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Replay every item of --kind.")
@click.option(
    "--kind",
    type=click.Choice([*badmail_admin.KINDS, "all"]),
    default=None,
    help="With --all: the kind of item replayed (default failure, as KB306043 advises).",
)
def badmail_replay(config_file: str | None, name: str | None, replay_all: bool, kind: str | None) -> None:
    """Resubmit through Pickup, with the original envelope when the .bdp has it (KB306043)."""
    folder, pickup = _badmail_dirs(config_file)
    if bool(name) == replay_all:
        click.echo("smtpsvc: give one item NAME or --all (see `smtpsvc badmail list`)", err=True)
        raise SystemExit(2)
    if kind is not None and not replay_all:
        click.echo("smtpsvc: --kind goes with --all (one item NAME is replayed whatever its kind)", err=True)
        raise SystemExit(2)
    names = [str(name)]
    if replay_all:  # a damaged item is skipped, saying why; the others of the kind are replayed
        kind = kind or "failure"
        found = [i for i in badmail_admin.items(folder) if kind in ("all", i.kind)]
        for damaged in (i for i in found if i.damaged):
            click.echo(f"{damaged.name}: skipped, {damaged.reason}", err=True)
        names = [i.name for i in found if not i.damaged]
    for item in names:
        try:
            target = badmail_admin.replay(folder, pickup, item)
        except AdminError as exc:
            _fail(exc)
        click.echo(f"{item}: written to {target}")


# ------------------------------------------------------------------------------------ sendmail, events


@main.command(
    context_settings={"ignore_unknown_options": True, "help_option_names": []}, add_help_option=False
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sendmail(args: tuple[str, ...]) -> None:
    """Submit the message on standard input, as Unix programs call /usr/sbin/sendmail (see --help)."""
    raise SystemExit(sendmail_door(list(args)))  # reached only through click's own dispatch


SENDMAIL_USAGE = """usage: sendmail [-t] [-i|-oi] [-f SENDER] [-F FULLNAME] [-N never|success,delay,failure]
                [-R full|hdrs] [-V ENVID] [-c SMTPSVC.TOML] [--] [RECIPIENT...]
       sendmail -bs     an SMTP session on standard input and output
       sendmail -bp     the queue (mailq); sendmail -bi: nothing to do (newaliases)
The message is written into the Pickup folder; the service sends it. docs/operations.md has the details."""
ETC_CONFIG = Path("/etc/smtpsvc/smtpsvc.toml")


def sendmail_door(args: list[str], name: str = "smtpsvc sendmail") -> int:
    """`smtpsvc sendmail ARGS` and the program run as `sendmail`: Postfix's sendmail(1) command line, the
    exit codes of sysexits.h, one line on stderr for each problem."""

    def say(text: str) -> None:
        click.echo(f"{name}: {text}", err=True)

    try:
        request = sendmail_admin.parse_argv(args)
    except sendmail_admin.UsageError as exc:
        say(f"{exc} (see `{name} --help`)")
        return sendmail_admin.EX_USAGE
    if request.help:
        click.echo(SENDMAIL_USAGE)
        return sendmail_admin.EX_OK
    for note in request.notes:
        say(note)
    if request.mode == "newaliases":
        say("nothing to do: smtpsvc has no alias database (routes are in smtpsvc.toml)")
        return sendmail_admin.EX_OK
    found = _config_path(request.config_file)
    if found is None and ETC_CONFIG.is_file():  # a program calling /usr/sbin/sendmail sets no variable
        found = str(ETC_CONFIG)
    if found is None and name != "smtpsvc sendmail":
        # Linked as sendmail, a program runs us from any folder: the default ./mailroot would be its own
        say(f"no configuration: put it at {ETC_CONFIG} or name it in SMTPSVC_CONFIG")
        return sendmail_admin.EX_CONFIG
    try:
        config = load_config(found, os.environ)
    except ConfigError as exc:
        say(str(exc).replace("\n", " "))
        return sendmail_admin.EX_CONFIG
    if request.mode == "mailq":
        return _exit_status(["queue", "list", *(["-c", found] if found else [])])
    if sys.stdin is None or (request.mode == "smtp" and sys.stdout is None):  # started with fd 0 (1) closed
        say("standard input is closed: there is no message to read")
        return sendmail_admin.EX_NOINPUT
    if request.mode == "smtp":
        sendmail_admin.run_smtp_session(config, sys.stdin.buffer, sys.stdout.buffer)
        return sendmail_admin.EX_OK
    try:
        path = sendmail_admin.submit_message(config, request, sys.stdin.buffer, _login_name())
    except sendmail_admin.SubmitError as exc:
        say(str(exc))
        return exc.status
    if sys.stderr.isatty():  # programs get sendmail's silence on success; a person sees where it went
        say(f"queued through Pickup as {path.name}")
    return sendmail_admin.EX_OK


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a user id with no name (a container): mail still needs a sender
        return "postmaster"


def _exit_status(args: list[str]) -> int:
    try:
        main.main(args, prog_name="smtpsvc", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return 0


@main.command()
@config_option
@click.option("--id", "event_id", type=int, help="Only events with this ID (e.g. 4000).")
@click.option("--since", metavar="T", help='Only events since T: a duration ("1h") or an RFC 3339 time.')
@click.option("--follow", is_flag=True, help="Keep printing new events (Ctrl-C to stop).")
@click.option("--json", "as_json", is_flag=True, help="The JSON lines as stored.")
def events(
    config_file: str | None, event_id: int | None, since: str | None, follow: bool, as_json: bool
) -> None:
    """Read the event log (log/events.jsonl)."""
    path = Path(_load(_config_path(config_file)).server.root) / "log" / "events.jsonl"
    cutoff = _since(since) if since else None

    def show(line: str) -> None:
        try:
            record = json.loads(line)
        except ValueError:
            return
        if not isinstance(record, dict) or (event_id is not None and record.get("id") != event_id):
            return
        if cutoff is not None and str(record.get("time", "")) < cutoff:
            return
        if as_json:
            click.echo(line.rstrip("\n"))
            return
        extra = " ".join(f"{k}={record[k]}" for k in ("queue_id", "cause", "status") if k in record)
        click.echo(
            f"{record.get('time')} {record.get('id')} {record.get('level')} {record.get('text')}"
            + (f"  [{extra}]" if extra else "")
        )

    if not path.exists() and not follow:
        click.echo(f"no event log at {path} yet", err=True)
        return
    position = 0
    while True:
        if path.exists():
            with open(path, encoding="utf-8", errors="replace") as fh:
                fh.seek(position)
                for line in fh:
                    show(line)
                position = fh.tell()
        if not follow:
            return
        time.sleep(0.5)


@main.command()
@config_option
@click.option("--sender", metavar="A", default="", help="Messages from this address (or any containing it).")
@click.option("--recipient", metavar="A", default="", help="Messages to this address (or any containing it).")
@click.option(
    "--id", "queue_id", metavar="Q", default="", help="The message with this queue id (or its start)."
)
@click.option("--since", metavar="T", default="", help='Received since T: "2h", "1d" or an ISO time (UTC).')
@click.option(
    "--limit", type=click.IntRange(min=1), default=TRACK_LIMIT, show_default=True, help="The newest N."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document (the same as GET /api/track).")
def track(
    config_file: str | None, sender: str, recipient: str, queue_id: str, since: str, limit: int, as_json: bool
) -> None:
    """What happened to a message: its sender, recipients, where it came from, each delivery attempt with
    the conversation (the protocol log, when [protocol_log] is on) and how it ended, from the event log and
    the protocol log; also after it has left the queue."""
    document = _with_admin(
        config_file, lambda admin: admin.track(sender, recipient, queue_id, since, limit), quiet=as_json
    )
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    messages = document.get("messages", [])
    if not messages:
        click.echo("no message in the logs matches")
    else:
        click.echo(tracking.render_documents(messages), nl=False)
    if not document.get("protocol_log"):
        click.echo(
            "(the protocol log is off: no conversations shown; [protocol_log] enabled = true logs them)",
            err=True,
        )


def _since(text: str) -> str:
    """An RFC 3339 lower bound (UTC), for comparison with `time`, from what `smtpsvc track --since` takes
    too ("90m", "2h", "1d", "1w", or an ISO time, UTC when it names no zone): one reading for both."""
    try:
        cutoff = tracking.parse_since(text, time.time())
    except ValueError as exc:
        click.echo(f"smtpsvc events: {exc}", err=True)
        raise SystemExit(2) from None
    return datetime.fromtimestamp(cutoff, UTC).isoformat(timespec="milliseconds")


@main.command()
@config_option
@click.argument("target", metavar="HOST[:PORT]")
@click.option("--starttls", is_flag=True, help="Also upgrade with STARTTLS and check the certificate.")
@click.option("--helo", "use_helo", is_flag=True, help="Send HELO instead of EHLO.")
@click.option(
    "--exchange", is_flag=True, help="Expect an Exchange 2000/2003 peer (XEXCH50 and X-LINK2STATE)."
)
@click.option(
    "--auth",
    "profile",
    metavar="PROFILE",
    help="Fetch a token of [oauth.PROFILE] and log in with it (XOAUTH2, or the mechanism configured), "
    "reporting each step. Implies --starttls.",
)
@click.option(
    "--user", metavar="MAILBOX", help="With --auth: the mailbox to log in as (default: the one configured)."
)
@click.option(
    "--dane",
    is_flag=True,
    help="Look up the host's TLSA records (_PORT._tcp.HOST) through the configured resolver, say whether "
    "they are DNSSEC-authenticated, and check the certificate against them.",
)
@click.option(
    "--policy",
    "show_policy",
    is_flag=True,
    help="TARGET is a domain: show what it publishes (MX, MTA-STS, TLS-RPT) and what smtpsvc would enforce.",
)
def probe(
    config_file: str | None,
    target: str,
    starttls: bool,
    use_helo: bool,
    exchange: bool,
    profile: str | None,
    user: str | None,
    dane: bool,
    show_policy: bool,
) -> None:
    """The KB279616 telnet check: banner, EHLO keywords, what is missing and what that means here; with
    --auth, the token fetch and the OAuth login too; with --dane, the TLSA records and the DANE match; with
    --policy, the domain's published TLS policy."""
    cfg = _load(_config_path(config_file))
    if show_policy:
        for line in asyncio.run(_policy_lines(cfg, target.strip().rstrip(".").lower())):
            click.echo(line)
        return
    try:
        host, given_port = split_target(target)
    except TargetError as exc:
        click.echo(f"smtpsvc probe: {exc}", err=True)
        raise SystemExit(2) from None
    mechanism = "xoauth2"
    if profile is not None:
        if profile not in cfg.oauth:
            known = ", ".join(sorted(cfg.oauth)) or "none"
            click.echo(
                f"smtpsvc probe: --auth {profile}: no [oauth.{profile}] profile (known: {known})", err=True
            )
            raise SystemExit(2)
        tables = [cfg.delivery.smart_host_auth, *(c.auth for c in cfg.connectors)]
        configured = next((a for a in tables if a.oauth == profile and a.bearer), None)
        if configured is not None:
            mechanism = configured.mechanism
        user = user or (configured.user if configured is not None else None)
        if not user:
            click.echo(
                f"smtpsvc probe: --auth {profile}: no auth table uses this profile; give --user MAILBOX",
                err=True,
            )
            raise SystemExit(2)

    async def run(port: int) -> ProbeReport:
        from smtpsvc.app import token_source  # the composition root builds the broker

        tokens = token_source(cfg) if profile is not None else None
        try:
            login = (
                None
                if tokens is None or profile is None
                else OAuthLogin(tokens, profile, user or "", mechanism)
            )
            tlsa, address = await _dane_probe(cfg, host, port) if dane else (None, None)
            return await probe_peer(
                host,
                port,
                hostname=cfg.server.hostname,
                starttls=starttls,
                helo=use_helo,
                xexch50_expected=exchange,
                login=login,
                dane=tlsa,
                address=address,
            )
        finally:
            if tokens is not None:
                await tokens.close()

    port = given_port or cfg.delivery.remote_port
    try:
        report = asyncio.run(run(port))
    except DnsError as exc:
        click.echo(f"smtpsvc probe: --dane: the TLSA lookup failed: {exc}", err=True)
        raise SystemExit(1) from None
    except (OSError, TimeoutError) as exc:
        click.echo(
            f"smtpsvc probe: cannot connect to {f'[{host}]' if ':' in host else host}:{port}: "
            f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc or 'timeout'}",
            err=True,
        )
        raise SystemExit(1) from None
    for line in report.lines:
        click.echo(line)
    for problem in report.problems:
        click.echo(f"problem:  {problem}")
    if not report.problems:
        click.echo("no problems found")


async def _dane_probe(cfg: Config, host: str, port: int) -> tuple[DaneProbe, str | None]:
    """The TLSA answer of `host` through the configured resolver, whether its address is signed, and the
    address to connect to (the resolver's, as delivery would; None: let the system resolve it)."""
    resolver = MxResolver(
        cfg.resolver.nameservers, timeout=15.0, negative_cache_max=cfg.resolver.negative_cache_max
    )
    answer = await resolver.resolve_tlsa(host, port)
    try:
        hops = await resolver.resolve_host(host, port)
    except DnsError:
        hops = []
    secure = bool(hops) and all(hop.secure for hop in hops)
    return DaneProbe(answer, secure), hops[0].address if hops else None


@main.group()
def dkim() -> None:
    """Make DKIM keys and check their published DNS records."""


@dkim.command("keygen")
@click.option("--domain", required=True, help="The From: domain the key signs for (d=).")
@click.option(
    "--selector", required=True, help="The selector (s=): the record is at SELECTOR._domainkey.DOMAIN."
)
@click.option(
    "--algorithm",
    type=click.Choice(["rsa-sha256", "ed25519-sha256"]),
    default="rsa-sha256",
    show_default=True,
    help="ed25519-sha256 only alongside an RSA key: not every receiver verifies Ed25519 yet.",
)
@click.option(
    "--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True, help="RSA key size."
)
@click.option(
    "--out", "out", metavar="FILE", help="Where to write the private key (default: DOMAIN.SELECTOR.pem)."
)
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def dkim_keygen(domain: str, selector: str, algorithm: str, bits: int, out: str | None, force: bool) -> None:
    """Write a new private key (mode 0600) and print the DNS TXT record to publish and the [[dkim]] table."""
    from smtpsvc.delivery import dkim as signing

    domain = domain.strip().lower().rstrip(".")
    path = Path(out or f"{domain}.{selector}.pem")
    pem = signing.generate(algorithm, bits)
    key = signing.load_key(signing.KeyRef(domain, selector, str(path), algorithm), pem, domain)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        click.echo(
            f"smtpsvc dkim keygen: {path} exists; give --force to replace it (and its DNS record)", err=True
        )
        raise SystemExit(1) from None
    except OSError as exc:
        click.echo(f"smtpsvc dkim keygen: cannot write {path}: {exc.strerror or exc}", err=True)
        raise SystemExit(1) from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # also when --force replaced a file that was readable by others
        handle.write(pem)
    strings = " ".join(f'"{part}"' for part in signing.txt_strings(signing.record_value(key)))
    click.echo(f"Private key written to {path} (mode 0600; keep it readable by the service only).")
    click.echo("")
    click.echo("Publish this DNS TXT record:")
    click.echo(f"{selector}._domainkey.{domain}. IN TXT {strings}")
    click.echo("")
    click.echo("Then add to smtpsvc.toml:")
    click.echo("[[dkim]]")
    click.echo(f'domain = "{domain}"')
    click.echo(f'selector = "{selector}"')
    click.echo(f'key_file = "{path.resolve()}"')
    click.echo(f'algorithm = "{algorithm}"')


@dkim.command("check")
@config_option
@click.option("--domain", required=True, help="The signing domain (d=).")
@click.option("--selector", required=True, help="The selector (s=).")
def dkim_check(config_file: str | None, domain: str, selector: str) -> None:
    """Look up SELECTOR._domainkey.DOMAIN (resolver.nameservers) and say whether the record carries the
    public key of the configured [[dkim]] key_file. Exit 0 when it does, 1 when not."""
    import dns.exception
    import dns.nameserver
    import dns.resolver

    from smtpsvc.delivery import dkim as signing

    cfg = _load(_config_path(config_file))
    domain = domain.strip().lower().rstrip(".")
    found = [k for k in cfg.dkim if k.selector == selector and k.domain in (domain, signing.DEFAULT_SIGNER)]
    found.sort(key=lambda k: k.domain == signing.DEFAULT_SIGNER)  # the domain's own table first
    if not found:
        configured = ", ".join(f"{k.domain}/{k.selector}" for k in cfg.dkim) or "none"
        click.echo(
            f"no [[dkim]] table with domain {domain} and selector {selector} (configured: {configured})"
        )
        raise SystemExit(1)
    ref = signing.KeyRef(found[0].domain, found[0].selector, found[0].key_file, found[0].algorithm)
    try:
        [key] = signing.KeyFiles().load([ref], domain)
    except signing.KeyUnusable as exc:
        click.echo(f"{exc}")
        raise SystemExit(1) from None
    name = f"{selector}._domainkey.{domain}"
    resolver = dns.resolver.Resolver(configure=not cfg.resolver.nameservers)
    if cfg.resolver.nameservers:
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ip, port) for ip, port in cfg.resolver.nameservers
        ]
    resolver.lifetime = 10.0
    try:
        answer = resolver.resolve(name, "TXT")
        published = [b"".join(r.strings).decode("ascii", "replace") for r in answer]
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        published = []
    except dns.exception.DNSException as exc:
        click.echo(f"{name}: the DNS lookup failed: {exc}")
        raise SystemExit(1) from None
    problem = signing.record_problem(published, key)
    if problem:
        click.echo(f"{name}: MISMATCH: {problem}")
        click.echo(
            f'publish: {name}. IN TXT "{signing.record_value(key)}" (run `smtpsvc dkim keygen` for a new key)'
        )
        raise SystemExit(1)
    click.echo(f"{name}: OK: the published record matches {ref.key_file} ({ref.algorithm})")


async def _policy_lines(cfg: Config, domain: str) -> list[str]:
    """`probe DOMAIN --policy`: what the domain publishes and what delivery would do with it. Reads the
    service's policy cache, never writes it."""
    resolver = new_resolver(cfg)
    sts = MtaSts(
        resolver,
        Path(cfg.server.root) / "queue" / "mta-sts.json",
        ca_file=cfg.delivery.mta_sts_ca_file,
        port=cfg.delivery.mta_sts_port,
    )
    lines = [f"domain:      {domain}"]
    hosts: list[str] = []
    dane: dict[str, str] = {}  # MX host -> what DANE would do with it
    try:
        hops = await resolver.resolve_mx(domain, cfg.delivery.remote_port)
        hosts = list(dict.fromkeys(hop.host for hop in hops))
        lines.append(f"MX hosts:    {', '.join(hosts)}")
        for host in hosts:
            signed = all(hop.secure for hop in hops if hop.host == host)
            dane[host] = await _dane_words(resolver, host, cfg.delivery.remote_port, signed)
            lines.append(f"DANE:        {host}: {dane[host]}")
    except DnsError as exc:
        lines.append(f"MX hosts:    none found ({exc.text} {exc})")
    policy: Policy | None = None
    try:
        records = await resolver.txt_records(f"_mta-sts.{domain}")
    except DnsError as exc:
        records = []
        if not exc.permanent:  # NXDOMAIN is an answer: nothing published
            lines.append(f"MTA-STS:     the _mta-sts.{domain} TXT lookup failed ({exc})")
    published = parse_sts_record(records)
    if published is None:
        lines.append(f"MTA-STS:     no valid _mta-sts.{domain} TXT record (v=STSv1; id=...)")
    else:
        lines.append(f"MTA-STS:     TXT id {published}")
        try:
            policy = parse_policy(domain, published, await sts.fetch(domain), time.time())
            mx = ", ".join(policy.mx) or "-"
            lines.append(f"policy:      mode {policy.mode}, max_age {policy.max_age}s, mx {mx}")
        except (PolicyError, FetchError) as exc:
            lines.append(f"policy:      cannot be used: {exc}")
    cached = sts.cached(domain)
    if cached is not None:
        expires = datetime.fromtimestamp(cached.expires_at, UTC).isoformat(timespec="seconds")
        lines.append(
            f"cached:      id {cached.id}, mode {cached.mode}, until {expires} (the service's cache)"
        )
        if policy is None and cached.fresh(time.time()):
            policy = cached  # RFC 8461 §5.1: the service goes on enforcing it
    try:
        rua = parse_tlsrpt_record(await resolver.txt_records(f"_smtp._tls.{domain}"))
    except DnsError:
        rua = []
    if rua:
        used = [u for u in rua if u.lower().startswith("mailto:")]
        lines.append(
            f"TLS-RPT:     reports to {', '.join(rua)}" + ("" if used else " (https: only: not sent)")
        )
    else:
        lines.append("TLS-RPT:     no _smtp._tls record: no reports wanted")
    lines.append(f"smtpsvc:     {_policy_verdict(cfg, policy, hosts)}")
    verified = [h for h, words in dane.items() if words.startswith("applies")]
    if verified and cfg.delivery.tls == "dane-or-mta-sts":
        lines.append(
            f"             DANE wins for {', '.join(verified)}: TLS required, certificate checked by TLSA"
        )
    return lines


async def _dane_words(resolver: MxResolver, host: str, port: int, signed: bool) -> str:
    """What DANE (RFC 7672) would do with one MX host, in words for `probe --policy`."""
    if not signed:
        return "not applied (the MX or address answers are not DNSSEC-authenticated)"
    try:
        answer = await resolver.resolve_tlsa(host, port)
    except DnsError as exc:
        return f"the TLSA lookup failed ({exc}): delivery skips this host"
    if not answer.records:
        return f"no TLSA records at {answer.name}: not applied"
    if not answer.secure:
        return f"{len(answer.records)} TLSA record(s) at {answer.name} without the AD bit: ignored"
    return f"applies: {len(answer.records)} signed TLSA record(s) at {answer.name}"


def _policy_verdict(cfg: Config, policy: Policy | None, hosts: list[str]) -> str:
    if cfg.delivery.tls != "dane-or-mta-sts":
        return f'delivery.tls = "{cfg.delivery.tls}": no published policy is applied'
    if policy is None or policy.mode == "none":
        return "no policy in force: opportunistic TLS"
    outside = [h for h in hosts if not mx_allowed(policy.mx, h)]
    if policy.mode == "testing":
        return "mode testing: delivers as usual, failures are logged (warning) and reported" + (
            f"; not in the policy: {', '.join(outside)}" if outside else ""
        )
    allowed = [h for h in hosts if h not in outside]
    return f"enforce: only {', '.join(allowed) or 'no MX host'} over TLS with a valid certificate" + (
        f"; refused: {', '.join(outside)}" if outside else ""
    )


# --------------------------------------------------------------------------------------------- tlsrpt


@main.group()
def tlsrpt() -> None:
    """SMTP TLS reporting (RFC 8460): today's session counts per policy domain."""


@tlsrpt.command("show")
@config_option
def tlsrpt_show(config_file: str | None) -> None:
    """Today's counts (UTC day) per MTA-STS policy domain: sessions that met the policy and those that
    did not, by the RFC's result type (saved by the running service every minute)."""
    cfg = _load(_config_path(config_file))
    counts = TlsCounts(Path(cfg.server.root) / "queue" / "tlsrpt.json")
    if not counts.domains:
        click.echo(f"{counts.day}: no sessions to a domain with an MTA-STS policy")
        return
    for domain, entry in sorted(counts.domains.items()):
        failures: dict[str, int] = entry.get("failures", {})
        click.echo(
            f"{counts.day} {domain}: {entry.get('success', 0)} successful, {sum(failures.values())} failed"
        )
        for key, count in sorted(failures.items()):
            result_type, mx_host, ip = key.split("|", 2)
            click.echo(f"  {count:6d}  {result_type}  {mx_host}[{ip}]")


# --------------------------------------------------------------------------------------------- import


@main.group("import")
def import_group() -> None:
    """Import the settings of the mail server smtpsvc replaces."""


@import_group.command("iis")
@click.argument("file", metavar="FILE")
@click.option(
    "--server", "server_number", metavar="N", help="The SMTP virtual server (default: the only one)."
)
@click.option("-o", "--output", metavar="FILE", help="Write smtpsvc.toml here (default: standard output).")
@click.option("--force", is_flag=True, help="Overwrite the -o file (and password files) if they exist.")
def import_iis(file: str, server_number: str | None, output: str | None, force: bool) -> None:
    """Write a commented smtpsvc.toml from an IIS 6 MetaBase.xml, or from the JSON export of IIS 7+'s
    IIsSmtpServerSetting (and IIsSmtpDomainSetting) objects; report what cannot be carried over.
    Passwords are never imported: they are asked for (at a terminal, with -o) into files of their own."""
    target = Path(output).absolute() if output else None
    if target is not None and target.exists() and not force:
        _usage_error(f"{output} exists; give --force to overwrite it")
    try:
        data = Path(file).read_bytes()
    except OSError as exc:
        _usage_error(f"cannot read {file}: {exc.strerror or exc}")

    def password_file(label: str) -> str:
        if target is None:
            return f"smtpsvc-{label}.password"  # relative: the service's working directory
        return str(target.parent / f"{target.stem}-{label}.password")

    try:
        conversion = convert(choose_server(read_export(data), server_number), password_file)
    except ImportFailed as exc:
        _usage_error(f"{file}: {exc}")
    if target is not None and sys.stdin.isatty():
        conversion.credentials = [_ask_password(c, force) for c in conversion.credentials]
    text = render(conversion, Path(file).name)
    if target is None:
        click.echo(text, nl=False)
    else:
        try:
            target.write_text(text, encoding="utf-8")
        except OSError as exc:
            _usage_error(f"cannot write {output}: {exc.strerror or exc}")
        click.echo(f"wrote {output}", err=True)
    for line in report_lines(conversion):
        click.echo(line, err=True)


def _usage_error(message: str) -> NoReturn:
    click.echo(f"smtpsvc import iis: {message}", err=True)
    raise SystemExit(2)


def _ask_password(credential: Credential, force: bool) -> Credential:
    """Ask for an AUTH user's password and write it to its own file (mode 0600); an existing file is kept
    unless --force. Returns the credential marked written, or as it was."""
    path = Path(credential.password_file)
    if path.exists() and not force:
        click.echo(f"{path} exists: kept (--force to replace it)", err=True)
        return dataclasses.replace(credential, written=True)
    password = getpass.getpass(f"Password of {credential.user} for {credential.key} (empty: later): ")
    if not password:
        return credential
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)  # O_CREAT's mode does not apply to a file that already existed
            handle.write(password + "\n")
    except OSError as exc:
        click.echo(f"cannot write {path}: {exc.strerror or exc}", err=True)
        return credential
    return dataclasses.replace(credential, written=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
