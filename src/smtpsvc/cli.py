"""The `smtpsvc` command line: `serve` and `config check|show|example` (more verbs arrive with the admin API).

Thin by design: it finds and loads the configuration, then hands over to the service or prints. Exit codes:
0 ok, 1 the operation failed (the message says why), 2 usage or configuration error.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path

import click

from smtpsvc import __version__
from smtpsvc.auth.users import UsersFileError, UserStore, check_name, check_password, users_path
from smtpsvc.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
    render_effective,
    render_example,
)
from smtpsvc.protocol import AddressError, parse_path
from smtpsvc.routing.categorizer import check_recipient, explain, postmaster_address


def _config_path(option: str | None) -> str | None:
    if option:
        return option
    found = default_config_path(os.environ, Path.cwd())
    return str(found) if found else None


def _load(path: str | None, root: str | None = None, listen: tuple[str, ...] = ()) -> Config:
    try:
        return load_config(path, os.environ, root_override=root, listen_override=list(listen) or None)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        raise SystemExit(2) from None


config_option = click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Configuration file (default: $SMTPSVC_CONFIG, else ./smtpsvc.toml if present, "
    "else built-in defaults).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smtpsvc")
def main() -> None:
    """smtpsvc: a durable SMTP relay with Pickup, Queue, Drop and Badmail folders."""


@main.command()
@config_option
@click.option("--root", metavar="DIR", help="Mailroot folder (overrides server.root).")
@click.option(
    "--listen", metavar="HOST:PORT", multiple=True, help="Listen address (overrides server.listen)."
)
def serve(config_file: str | None, root: str | None, listen: tuple[str, ...]) -> None:
    """Run the service in the foreground until SIGTERM or Ctrl-C."""
    from smtpsvc.app import run_service  # imported here so `config` commands stay light

    path = _config_path(config_file)
    config = _load(path, root, listen)
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
    if decision.allowed:
        click.echo("decision: accepted")
    else:
        click.echo(f'decision: refused with "550 5.7.1 Unable to relay for <{address}>"')
    click.echo(f"rule: {decision.rule}: {explain(decision.rule)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
