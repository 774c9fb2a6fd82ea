"""Queue files the service did not just write, read defensively (queue/local.py): an envelope (.env) or a
commit's .pending that is JSON of the wrong shape, nested too deep or huge, a message file without its
envelope, a message file that cannot be opened. Each is moved to queue/corrupt/ once with event 9001 and the
reason; the start, the `queue` commands and the delivery of every other message go on."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from smtpsvc.cli import main
from smtpsvc.model import Envelope, Recipient
from smtpsvc.queue.local import MAX_ENVELOPE_BYTES, LocalSpool
from tests.conftest import StartService, base_sections, events_of, wait_until, write_config
from tests.process import ServiceProcess
from tests.test_queue_local import crashed_in_commit

Edit = Callable[[dict[str, Any]], Any]


def field(name: str, value: Any, recipient: bool = False) -> Edit:
    def edit(data: dict[str, Any]) -> dict[str, Any]:
        (data["recipients"][0] if recipient else data)[name] = value
        return data

    return edit


def without(name: str) -> Edit:
    def edit(data: dict[str, Any]) -> dict[str, Any]:
        del data[name]
        return data

    return edit


# Valid JSON that is not an envelope: (what is wrong, how, words the reason must contain).
SHAPES: list[tuple[str, Edit | bytes, str]] = [
    ("array", b"[]", "the envelope is a list, not an object"),
    ("null", b"null", "the envelope is null, not an object"),
    ("number", b"5", "the envelope is a number, not an object"),
    ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    ("sender a number", field("sender", 5), "sender is a number, not text"),
    ("id a number", field("id", 5), "id is a number, not text"),
    ("recipients an object", field("recipients", {}), "recipients is an object, not a list"),
    ("recipients null", field("recipients", None), "recipients is null, not a list"),
    ("a recipient a number", field("recipients", [5]), "recipient 1 is a number, not an object"),
    ("address null", field("address", None, recipient=True), "recipient 1: address is null, not text"),
    ("next_attempt text", field("next_attempt", "soon", True), "next_attempt is text, not a number"),
    ("attempts a fraction", field("attempts", 1.5, True), "attempts is a number, not a whole number"),
    ("notified a number", field("notified", 1, True), "notified is a number, not true or false"),
    ("received_at infinite", field("received_at", float("inf")), "received_at is inf, out of range"),
    ("next_attempt NaN", field("next_attempt", float("nan"), True), "next_attempt is nan, out of range"),
    ("size beyond any file", field("size", 10**30), "out of range"),
    ("history a number", field("history", 5, True), "history is a number, not a list"),
    (
        "history of numbers",
        field("history", [5], True),
        "an attempt in its history is a number, not an object",
    ),
    ("notify text", field("notify", "NEVER", True), "notify is not a list of text"),
    ("transcripts of numbers", field("transcripts", [[1]]), "transcripts is not a list of lists of text"),
    ("sender missing", without("sender"), "the field 'sender' is missing"),
    ("unknown state", field("state", "lost", True), "'lost' is not a valid RecipientState"),
    ("unknown source", field("source", "fax"), "'fax' is not a valid Source"),
]


def damaged(original: bytes, how: Edit | bytes) -> bytes:
    if isinstance(how, bytes):
        return how
    return json.dumps(how(json.loads(original))).encode()


async def queue_of(root: Path, count: int, recipient: str = "b@local.test") -> list[Envelope]:
    """`count` messages in the spool at `root` (queue/), due now, received now (not expired)."""
    spool = LocalSpool(root)
    spool.open()
    envelopes = []
    for n in range(count):
        writer = spool.create_writer()
        writer.write(f"From: a@local.test\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode())
        envelope = Envelope(writer.id, "a@local.test", [Recipient(recipient)], received_at=time.time())
        await spool.put(writer, envelope)
        envelopes.append(envelope)
    await spool.drain()
    spool.close()
    return envelopes


def make_huge(path: Path) -> None:
    """A sparse file just over the limit: its size is real, its blocks are not written."""
    with open(path, "r+b") as fh:
        fh.truncate(MAX_ENVELOPE_BYTES + 1)


def reopened(root: Path) -> tuple[LocalSpool, list[tuple[str, str]]]:
    reports: list[tuple[str, str]] = []
    spool = LocalSpool(root, on_corrupt=lambda name, reason: reports.append((name, reason)))
    spool.open()
    return spool, reports


@pytest.mark.parametrize(
    ("how", "reason"), [(how, reason) for _, how, reason in SHAPES], ids=[s[0] for s in SHAPES]
)
async def test_an_envelope_of_the_wrong_shape_is_set_aside_with_the_reason(
    tmp_path: Path, how: Edit | bytes, reason: str
) -> None:
    good, bad = await queue_of(tmp_path / "queue", 2)
    env = tmp_path / "queue" / f"{bad.id}.env"
    env.write_bytes(damaged(env.read_bytes(), how))
    spool, reports = reopened(tmp_path / "queue")
    # Set aside at the recovery, or (a field the index does not need) at its first read: a delivery's
    # lease or `queue list` (list() reads every envelope).
    assert [e.id for e in spool.list()] == [good.id] and spool.ids() == [good.id]
    [(name, why)] = reports
    assert name == bad.id and reason in why
    assert sorted(p.name for p in spool.corrupt_dir.iterdir()) == [f"{bad.id}.eml", f"{bad.id}.env"]
    spool.close()


async def test_a_huge_envelope_is_set_aside_unread(tmp_path: Path) -> None:
    good, bad = await queue_of(tmp_path / "queue", 2)
    make_huge(tmp_path / "queue" / f"{bad.id}.env")
    spool, reports = reopened(tmp_path / "queue")
    assert spool.ids() == [good.id]
    [(name, why)] = reports
    assert name == bad.id and f"more than an envelope ever has ({MAX_ENVELOPE_BYTES:,})" in why
    spool.close()


PENDING_SHAPES = [
    s for s in SHAPES if s[0] in ("array", "null", "number", "nested 100000 deep", "sender a number")
]


@pytest.mark.parametrize(
    ("how", "reason"),
    [(how, reason) for _, how, reason in PENDING_SHAPES],
    ids=[s[0] for s in PENDING_SHAPES],
)
async def test_a_whole_pending_commit_of_the_wrong_shape_is_set_aside_not_taken_for_one_cut_short(
    tmp_path: Path, how: Edit | bytes, reason: str
) -> None:
    """A commit cut short leaves a .pending that is not JSON (removed: never acknowledged); JSON of the
    wrong shape is damage, and may stand for acknowledged mail: the operator gets it in queue/corrupt/."""
    good, bad = await queue_of(tmp_path / "queue", 2)
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    pending = crashed_in_commit(spool, bad)
    spool.close()
    pending.write_bytes(damaged(pending.read_bytes(), how))
    again, reports = reopened(tmp_path / "queue")
    assert again.ids() == [good.id]
    [(name, why)] = reports
    assert name == bad.id and f"{bad.id}.pending is not an envelope" in why and reason in why
    assert sorted(p.name for p in again.corrupt_dir.iterdir()) == [f"{bad.id}.eml", f"{bad.id}.pending"]
    assert list(again.incoming_dir.iterdir()) == []
    again.close()


async def test_a_huge_pending_commit_is_set_aside_unread(tmp_path: Path) -> None:
    good, bad = await queue_of(tmp_path / "queue", 2)
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    make_huge(crashed_in_commit(spool, bad))
    spool.close()
    again, reports = reopened(tmp_path / "queue")
    assert again.ids() == [good.id] and [name for name, _ in reports] == [bad.id]
    assert "more than an envelope ever has" in reports[0][1]
    again.close()


async def test_a_message_file_whose_envelope_was_deleted_is_set_aside_with_an_event(tmp_path: Path) -> None:
    good, bad = await queue_of(tmp_path / "queue", 2)
    (tmp_path / "queue" / f"{bad.id}.env").unlink()
    eml = tmp_path / "queue" / f"{bad.id}.eml"
    os.utime(eml, (time.time() - 60, time.time() - 60))  # from before the start, not a put of this run
    spool, reports = reopened(tmp_path / "queue")
    assert spool.ids() == [good.id]
    [(name, why)] = reports
    assert name == bad.id and "its envelope file (.env) is missing" in why
    assert [p.name for p in spool.corrupt_dir.iterdir()] == [f"{bad.id}.eml"]
    spool.close()


def config_for(tmp_path: Path) -> Path:
    return write_config(tmp_path / "smtpsvc.toml", base_sections(tmp_path / "mailroot"))


def damage_every_way(queue: Path, envelopes: list[Envelope]) -> dict[str, str]:
    """One message per shape damaged (and one .env deleted): {id: words of its reason}."""
    expected = {}
    for envelope, (_, how, reason) in zip(envelopes, SHAPES, strict=False):
        env = queue / f"{envelope.id}.env"
        env.write_bytes(damaged(env.read_bytes(), how))
        expected[envelope.id] = reason
    orphan = envelopes[len(SHAPES)]
    (queue / f"{orphan.id}.env").unlink()
    os.utime(queue / f"{orphan.id}.eml", (time.time() - 60, time.time() - 60))
    expected[orphan.id] = "its envelope file (.env) is missing"
    return expected


async def test_the_queue_commands_report_every_damaged_file_and_list_the_rest(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    queue = tmp_path / "mailroot" / "queue"
    envelopes = await queue_of(queue, len(SHAPES) + 3)
    expected = damage_every_way(queue, envelopes)
    for command in (["queue", "summary"], ["queue", "list", "--json"]):
        # The CLI runs its own event loop (asyncio.run): in a thread, from this async test.
        result = await asyncio.to_thread(CliRunner().invoke, main, [*command, "-c", str(config)], env={})
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output and "Traceback" not in result.stderr
    listed = json.loads(result.stdout)
    assert sorted(e["id"] for e in listed["messages"]) == sorted(e.id for e in envelopes[len(SHAPES) + 1 :])
    corrupt = {p.stem for p in (queue / "corrupt").iterdir()}
    assert corrupt == set(expected)
    reported = [
        json.loads(line) for line in (tmp_path / "mailroot" / "log" / "events.jsonl").read_text().splitlines()
    ]
    for queue_id, reason in expected.items():
        [event] = [e for e in reported if e["id"] == 9001 and e.get("queue_id") == queue_id]
        assert reason in event["text"]


async def test_serve_starts_on_a_queue_damaged_every_way_and_delivers_the_rest(tmp_path: Path) -> None:
    config = config_for(tmp_path)
    queue = tmp_path / "mailroot" / "queue"
    envelopes = await queue_of(queue, len(SHAPES) + 3)
    expected = damage_every_way(queue, envelopes)
    service = ServiceProcess(config, tmp_path / "mailroot").start()
    try:
        drop = tmp_path / "mailroot" / "drop"
        await wait_until(
            lambda: len(list(drop.glob("*.eml"))) == 2, timeout=60, what="the good messages delivered"
        )
        events_file = tmp_path / "mailroot" / "log" / "events.jsonl"

        def set_aside() -> list[dict[str, Any]]:
            lines = events_file.read_text().splitlines()
            return [e for e in map(json.loads, lines) if e["id"] == 9001]

        reported = await wait_until(lambda: len(set_aside()) >= len(expected) and set_aside(), timeout=60)
        assert sorted(e["queue_id"] for e in reported) == sorted(expected)
        assert {p.stem for p in (queue / "corrupt").iterdir()} == set(expected)
    finally:
        assert service.terminate() == 0
    assert "Traceback" not in service.stderr_text()


async def test_a_message_file_that_cannot_be_opened_is_set_aside_once_not_retried(
    start_service: StartService,
) -> None:
    service = await start_service()
    root = service.root
    await service.stop()
    good, bad = await queue_of(root / "queue", 2)
    eml = root / "queue" / f"{bad.id}.eml"
    eml.unlink()
    eml.mkdir()  # what no open() can read, not even root's (mode 000 stops only other users)
    again = await start_service(server={"root": str(root)})
    await wait_until(lambda: list(again.folders["drop"].glob("*.eml")), what="the good message delivered")
    [event] = await wait_until(lambda: events_of(again, 9001), what="event 9001")
    assert event["queue_id"] == bad.id and f"{bad.id}.eml cannot be opened: Is a directory" in event["text"]
    assert sorted(p.name for p in (root / "queue" / "corrupt").iterdir()) == [
        f"{bad.id}.eml",
        f"{bad.id}.env",
    ]
    assert not (root / "queue" / f"{bad.id}.env").exists() and bad.id not in again.queue.ids()
    assert [e for e in events_of(again, 4000) if e.get("queue_id") == bad.id] == []  # no "internal-error"
    assert good.id not in again.queue.ids()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("links.json", b"[]", "not a list of frozen links; no link is frozen"),
        ("links.json", b'{"frozen": 5}', "not a list of frozen links"),
        ("links.json", b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deep)"),
        ("links.json", None, "it cannot be read: Is a directory"),
        (
            "forced.json",
            b'{"at": "soon"}',
            "its time is not a number; the last `queue retry --all` is forgotten",
        ),
        ("forced.json", b"null", "its time is not a number"),
        ("spool.id", b"\xff\xfe\n", "a new one is made; the queued messages are adopted"),
        ("spool.id", None, "Is a directory; a new one is made"),
    ],
    ids=[
        "links array",
        "links number",
        "links nested",
        "links a folder",
        "forced text",
        "forced null",
        "id binary",
        "id a folder",
    ],
)
async def test_a_damaged_queue_state_file_is_set_aside_and_the_queue_opens(
    tmp_path: Path, name: str, content: bytes | None, reason: str
) -> None:
    [good] = await queue_of(tmp_path / "queue", 1)
    path = tmp_path / "queue" / name
    path.unlink(missing_ok=True)
    if content is None:
        path.mkdir()  # unreadable for anyone, root included
    else:
        path.write_bytes(content)
    spool, reports = reopened(tmp_path / "queue")
    assert [e.id for e in spool.list()] == [good.id]
    [(reported, why)] = reports
    assert reported == name and reason in why
    assert (spool.corrupt_dir / name).exists()
    spool.close()


async def test_a_queue_file_whose_name_is_not_utf8_is_set_aside_and_reported_escaped(
    start_service: StartService,
) -> None:
    service = await start_service()
    root = service.root
    await service.stop()
    [copied] = await queue_of(root / "queue", 1)
    folder = os.fsencode(root / "queue")
    for suffix in (b".env", b".eml"):  # copied in from another system, by hand
        os.rename(
            os.path.join(folder, copied.id.encode() + suffix), os.path.join(folder, b"bad\xff\nname" + suffix)
        )
    again = await start_service(server={"root": str(root)})
    [event] = await wait_until(lambda: events_of(again, 9001), what="event 9001")
    assert event["queue_id"] == "bad\\xff\\x0aname" and "does not match its file name" in event["text"]
    assert sorted(os.listdir(os.fsencode(root / "queue" / "corrupt"))) == [
        b"bad\xff\nname.eml",
        b"bad\xff\nname.env",
    ]
    await again.stop()
    raw = (root / "log" / "events.jsonl").read_bytes()
    assert all(json.loads(line.decode("utf-8")) for line in raw.splitlines())
