"""Badmail administration: list, show and replay items (KB306043 "Badmail folder to Pickup folder").

Replay writes the .bad back into Pickup, prefixed with the X-Sender/X-Receiver lines of its .bdp envelope
when there is one (so an undeliverable NDR goes back to the original sender), else as a plain Pickup file
whose headers give the envelope. The file appears under a temporary name and is renamed into place, so the
Pickup scanner never sees half of it; this works whether the service runs or not. A replayed item is
removed from Badmail.

Each item has a kind, read from its .bad: a delivery status notification (multipart/report;
report-type=delivery-status) is a "failure", "delay" or "relayed" (success) report by the Action fields of
its delivery-status part; anything else (a Pickup file that could not be parsed, ...) is "other". KB306043
advises replaying failure reports only: `replay --all` replays those unless told otherwise.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from smtpsvc.admin.service import BadRequest, NotFound
from smtpsvc.delivery.drop import envelope_lines
from smtpsvc.folders.badmail import printable
from smtpsvc.safeio import publish, synced_file

MAX_BDR_BYTES = 64 * 1024  # the reasons read of a .bdr (ours are a few lines)
MAX_BDP_BYTES = 1024 * 1024  # a larger .bdp is damage: our envelopes are a few kB
MAX_SHOWN_BYTES = 1024 * 1024  # of the message, for `show` (its headers are what is shown)
MAX_KIND_BYTES = 256 * 1024  # of the .bad read for its kind: a report's status part is near its start

KINDS = ("failure", "delay", "relayed", "other")
# RFC 3464 2.3.3 actions, by the kind an administrator replays (delivered/expanded are successes too).
_ACTION_KIND = {
    "failed": "failure",
    "delayed": "delay",
    "delivered": "relayed",
    "relayed": "relayed",
    "expanded": "relayed",
}
_FOLD_RE = re.compile(rb"\r?\n[ \t]")
_REPORT_TYPE_RE = re.compile(rb";\s*report-type\s*=\s*\"?delivery-status\b", re.I)
_STATUS_PART_RE = re.compile(rb"^content-type:\s*message/(?:global-)?delivery-status\b", re.I | re.M)
_ACTION_RE = re.compile(rb"^action:\s*([a-z]+)", re.I | re.M)


@dataclass(frozen=True, slots=True)
class BadmailItem:
    name: str  # shown escaped when the file name is not UTF-8 (then the item is damaged)
    size: int
    mtime: float
    reasons: list[str]
    damaged: str = ""  # why the item cannot be replayed as it is; "" when it can
    kind: str = "other"  # one of KINDS: what the report in the .bad says

    @property
    def reason(self) -> str:
        if self.damaged:
            return f"damaged: {self.damaged}"
        return self.reasons[0] if self.reasons else ""


def items(badmail_dir: Path) -> list[BadmailItem]:
    """Complete items (those with a .bad), oldest first; a damaged one is listed with why, never raises."""
    out: list[BadmailItem] = []
    try:
        entries = list(os.scandir(badmail_dir))
    except OSError:  # no folder yet (or unreadable: then nothing can be listed from it)
        return out
    for entry in entries:
        if entry.name.endswith(".bad") and not entry.name.startswith("."):
            out.append(_item(badmail_dir, entry.name[:-4]))
    return sorted(out, key=lambda i: i.mtime)


def _item(badmail_dir: Path, name: str) -> BadmailItem:
    bad = badmail_dir / f"{name}.bad"
    try:
        stat = bad.stat()
    except OSError as exc:
        return BadmailItem(
            printable(name), 0, 0.0, [], f"the .bad file cannot be read: {exc.strerror or exc}"
        )
    reasons, problem = _reasons(bad.with_suffix(".bdr"))
    if printable(name) != name or not name.isprintable():
        problem = (
            "its file name is not UTF-8 text (or holds control characters); rename its files to replay it"
        )
    elif not bad.is_file():
        problem = "the .bad is not a file"
    if not problem:
        problem = _envelope(bad.with_suffix(".bdp"))[1]
    return BadmailItem(printable(name), stat.st_size, stat.st_mtime, reasons, problem, _kind(bad))


def _kind(bad: Path) -> str:
    """The item's kind (see KINDS); "other" when its .bad cannot be read."""
    try:
        with open(bad, "rb") as fh:
            head = fh.read(MAX_KIND_BYTES)
    except OSError:
        return "other"
    return report_kind(head)


def report_kind(message: bytes) -> str:
    """ "failure", "delay" or "relayed" for a delivery status notification by the Actions of its
    delivery-status part (a report naming several is a failure if any recipient failed, else a delay if
    any is delayed); "other" for any other message."""
    end = message.find(b"\r\n\r\n")
    if end < 0:
        end = message.find(b"\n\n")
    headers = message if end < 0 else message[:end]
    # The Content-Type field unfolded (a line each, so the search is linear in the header size).
    fields = _FOLD_RE.sub(b" ", headers).splitlines()
    content_type = next((f for f in fields if f[:13].lower() == b"content-type:"), b"")
    media = content_type[13:].strip().lower()
    if not media.startswith(b"multipart/report") or not _REPORT_TYPE_RE.search(media):
        return "other"
    part = _STATUS_PART_RE.search(message, len(headers))
    if part is None:
        return "other"
    # The status part ends at the next MIME boundary line; the original message after it is not read.
    stop = message.find(b"\n--", part.end())
    status = message[part.end() : stop if stop >= 0 else len(message)]
    found = {_ACTION_KIND.get(a.decode("ascii").lower(), "other") for a in _ACTION_RE.findall(status)}
    for kind in ("failure", "delay", "relayed"):
        if kind in found:
            return kind
    return "other"


def show(badmail_dir: Path, name: str) -> tuple[BadmailItem, dict[str, object] | None, bytes]:
    """The item, its envelope (None when absent or damaged: `item.damaged` says why) and the start of its
    message (MAX_SHOWN_BYTES: what is shown is its headers)."""
    bad = _bad(badmail_dir, name)
    item = _item(badmail_dir, bad.stem)
    try:
        with open(bad, "rb") as fh:
            content = fh.read(MAX_SHOWN_BYTES)
    except OSError as exc:
        raise BadRequest(f"Badmail item {item.name!r} cannot be read: {exc.strerror or exc}") from None
    return item, _envelope(bad.with_suffix(".bdp"))[0], content


def replay(badmail_dir: Path, pickup_dir: Path, name: str) -> Path:
    """Resubmit one item through Pickup; returns the Pickup file written. A damaged item is refused with why
    (BadRequest): replayed without its envelope it could go to the wrong recipients."""
    bad = _bad(badmail_dir, name)
    item = _item(badmail_dir, bad.stem)
    if item.damaged:
        raise BadRequest(f"Badmail item {item.name!r} is damaged and is not replayed: {item.damaged}")
    envelope, _ = _envelope(bad.with_suffix(".bdp"))
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
    if "/" in name or "\\" in name or name.startswith(".") or not name.isprintable():
        raise BadRequest(f"{printable(name)!r} is not a Badmail item name (see `smtpsvc badmail list`)")
    bad = badmail_dir / f"{name.removesuffix('.bad')}.bad"
    if not bad.exists():
        raise NotFound(f"no Badmail item {name!r} in {badmail_dir} (see `smtpsvc badmail list`)")
    return bad


def _reasons(bdr: Path) -> tuple[list[str], str]:
    """The reason lines of a .bdr (its first MAX_BDR_BYTES), and a problem reading it ("" when none)."""
    try:
        with open(bdr, "rb") as fh:
            text = fh.read(MAX_BDR_BYTES).decode("utf-8", "replace")
    except FileNotFoundError:
        return [], ""
    except OSError as exc:
        return [], f"the .bdr cannot be read: {exc.strerror or exc}"
    return [printable(line) for line in text.splitlines() if line.strip()], ""


def _envelope(bdp: Path) -> tuple[dict[str, object] | None, str]:
    """The envelope of a .bdp, and what is wrong with it ("" when it is fine or absent: an item without one
    replays from its message's headers)."""
    try:
        with open(bdp, "rb") as fh:
            payload = fh.read(MAX_BDP_BYTES + 1)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, f"the .bdp cannot be read: {exc.strerror or exc}"
    if len(payload) > MAX_BDP_BYTES:
        return None, f"the .bdp is larger than {MAX_BDP_BYTES:,} bytes, more than any envelope"
    try:
        data = json.loads(payload)
    except ValueError as exc:
        return None, f"the .bdp is not JSON: {exc}"
    except RecursionError:
        return None, "the .bdp is JSON nested too deep to be an envelope"
    if not isinstance(data, dict):
        return None, f"the .bdp holds a JSON {type(data).__name__}, not an object"
    sender, recipients = data.get("sender", ""), data.get("recipients", [])
    if not isinstance(sender, str):
        return None, "the .bdp's sender is not text"
    if not isinstance(recipients, list) or not all(
        isinstance(r, dict) and isinstance(r.get("address"), str) for r in recipients
    ):
        return None, "the .bdp's recipients are not a list of objects with an address"
    return data, ""
