"""The configuration as a command finds and loads it: `-c FILE`, else $SMTPSVC_CONFIG, else ./smtpsvc.toml
when present, else the built-in defaults; a configuration that cannot be used is printed and exits 2.

One reading for the command line (`cli.py`) and an SMTP worker's own entry (`workers.worker_main`), which
must not import `cli`: click and the admin and delivery stacks it loads would cost every worker's start
about 0.3 s of CPU (docs/architecture.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from smtpsvc.config import Config, ConfigError, default_config_path, load_config


def config_path(option: str | None) -> str | None:
    """The configuration file a command uses: its `-c FILE`, else the default's (None: built-in defaults)."""
    if option:
        return option
    found = default_config_path(os.environ, Path.cwd())
    return str(found) if found else None


def load(path: str | None, root: str | None = None, listen: tuple[str, ...] = ()) -> Config:
    """The configuration of `path` with the command line's `--root` and `--listen`; on a problem its
    message (every problem found) goes to stderr and the command exits 2 (a usage or configuration error)."""
    try:
        return load_config(path, os.environ, root_override=root, listen_override=list(listen) or None)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr, flush=True)
        raise SystemExit(2) from None
