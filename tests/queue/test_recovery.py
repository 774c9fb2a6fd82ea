"""The local spool at scale: the queue indexed in the background while mail is taken, envelopes kept on
disk (memory does not grow with them), damaged envelopes of every kind set aside (queue/local.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from smtpsvc.app import Service
from smtpsvc.config import load_config
from smtpsvc.model import Envelope, Recipient, RecipientState
from smtpsvc.queue import local
from smtpsvc.queue.local import LocalSpool, LocalStore
from tests.conftest import base_sections, events_of, smtp_port, wait_until, write_config
from tests.test_queue_local import put
from tests.test_relay import send


async def filled(root: Path, count: int, due: float = 0.0) -> list[str]:
    spool = LocalSpool(root)
    spool.open()
    store = LocalStore(spool)
    ids = [(await put(spool, due=due)).id for _ in range(count)]
    await store.close()
    return ids


async def test_a_background_recovery_indexes_every_message_while_new_ones_are_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "RECOVERY_BATCH", 50)  # many batches: puts land between them
    old = await filled(tmp_path / "queue", 600)
    spool = LocalSpool(tmp_path / "queue")
    spool.open(scan=False)
    assert spool.count() == 0 and spool.ids() == []
    recovery = asyncio.ensure_future(spool.recover())
    new = [(await put(spool)).id for _ in range(20)]
    await asyncio.wait_for(recovery, 60)
    assert sorted(spool.ids()) == sorted(old + new) and not spool.recovering
    leased = spool.lease(time.time(), 10_000)
    assert len(leased) == 620 and len({e.id for e in leased}) == 620  # each once
    spool.close()


async def test_a_message_delivered_during_the_recovery_is_not_indexed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "RECOVERY_BATCH", 10)
    await filled(tmp_path / "queue", 200)
    spool = LocalSpool(tmp_path / "queue")
    spool.open(scan=False)
    store = LocalStore(spool)
    recovery = asyncio.ensure_future(spool.recover())
    completed: list[str] = []
    while not recovery.done():  # deliver whatever is indexed, as the scheduler would, meanwhile
        for claim in await store.claim(time.time(), 5):
            await store.complete(claim.envelope.id)
            completed.append(claim.envelope.id)
        await asyncio.sleep(0)
    await recovery
    for claim in await store.claim(time.time(), 1000):
        await store.complete(claim.envelope.id)
        completed.append(claim.envelope.id)
    assert len(completed) == 200 and len(set(completed)) == 200
    await spool.removed()
    assert spool.count() == 0 and not list(spool.dir.glob("*.env"))
    await store.close()


async def test_envelopes_in_memory_are_bounded_whatever_the_size_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "CACHE_LIMIT", 10)
    ids = await filled(tmp_path / "queue", 100, due=time.time() + 3600)
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    assert spool.count() == 100 and len(spool._cache) == 0  # indexed from disk, nothing kept
    assert [e.id for e in spool.list()] == sorted(ids)  # read back from disk when asked
    assert len(spool._cache) <= 10
    spool.close()


async def test_a_leased_envelope_stays_the_same_object_however_busy_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator's freeze of a message being delivered must change the envelope its delivery will save.
    monkeypatch.setattr(local, "CACHE_LIMIT", 5)
    await filled(tmp_path / "queue", 50)
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    [leased] = spool.lease(time.time(), 1)
    spool.list()  # every other envelope read, and most dropped from memory again
    assert spool.get(leased.id) is leased
    spool.close()


@pytest.mark.parametrize(
    "payload",
    [b"[]", b"null", b"5", b'"text"', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe"],
    ids=["array", "null", "number", "string", "nested 100000 deep", "not utf-8"],
)
async def test_an_envelope_that_is_not_a_json_object_is_set_aside_and_the_rest_is_queued(
    tmp_path: Path, payload: bytes
) -> None:
    good, bad = await filled(tmp_path / "queue", 2)
    (tmp_path / "queue" / f"{bad}.env").write_bytes(payload)
    reports: list[tuple[str, str]] = []
    spool = LocalSpool(tmp_path / "queue", on_corrupt=lambda name, reason: reports.append((name, reason)))
    spool.open()
    assert spool.ids() == [good] and [name for name, _ in reports] == [bad]
    assert (spool.corrupt_dir / f"{bad}.env").exists() and (spool.corrupt_dir / f"{bad}.eml").exists()
    spool.close()


def big_queue_service(tmp_path: Path) -> Path:
    sections: dict[str, dict[str, Any]] = base_sections(
        tmp_path / "mailroot", delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]}
    )
    return write_config(tmp_path / "smtpsvc.toml", sections)


async def test_the_service_takes_mail_while_its_queue_is_recovered_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "RECOVERY_BATCH", 20)
    await filled(tmp_path / "mailroot" / "queue", 400, due=time.time() + 3600)
    path = big_queue_service(tmp_path)
    service = Service(load_config(str(path), env={}), str(path), log_stream=None, pickup_interval=0.05)
    await service.start()
    try:
        [started] = events_of(service, 9002)
        assert "the queue is being recovered in the background" in started["text"]
        await send(service, "alice@local.test", ["x@remote.test"])  # taken meanwhile
        recovered = await wait_until(
            lambda: [e for e in events_of(service, 9002) if e.get("cause") == "queue-recovered"],
            timeout=60,
            what="the end of the recovery",
        )
        assert "401 message(s) indexed" in recovered[0]["text"]
        assert smtp_port(service)
    finally:
        await service.stop()


@pytest.mark.parametrize(
    ("recipients", "frozen", "frozen_links"),
    [
        ([Recipient("a@x.test", route="x.test", next_attempt=50.0)], False, frozenset()),
        ([Recipient("a@x.test", route="x.test", next_attempt=50.0, attempts=2)], True, frozenset()),
        ([Recipient("a@x.test", route="x.test", next_attempt=50.0)], False, frozenset({"x.test"})),
        (
            [
                Recipient("a@x.test", route="x.test", next_attempt=50.0),
                Recipient("b@y.test", state=RecipientState.FAILED, next_attempt=70.0),
                Recipient("c@z.test", state=RecipientState.DELIVERED, next_attempt=10.0),
            ],
            False,
            frozenset({"x.test"}),
        ),
        (
            [Recipient("a@x.test", next_attempt=5.0), Recipient("b@x.test", route="x.test")],
            False,
            frozenset(),
        ),
        ([Recipient("b@y.test", state=RecipientState.FAILED, notified=True)], False, frozenset()),
    ],
)
def test_the_recovery_reads_the_same_index_entry_as_from_the_whole_envelope(
    tmp_path: Path, recipients: list[Recipient], frozen: bool, frozen_links: frozenset[str]
) -> None:
    # The recovery reads a .env's JSON without building the envelope (speed); it must index it exactly as
    # the envelope would be indexed.
    spool = LocalSpool(tmp_path / "queue")
    spool.open()
    spool._frozen_links = frozen_links
    envelope = Envelope("0661D4929F25B7034CCF2DF3", "a@b.test", recipients, 1.0, size=123, frozen=frozen)
    envelope.spool = spool.spool_id
    (spool.dir / f"{envelope.id}.eml").write_bytes(b"x")
    found = spool._digest(envelope.id, json.dumps(envelope.to_json()).encode())
    assert found is not None
    assert (found.shape, found.due, found.size) == (spool._shape(envelope), spool._due_of(envelope), 123)
    spool.close()


async def test_a_retry_of_everything_during_the_recovery_reaches_the_messages_not_indexed_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "RECOVERY_BATCH", 10)
    await filled(tmp_path / "queue", 300, due=time.time() + 3600)
    spool = LocalSpool(tmp_path / "queue")
    spool.open(scan=False)
    store = LocalStore(spool)
    # The recovery thread has read 100 envelopes (more than it hands over at once) when the retry comes.
    read, go_on = 0, threading.Event()
    found = spool._found

    def slow_found(stem: str) -> Any:
        nonlocal read
        read += 1
        if read == 100:
            go_on.wait(30)
        return found(stem)

    monkeypatch.setattr(spool, "_found", slow_found)
    recovery = asyncio.ensure_future(spool.recover())
    await wait_until(lambda: read >= 100, timeout=30, what="the recovery thread to read ahead")
    await store.make_due(time.time())  # `queue retry --all` right after a restart
    go_on.set()
    await asyncio.wait_for(recovery, 60)
    assert len(await store.claim(time.time() + 1, 1000)) == 300
    await store.close()
