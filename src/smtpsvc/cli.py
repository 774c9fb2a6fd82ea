"""The `smtpsvc` command line: `serve` and `config check|show|example` (more verbs arrive with the admin API).

Thin by design: it finds and loads the configuration, then hands over to the service or prints. Exit codes:
0 ok, 1 the operation failed (the message says why), 2 usage or configuration error.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from smtpsvc import __version__
from smtpsvc.config import (
    Config,
    ConfigError,
    default_config_path,
    load_config,
    render_effective,
    render_example,
)


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
