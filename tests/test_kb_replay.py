"""KB306043's three supported ways to replay mail, end to end with real services on 127.0.0.1.

- Drop → Pickup on one service, with an envelope that differs from the headers, is
  tests/test_relay.py::test_drop_file_copied_into_pickup_is_replayed_to_the_same_recipients; here: a Drop
  file of one server replayed through another server's Pickup, null sender included (an NDR in Drop).
- Queue → Queue: undeliverable mail moved, with the service stopped, into another server's queue.
- Badmail → Pickup: an NDR that could not be delivered, and an invalid Pickup file, replayed with
  `smtpsvc badmail replay` once the cause is fixed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smtpsvc.app import Service
from smtpsvc.queue.local import LocalSpool
from tests.conftest import StartService, events_of, wait_until
from tests.sink import Received, Sink, SinkHandler
from tests.test_queue_cli import run
from tests.test_relay import drop_files, queue_is_empty, send


@dataclass
class Mailboxes(SinkHandler):
    """The sink, with chosen replies for some recipients; a test edits `refused` to fix the destination."""

    refused: dict[str, str] = field(default_factory=dict)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.refused.get(address.lower())
        if reply is None:
            return await super().handle_RCPT(server, session, envelope, address, rcpt_options)
        self.rcpt_attempts.append(address)
        return reply


def mailboxes(sink: Sink, refused: dict[str, str] | None = None) -> Mailboxes:
    """Give `sink` a Mailboxes handler (before any connection: each new session takes `sink.handler`)."""
    handler = Mailboxes(refused=dict(refused or {}))
    sink.handler = handler
    return handler


def place(source: Path, folder: Path, name: str) -> Path:
    """Copy a file into a watched folder the supported way: a dot name first, then a rename."""
    tmp = folder / f".{name}.tmp"
    shutil.copyfile(source, tmp)
    return tmp.rename(folder / name)


def delivered_to(sink: Sink, *recipients: str) -> list[Received]:
    return [m for m in sink.messages if sorted(m.rcpt_tos) == sorted(recipients)]


def badmail_items(service: Service) -> list[str]:
    return sorted(p.stem for p in service.folders["badmail"].glob("*.bad"))


# ---------------------------------------------------------------------------------------- Drop → Pickup

ENVELOPE_ONLY = (
    b"From: Mail Delivery System <postmaster@local.test>\r\nTo: someone-else@local.test\r\n"
    b"Subject: Delivery Status Notification (Failure)\r\n\r\nreturned\r\n"
)


async def test_drop_file_of_one_server_is_replayed_by_another_with_the_same_null_sender_envelope(
    start_service: StartService, sink: Sink, tmp_path: Path
) -> None:
    first = await start_service(server={"root": str(tmp_path / "a")})
    await send(first, "", ["bob@local.test", "carol@local.test"], ENVELOPE_ONLY)  # MAIL FROM:<>, an NDR
    [dropped] = await wait_until(lambda: drop_files(first), what="the Drop file")
    assert dropped.read_bytes().startswith(b"X-Sender: <>\r\nX-Receiver: <bob@local.test>\r\n")
    # The second server has no local.test: the replayed copy goes on by SMTP to the sink.
    second = await start_service(
        server={"root": str(tmp_path / "b")},
        domains={"local": ["b.test"]},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
    )
    place(dropped, second.folders["pickup"], "replay.eml")
    [got] = await wait_until(
        lambda: delivered_to(sink, "bob@local.test", "carol@local.test"), what="the replayed message"
    )
    assert got.mail_from == "<>"  # (aiosmtpd's null sender) not the From header: no NDR loop
    assert got.content.endswith(dropped.read_bytes().split(b"\r\n", 3)[3])  # the whole dropped message
    assert b"X-Sender" not in got.content and b"X-Receiver" not in got.content
    await wait_until(lambda: queue_is_empty(second), what="the second queue to empty")


# ---------------------------------------------------------------------------------------- Queue → Queue


@pytest.mark.parametrize("peer", ["down", "refuses-4xx"])
async def test_queue_files_moved_to_a_stopped_server_are_delivered_by_it_with_the_same_envelope(
    start_service: StartService, sink: Sink, tmp_path: Path, peer: str
) -> None:
    busy = Sink().start()  # A's next hop when it answers: 4xx to every recipient
    busy.handler = Mailboxes(
        refused={r: "451 4.3.0 Try again later" for r in ("x@remote.test", "y@other.test")}
    )
    try:
        route = "[127.0.0.1]:9" if peer == "down" else f"[127.0.0.1]:{busy.port}"
        a = await start_service(
            server={"root": str(tmp_path / "a")},
            delivery={"smart_host": route, "retry": ["1h"]},
        )
        await send(a, "alice@local.test", ["x@remote.test", "y@other.test"])
        [queued] = await wait_until(
            lambda: [e for e in a.queue.list() if all(r.attempts for r in e.recipients)],
            what="A's failed first attempt",
        )
        await a.stop()
    finally:
        busy.stop()
    queue_id = queued.id
    original = (a.folders["queue"] / f"{queue_id}.eml").read_bytes()
    # B: another server, stopped, whose route to the destination works.
    b_root = tmp_path / "b"
    b_sections: dict[str, dict[str, Any]] = {
        "server": {"root": str(b_root)},
        "delivery": {"smart_host": f"[127.0.0.1]:{sink.port}"},
    }
    b = await start_service(**b_sections)
    await b.stop()
    moved = sorted(a.folders["queue"].glob(f"{queue_id}.*"))  # .eml, .env (and .x50 when there is one)
    assert {p.suffix for p in moved} >= {".eml", ".env"}
    for path in moved:
        shutil.copy2(path, b.folders["queue"] / path.name)
    # A's retry time (an hour away) travels with the .env, but B adopts the files at start: due at once.
    b_again = await start_service(**b_sections)
    assert isinstance(b_again.queue, LocalSpool)
    await asyncio.wait_for(b_again.queue.recovered(), 30)  # B indexes its queue in the background
    assert b_again.queue.adopted == [queue_id]
    await wait_until(
        lambda: any(e.get("cause") == "queue-adopted" for e in events_of(b_again, 9005)), what="event 9005"
    )
    [got] = await wait_until(
        lambda: delivered_to(sink, "x@remote.test", "y@other.test"), what="delivery by B"
    )
    assert got.mail_from == "alice@local.test"
    assert got.content == original  # the body as A received it, with A's Received header, nothing added
    assert any(e.get("queue_id") == queue_id for e in events_of(b_again, 3002))  # same id on B
    await wait_until(lambda: queue_is_empty(b_again), what="B's queue to empty")


# ---------------------------------------------------------------------------------------- Badmail → Pickup


async def test_undeliverable_ndr_goes_to_badmail_and_is_replayed_to_the_sender_once_fixed(
    start_service: StartService, sink: Sink
) -> None:
    handler = mailboxes(sink, {"alice@remote.test": "550 5.1.1 <alice@remote.test>: mailbox unavailable"})
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    await send(service, "alice@remote.test", ["reject-me@remote.test"])  # refused: NDR to alice, refused too
    [name] = await wait_until(lambda: badmail_items(service), what="the undeliverable NDR in Badmail")
    badmail = service.folders["badmail"]
    assert "delivery status notification that cannot be delivered" in (badmail / f"{name}.bdr").read_text()
    envelope = json.loads((badmail / f"{name}.bdp").read_text())
    assert envelope["sender"] == ""  # the NDR's envelope, which the replay puts back as X-lines
    assert [r["address"] for r in envelope["recipients"]] == ["alice@remote.test"]
    assert any(e.get("queue_id") == name for e in events_of(service, 3005))
    assert not delivered_to(sink, "alice@remote.test")

    del handler.refused["alice@remote.test"]  # the sender's mailbox works again
    code, out, err = await run("badmail", "replay", "-c", str(service.config_path), name)
    assert code == 0, err
    assert f"replay-{name}.eml" in out
    [got] = await wait_until(lambda: delivered_to(sink, "alice@remote.test"), what="the replayed NDR")
    assert got.mail_from == "<>"  # an NDR stays a null-sender message
    assert b"multipart/report" in got.content
    assert b"Final-Recipient: rfc822; reject-me@remote.test" in got.content
    assert badmail_items(service) == []
    await wait_until(lambda: queue_is_empty(service), what="the queue to empty")
    assert badmail_items(service) == []  # delivered, not back in Badmail


async def test_invalid_pickup_file_in_badmail_is_replayed_after_it_is_repaired(
    start_service: StartService, sink: Sink
) -> None:
    service = await start_service(delivery={"smart_host": f"[127.0.0.1]:{sink.port}"})
    job = b"To: ops@remote.test\r\nSubject: nightly report\r\n\r\nall good\r\n"  # no From header
    (service.folders["pickup"] / ".job.tmp").write_bytes(job)
    (service.folders["pickup"] / ".job.tmp").rename(service.folders["pickup"] / "job.eml")
    await wait_until(lambda: badmail_items(service) == ["pickup-job"], what="the invalid file in Badmail")
    bad = service.folders["badmail"] / "pickup-job.bad"
    assert bad.read_bytes() == job  # the file as it was
    assert "no From header" in bad.with_suffix(".bdr").read_text()

    bad.write_bytes(b"From: app@local.test\r\n" + job)  # the repair
    code, _, err = await run("badmail", "replay", "-c", str(service.config_path), "pickup-job")
    assert code == 0, err
    [got] = await wait_until(lambda: delivered_to(sink, "ops@remote.test"), what="the repaired file sent")
    assert got.mail_from == "app@local.test"
    assert got.content.endswith(b"Subject: nightly report\r\n\r\nall good\r\n")
    assert badmail_items(service) == []
