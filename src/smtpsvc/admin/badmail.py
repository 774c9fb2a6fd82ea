"""Badmail administration: list, show and replay items (KB306043 "Badmail folder to Pickup folder").

Replay writes the .bad back into Pickup, prefixed with the X-Sender/X-Receiver lines of its .bdp envelope
when there is one (so an undeliverable NDR goes back to the original sender), else as a plain Pickup file
whose headers give the envelope. The file appears under a temporary name and is renamed into place, so the
Pickup scanner never sees half of it; this works whether the service runs or not. A replayed item is
removed from Badmail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from smtpsvc.admin.service import BadRequest, NotFound
from smtpsvc.delivery.drop import envelope_lines
from smtpsvc.safeio import publish, synced_file


@dataclass(frozen=True, slots=True)
class BadmailItem:
    name: str
    size: int
    mtime: float
    reasons: list[str]

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else ""


def items(badmail_dir: Path) -> list[BadmailItem]:
    """Complete items (those with a .bad), oldest first."""
    out: list[BadmailItem] = []
    if not badmail_dir.is_dir():
        return out
    for bad in badmail_dir.glob("*.bad"):
        stat = bad.stat()
        out.append(BadmailItem(bad.stem, stat.st_size, stat.st_mtime, _reasons(bad.with_suffix(".bdr"))))
    return sorted(out, key=lambda i: i.mtime)


def show(badmail_dir: Path, name: str) -> tuple[BadmailItem, dict[str, object] | None, bytes]:
    bad = _bad(badmail_dir, name)
    stat = bad.stat()
    item = BadmailItem(name, stat.st_size, stat.st_mtime, _reasons(bad.with_suffix(".bdr")))
    return item, _envelope(bad.with_suffix(".bdp")), bad.read_bytes()


def replay(badmail_dir: Path, pickup_dir: Path, name: str) -> Path:
    """Resubmit one item through Pickup; returns the Pickup file written."""
    bad = _bad(badmail_dir, name)
    envelope = _envelope(bad.with_suffix(".bdp"))
    prefix = b""
    listed = envelope.get("recipients") if envelope else None
    if envelope is not None and isinstance(listed, list):
        recipients = [str(r["address"]) for r in listed if isinstance(r, dict) and "address" in r]
        if recipients:
            prefix = envelope_lines(str(envelope.get("sender", "")), recipients)
    pickup_dir.mkdir(parents=True, exist_ok=True)
    target = pickup_dir / f"replay-{name}.eml"
    tmp = pickup_dir / f".replay-{name}.tmp"  # names starting with "." are ignored by the scanner
    with open(bad, "rb") as src, synced_file(tmp) as out:
        out.write(prefix)
        while chunk := src.read(1024 * 1024):
            out.write(chunk)
    publish(tmp, target)  # durable before the Badmail item goes
    for suffix in (".bad", ".bdr", ".bdp"):
        bad.with_suffix(suffix).unlink(missing_ok=True)
    return target


def _bad(badmail_dir: Path, name: str) -> Path:
    if "/" in name or "\\" in name or name.startswith("."):
        raise BadRequest(f"{name!r} is not a Badmail item name (see `smtpsvc badmail list`)")
    bad = badmail_dir / f"{name.removesuffix('.bad')}.bad"
    if not bad.is_file():
        raise NotFound(f"no Badmail item {name!r} in {badmail_dir} (see `smtpsvc badmail list`)")
    return bad


def _reasons(bdr: Path) -> list[str]:
    try:
        return [
            line for line in bdr.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
    except FileNotFoundError:
        return []


def _envelope(bdp: Path) -> dict[str, object] | None:
    try:
        data = json.loads(bdp.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None
