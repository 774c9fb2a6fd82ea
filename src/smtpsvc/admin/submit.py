"""`smtpsvc sendmail`: sendmail-compatible submission into the Pickup folder (works whether or not the
service runs, like Postfix's postdrop into maildrop). The file is written under a dot name, fsynced and
renamed, so the Pickup scanner never takes half of it, and the folder is fsynced, so once the command
returns the file survives a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from smtpsvc.delivery.drop import envelope_lines
from smtpsvc.model import new_queue_id
from smtpsvc.safeio import publish, synced_file


def write_pickup_file(
    pickup_dir: Path, message: BinaryIO, sender: str | None, recipients: Sequence[str]
) -> Path:
    """Envelope lines when recipients (or a sender) are given; else Pickup derives them from the headers
    (sendmail -t). Returns the file written."""
    pickup_dir.mkdir(parents=True, exist_ok=True)
    name = f"sendmail-{new_queue_id()}.eml"
    tmp = pickup_dir / f".{name}.tmp"
    final = pickup_dir / name
    with synced_file(tmp) as out:
        if recipients:
            out.write(envelope_lines(sender or "", recipients))
        elif sender is not None:
            out.write(f"X-Sender: <{sender}>\r\n".encode())
        while chunk := message.read(1024 * 1024):
            out.write(chunk)
    publish(tmp, final)
    return final
