"""Write a Conversion as a commented smtpsvc.toml: each key under a comment naming the IIS property it came
from, the connectors, then the report (what was not carried over, and why) as comments at the end."""

from __future__ import annotations

import json
from collections.abc import Iterable

from smtpsvc.migrate.iis import Conversion, Setting, TomlValue

# The order of docs/configuration.md, so the file reads like `smtpsvc config example`.
_SECTIONS = ("server", "extensions", "domains", "relay", "connection", "auth", "tls", "delivery")


def render(conv: Conversion, source_name: str) -> str:
    lines = [
        f"# smtpsvc.toml written by `smtpsvc import iis` from {source_name}, virtual server {conv.where}.",
        "# Each key names the IIS property it came from; what was not carried over is listed at the end.",
        "# Check it with `smtpsvc config check`; every key and its default: docs/configuration.md.",
    ]
    for section in _SECTIONS:
        settings = [s for s in conv.settings if s.section == section]
        if settings:
            lines += ["", f"[{section}]", *_keys(settings)]
    for connector in conv.connectors:
        lines += ["", f"# IIS remote domain {connector.domain} ({connector.source})", "[[connector]]"]
        lines += _keys(connector.settings)
    lines += ["", *(f"# {line}" for line in report_lines(conv))]
    return "\n".join(lines) + "\n"


def report_lines(conv: Conversion) -> list[str]:
    """The report, one line per item: stderr prints it, the TOML ends with it as comments."""
    out = [f"Import report for {conv.where}:"]
    for c in conv.credentials:
        if c.written:
            out.append(f"  {c.key}: user {c.user}: password written to {c.password_file} (mode 0600)")
        else:
            out.append(
                f"  {c.key}: user {c.user} still needs its password in {c.password_file} (one line, mode "
                "0600): write it there before `smtpsvc serve`; the metabase's password is never imported"
            )
    if conv.shortfalls:
        out.append("Not carried over:")
        out += [f"  {s.prop}: {s.why}" for s in conv.shortfalls]
    else:
        out.append("Everything read was carried over.")
    return out


def _keys(settings: Iterable[Setting]) -> list[str]:
    lines = []
    for s in settings:
        lines.append(f"# IIS: {s.source}")
        lines.append(f"{s.key} = {toml_value(s.value)}")
    return lines


def toml_value(value: TomlValue) -> str:
    """A TOML literal for the values the mapping makes: strings, integers, booleans, arrays, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are valid in TOML basic strings
    if isinstance(value, dict):
        inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items())
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")
