"""`smtpsvc sendmail`: sendmail-compatible submission into the Pickup folder (works whether or not the
service runs, like Postfix's postdrop into maildrop). The file is written under a dot name, fsynced and
renamed, so the Pickup scanner never takes half of it, and the folder is fsynced, so once the command
returns the file survives a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from smtpsvc.delivery.drop import envelope_lines
from smtpsvc.model import new_queue_id
from smtpsvc.protocol import xtext_encode
from smtpsvc.safeio import publish, synced_file


def write_pickup_file(
    pickup_dir: Path, message: BinaryIO | Iterable[bytes], queue_id: str | None = None
) -> Path:
    """Write `message` (a file, or its pieces in order, envelope lines first) as
    `pickup/sendmail-<id>.eml`. Returns the file written."""
    pickup_dir.mkdir(parents=True, exist_ok=True)
    name = f"sendmail-{queue_id or new_queue_id()}.eml"
    tmp = pickup_dir / f".{name}.tmp"
    final = pickup_dir / name
    pieces = iter(lambda: message.read(1024 * 1024), b"") if hasattr(message, "read") else message
    with synced_file(tmp) as out:
        for piece in pieces:
            out.write(piece)
    publish(tmp, final)
    return final


def dsn_envelope_lines(
    sender: str,
    recipients: Sequence[tuple[str, Sequence[str], str]],
    ret: str = "",
    envid: str = "",
) -> bytes:
    """X-Sender and X-Receiver lines with the DSN parameters in the ESMTP form Exchange's Replay folder uses
    (`X-Sender: <a@b> RET=HDRS ENVID=x`, `X-Receiver: <c@d> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d`).
    Without any DSN parameter they are the plain lines IIS writes. `recipients`: (address, notify, orcpt)."""
    if not ret and not envid and not any(n or o for _, n, o in recipients):
        return envelope_lines(sender, [address for address, _, _ in recipients])
    params = (f" RET={ret}" if ret else "") + (f" ENVID={xtext_encode(envid)}" if envid else "")
    lines = [f"X-Sender: <{sender}>{params}\r\n"]
    for address, notify, orcpt in recipients:
        extra = (f" NOTIFY={','.join(notify)}" if notify else "") + (
            f" ORCPT={xtext_encode(orcpt)}" if orcpt else ""
        )
        lines.append(f"X-Receiver: <{address}>{extra}\r\n")
    return "".join(lines).encode("utf-8")
