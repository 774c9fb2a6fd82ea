"""The PostgreSQL queue (`queue.backend = "postgres"`): several nodes share one queue (SPEC 2.8).

The database is the only truth: every change that matters is one SQL statement or one transaction, and a
node keeps nothing in memory but the tokens of the leases it holds. docs/cluster.md has the design.

  put(w, env)        message row (body, envelope, XEXCH50 blob) + recipient rows + NOTIFY in one transaction;
                     returns after COMMIT (the 250 waits for it), raises QueueError on any database failure.
  claim(now, n)      due, unfrozen messages nobody holds (or whose lease expired) are taken with
                     `FOR UPDATE SKIP LOCKED` and leased to this node for `lease_seconds` (database clock).
  renew(ids)         push the leases of messages still being delivered further out (also done every
                     lease_seconds/3 by a background task unless auto_renew=False).
  save(env)          write delivery state and release the lease, only while this claim still holds it:
                     a lease that expired and was claimed by another node raises LeaseLost.
  release(id)        give a lease back without changes (a cancelled delivery).
  complete(id)       the message is done: its rows are deleted.
  set_frozen/make_due/recategorize/delete   operator verbs, as SQL updates every node sees; a forced
                     retry (make_due) also tells every node which links to take out of their backoff.
  set_link_frozen    a next hop frozen for the whole cluster (`links`); `next_due` leaves it out.
  link_slot(l, n)    one of n connection slots of a link for the whole cluster (`link_slots`, leased).
  wait_for_work(t)   LISTEN/NOTIFY wake-ups (put, release, thaw, retry) plus a periodic poll, because a
                     notification sent while a listener was reconnecting is lost.

Everything here is async, unlike the local spool's in-memory index: reads go to the database. The class
implements `QueueStore` (queue/base.py), the interface the scheduler, reports, admin and metrics use.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from smtpsvc.model import NO_LINK, QUEUE_STATES, Envelope, domain_of, new_queue_id
from smtpsvc.queue import pgschema
from smtpsvc.queue.base import (
    SAMPLE_IDS,
    Claim,
    LeaseLost,
    LinkStats,
    MessageWriter,
    QueueError,
    QueueSummary,
    Rescheduled,
)

__all__ = ["CHANNEL", "Claim", "LeaseLost", "PostgresQueue", "PostgresWriter"]

try:  # an optional dependency: pip install 'smtpsvc[postgres]'
    import asyncpg

    # What a lost server, a broken connection or a refused statement raises; all become QueueError.
    _DB_ERRORS: tuple[type[BaseException], ...] = (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,
        OSError,
        TimeoutError,
    )
except ImportError:  # pragma: no cover - the local backend does not need it
    asyncpg = None
    _DB_ERRORS = (OSError, TimeoutError)

CHANNEL = "smtpsvc_queue"  # LISTEN/NOTIFY channel: the payload is the queue id that became due
IN_MEMORY_BODY = 1024 * 1024  # a message being received stays in memory up to this size, then a temp file
RECONNECT_DELAY = 1.0  # seconds between attempts to get the LISTEN connection back
RECENT_KEPT = 256  # envelopes this node just queued, kept for recent() (metrics)
# NOTIFY payload of a forced retry: "retry:" + the links made due as JSON, or "retry:*" (every link) when
# they would not fit in a notification (8000 bytes): the nodes lift their per-destination backoff for them.
RETRY_PREFIX = "retry:"
RETRY_PAYLOAD_MAX = 7000
# pg_advisory_xact_lock key of the frozen links: a save reads them under the shared lock, a link freeze or
# thaw takes it exclusively, so `next_due` is never computed from a set of frozen links that just changed.
LINKS_LOCK = 0x736D7470736C6E6B  # "smtpslnk"
# Connection slots per link for the whole cluster (delivery.max_connections_per_domain): a slot is a row of
# `link_slots` leased like a message; a node that gives one back notifies the nodes waiting for one.
SLOT_CHANNEL = "smtpsvc_slots"
SLOT_POLL = 1.0  # a waiter looks again this often (a notification may be lost while a listener reconnects)

# The envelope fields that live in columns of `messages`; the rest goes to its `envelope` JSON.
_MESSAGE_COLUMNS = ("id", "sender", "received_at", "size", "frozen")
# The recipient fields that live in columns of `recipients`; the rest goes to its `data` JSON.
_RECIPIENT_COLUMNS = (
    "address", "state", "notified", "next_attempt", "attempts", "route", "last_reply", "status", "remote_mta",
)  # fmt: skip

_SELECT_MESSAGE = "m.id, m.sender, m.received_at, m.size, m.frozen, m.envelope"
_SELECT_RECIPIENTS = (
    "SELECT message_id, " + ", ".join(_RECIPIENT_COLUMNS) + ", data FROM recipients"
    " WHERE message_id = ANY($1::text[]) ORDER BY message_id, idx"
)
_INSERT_RECIPIENTS = """
    INSERT INTO recipients (message_id, idx, address, domain, state, notified, next_attempt, attempts,
                            route, last_reply, status, remote_mta, data)
    SELECT $1, * FROM unnest($2::integer[], $3::text[], $4::text[], $5::text[], $6::boolean[],
                             $7::double precision[], $8::integer[], $9::text[], $10::text[], $11::text[],
                             $12::text[], $13::jsonb[])
"""
# put in one statement (one round trip, atomic without an explicit transaction): the message row, its
# recipient rows ($1...$13 as in _INSERT_RECIPIENTS), and the NOTIFY, which goes out only if it commits.
# The recipients' foreign key is checked at the end of the statement, when the message row exists.
_PUT = f"""
    WITH message AS (
        INSERT INTO messages (id, sender, received_at, size, envelope, body, xexch50, next_due, frozen)
        VALUES ($1, $14, $15, $16, $17::jsonb, $18, $19, $20, $21)
        RETURNING id
    ), recipient_rows AS ({_INSERT_RECIPIENTS})
    SELECT pg_notify('{CHANNEL}', id) FROM message
"""
# The claim: the earliest due messages that are not frozen and not validly leased, locked with SKIP LOCKED
# so that concurrent claims by other nodes pass over them instead of waiting; `previous` is the holder of
# an expired lease (a dead or stalled node), NULL for a message nobody held, and `previous_token` tells
# whether that expired lease is one this very node still works on.
_CLAIM = f"""
    WITH due AS (
        SELECT id, leased_by AS previous, lease_token AS previous_token, rerun AS previous_rerun
        FROM messages
        WHERE NOT frozen AND next_due <= $1
          AND (lease_until IS NULL OR lease_until < clock_timestamp())
        ORDER BY next_due
        LIMIT $2
        FOR UPDATE SKIP LOCKED
    )
    UPDATE messages m
    SET leased_by = $3, lease_token = $4, rerun = false,
        lease_until = clock_timestamp() + make_interval(secs => $5)
    FROM due WHERE m.id = due.id
    RETURNING due.previous, due.previous_token, due.previous_rerun, {_SELECT_MESSAGE}
"""
_RENEW = """
    UPDATE messages m SET lease_until = clock_timestamp() + make_interval(secs => $3)
    FROM unnest($1::text[], $2::uuid[]) AS held(id, token)
    WHERE m.id = held.id AND m.lease_token = held.token
    RETURNING m.id
"""
_RELEASE_COLUMNS = "leased_by = NULL, lease_token = NULL, lease_until = NULL"
_TAKE_SLOT = """
    WITH free AS (
        SELECT link, slot FROM link_slots
        WHERE link = $1 AND slot < $2 AND (lease_until IS NULL OR lease_until < clock_timestamp())
        ORDER BY slot LIMIT 1
        FOR UPDATE SKIP LOCKED
    )
    UPDATE link_slots s SET leased_by = $3, token = $4,
        lease_until = clock_timestamp() + make_interval(secs => $5)
    FROM free WHERE s.link = free.link AND s.slot = free.slot
    RETURNING s.slot
"""
# recategorize() goes through the queue a page of messages at a time (keyset on the id, so a page costs the
# same at the end of a million messages as at the start): their pending recipients ($1: after this id; $2:
# one message, or "" for all), a message without one still listed, so the next page starts after it.
RECATEGORIZE_BATCH = 500
_RECATEGORIZE_PAGE = """
    WITH page AS (
        SELECT id FROM messages
        WHERE id > $1 AND NOT frozen AND ($2 = '' OR id = $2)
        ORDER BY id
        LIMIT $3
    )
    SELECT page.id, r.idx, r.address
    FROM page LEFT JOIN recipients r ON r.message_id = page.id AND r.state = 'pending'
    ORDER BY page.id, r.idx
"""
# The new routes of a page's recipients, due at $4; a message frozen or a recipient finished since the
# page was read is left alone.
_REROUTE = """
    UPDATE recipients r SET route = new.route, next_attempt = $4
    FROM unnest($1::text[], $2::integer[], $3::text[]) AS new(message_id, idx, route), messages m
    WHERE r.message_id = new.message_id AND r.idx = new.idx AND r.state = 'pending'
      AND m.id = r.message_id AND NOT m.frozen
    RETURNING r.message_id, r.route
"""
# After a link was frozen or thawed: the due time of every message with a pending recipient on it, as
# Envelope.next_due(frozen_links) computes it (outstanding recipients, minus the pending ones on a frozen
# link), so a message that only waits on a frozen link is not claimed again and again.
_RECOMPUTE_DUE = """
    UPDATE messages m SET next_due = (
        SELECT min(r.next_attempt) FROM recipients r
        WHERE r.message_id = m.id
          AND ((r.state = 'failed' AND NOT r.notified)
               OR (r.state = 'pending' AND r.route NOT IN (SELECT link FROM links))))
    WHERE m.id IN (SELECT message_id FROM recipients WHERE state = 'pending' AND route = $1)
"""


@dataclass(slots=True)
class _Held:
    """A lease this node holds: the claim's token, and the envelope object claim() handed out (save()
    accepts that object only, so an envelope from an older claim of the same message cannot overwrite a
    newer state)."""

    token: uuid.UUID
    envelope: Envelope


class PostgresWriter:
    """A message being received: bytes buffered in a SpooledTemporaryFile (memory up to IN_MEMORY_BODY,
    then a temporary file), uploaded by put() in one parameter."""

    def __init__(self, queue_id: str, tmp_dir: Path | None) -> None:
        self._id = queue_id
        # Closed by take_body() or abort(), like the local spool's writer file.
        self._file: tempfile.SpooledTemporaryFile[bytes] | None = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=IN_MEMORY_BODY, dir=None if tmp_dir is None else str(tmp_dir)
        )
        self._size = 0
        self.blob: bytes | None = None

    @property
    def id(self) -> str:
        return self._id

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise QueueError("message writer already closed")
        try:
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot buffer the message: {exc.strerror}") from exc
        self._size += len(data)

    def attach_xexch50(self, blob: bytes) -> None:
        self.blob = bytes(blob)

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def take_body(self) -> bytes:
        """The whole message, once; the buffer is closed."""
        if self._file is None:
            raise QueueError("message writer already closed")
        try:
            self._file.seek(0)
            return self._file.read()
        except OSError as exc:
            raise QueueError(f"cannot read back the buffered message: {exc.strerror}") from exc
        finally:
            self.abort()


class PostgresQueue:
    """The shared queue of a cluster node. `open()` before use, `close()` after (leases are not given back:
    release or save first, or let them expire). It implements `QueueStore` (queue/base.py).

    `listen=False` (the `smtpsvc queue` commands) opens no LISTEN connection and renews nothing: a tool that
    only reads and changes rows. `on_forced_retry(links)` is called when any node forced a retry (ETRN,
    `queue retry`), with the links made due (None: all), so the scheduler lifts its backoff for them."""

    shared = True

    def __init__(
        self,
        dsn: str,
        node_id: str,
        lease_seconds: float = 30.0,
        *,
        pool_size: int = 10,
        poll_interval: float = 5.0,
        connect_timeout: float = 5.0,
        command_timeout: float = 15.0,
        auto_renew: bool = True,
        listen: bool = True,
        tmp_dir: Path | None = None,
        on_corrupt: Callable[[str, str], None] | None = None,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        self.dsn = dsn
        self.node_id = node_id
        self.lease_seconds = lease_seconds
        self.poll_interval = poll_interval
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._auto_renew = auto_renew and listen
        self._listen_enabled = listen
        self._tmp_dir = tmp_dir
        self._on_corrupt = on_corrupt or (lambda queue_id, reason: None)
        self._pool: Any = None
        self._held: dict[str, _Held] = {}  # queue id -> the lease this node holds on it
        self._work = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._recent: OrderedDict[str, Envelope] = OrderedDict()  # what this node just queued
        self._slots: dict[uuid.UUID, str] = {}  # connection slots this node holds: token -> link
        self._slot_rows: dict[str, int] = {}  # link -> how many slot rows this node made sure exist
        self._slot_freed = asyncio.Event()
        self.on_forced_retry: Callable[[frozenset[str] | None], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect (a pool, plus one connection that LISTENs), check the schema version, start renewing.
        Raises QueueError when the database cannot be used, saying what to do."""
        if asyncpg is None:
            raise QueueError("the PostgreSQL driver is not installed: pip install 'smtpsvc[postgres]'")
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self._pool_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
                server_settings={"application_name": f"smtpsvc {self.node_id}"[:63]},
            )
        except Exception as exc:
            raise pgschema.explain(exc, self.dsn) from exc
        try:
            await self._check_schema()
            listener = await self._listen() if self._listen_enabled else None
        except BaseException:
            await self._close_pool()
            raise
        loop = asyncio.get_running_loop()
        if listener is not None:
            self._tasks.append(loop.create_task(self._keep_listening(listener)))
        if self._auto_renew:
            self._tasks.append(loop.create_task(self._renew_forever()))

    async def close(self) -> None:
        """Stop listening and renewing, close the connections. Held leases stay in the database and
        expire after lease_seconds (which is what a node that dies leaves behind, too)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._held.clear()
        self._slots.clear()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._command_timeout)
        except _DB_ERRORS:  # TimeoutError included
            pool.terminate()

    async def _check_schema(self) -> None:
        async with self._connection("read the schema version") as conn:
            version = await pgschema.current_version(conn)
        if version == 0:
            raise QueueError(
                f"the database at {pgschema.describe(self.dsn)} has no smtpsvc queue schema: "
                "run `smtpsvc db init`"
            )
        if version > pgschema.LATEST:
            raise QueueError(pgschema.too_new(version))
        if version < pgschema.LATEST:
            raise QueueError(
                f"the database's smtpsvc queue schema is version {version}, this smtpsvc needs "
                f"{pgschema.LATEST}: run `smtpsvc db migrate`"
            )

    @contextlib.asynccontextmanager
    async def _connection(self, what: str) -> AsyncIterator[Any]:
        """A pooled connection; any database or network failure inside the block becomes a QueueError
        that says what could not be done. Connect and statements are bounded by the timeouts."""
        if self._pool is None:
            raise QueueError("the PostgreSQL queue is not open")
        try:
            async with self._pool.acquire(timeout=self._connect_timeout + self._command_timeout) as conn:
                yield conn
        except QueueError:
            raise
        except _DB_ERRORS as exc:
            raise QueueError(f"PostgreSQL queue: cannot {what}: {_reason(exc)}") from exc

    # -- writing -------------------------------------------------------------------------------------
    def create_writer(self) -> PostgresWriter:
        try:
            return PostgresWriter(new_queue_id(), self._tmp_dir)
        except OSError as exc:
            raise QueueError(f"cannot buffer a new message: {exc.strerror}") from exc

    async def put(self, writer: MessageWriter, envelope: Envelope) -> None:
        """Message, XEXCH50 blob, envelope and recipients in one transaction; returns after COMMIT."""
        if not isinstance(writer, PostgresWriter) or envelope.id != writer.id:
            raise ValueError("envelope and writer ids differ")
        envelope.size = writer.size
        body = writer.take_body()
        extra, recipients = _encode(envelope)
        async with self._connection("queue the message") as conn:
            # One statement, so one round trip; idle nodes wake (NOTIFY) for the new message.
            await conn.execute(
                _PUT,
                envelope.id,
                *recipients,
                _text(envelope.sender),
                envelope.received_at,
                envelope.size,
                extra,
                body,
                writer.blob,
                envelope.next_due(),
                envelope.frozen,
            )
        # next_due ignored the frozen links (reading them would cost every put a round trip): a new
        # message that only waits on a frozen link is claimed once, skipped, and saved with the right one.
        self._recent[envelope.id] = envelope
        while len(self._recent) > RECENT_KEPT:
            self._recent.popitem(last=False)

    async def save(self, envelope: Envelope) -> None:
        """Persist the delivery state of every recipient and release the lease, in one transaction.
        Raises LeaseLost when this node no longer holds the lease (another node took it over after it
        expired): nothing is written then. A retry asked while the message was leased (make_due(),
        recategorize()) makes its pending recipients due now. `envelope` must be the object claim()
        returned."""
        held = self._held.get(envelope.id)
        if held is None or held.envelope is not envelope:
            raise LeaseLost(
                f"{envelope.id}: this envelope is not under a lease of this node ({self.node_id})"
            )
        token = held.token
        async with self._connection("save the delivery state") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", LINKS_LOCK)
            row = await conn.fetchrow(
                "SELECT rerun, array(SELECT link FROM links) AS frozen_links FROM messages"
                " WHERE id = $1 AND lease_token = $2 FOR UPDATE",
                envelope.id,
                token,
            )
            if row is None:
                self._forget(envelope.id, token)
                raise LeaseLost(
                    f"{envelope.id}: the lease expired and another node took the message over"
                    " (or it was deleted)"
                )
            now = time.time()
            if row["rerun"]:
                for rcpt in envelope.pending:
                    rcpt.next_attempt = min(rcpt.next_attempt, now)
            extra, recipients = _encode(envelope)
            due = envelope.next_due(frozenset(row["frozen_links"]))
            await conn.execute("DELETE FROM recipients WHERE message_id = $1", envelope.id)
            await conn.execute(_INSERT_RECIPIENTS, envelope.id, *recipients)
            await conn.execute(
                f"UPDATE messages SET envelope = $2::jsonb, size = $3, next_due = $4, rerun = false,"
                f" {_RELEASE_COLUMNS} WHERE id = $1",
                envelope.id,
                extra,
                envelope.size,
                due,
            )
            if due is not None and due <= now:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, envelope.id)
        self._forget(envelope.id, token)

    async def complete(self, queue_id: str) -> None:
        """Every recipient is final: the message leaves the queue (its rows are deleted, whoever holds the
        lease: a node that finished a message has nothing left for anyone to do)."""
        async with self._connection("remove the message") as conn:
            await conn.execute("DELETE FROM messages WHERE id = $1", queue_id)
        self._held.pop(queue_id, None)

    # -- leases --------------------------------------------------------------------------------------
    async def claim(self, now: float, limit: int) -> list[Claim]:
        """Lease up to `limit` messages due at `now` (epoch seconds). A message whose previous lease expired
        without a save comes back with `taken_over_from` set. One whose lease this node let expire (the
        database was unreachable longer than lease_seconds) while still delivering it, and that nobody
        took meanwhile, is leased again for that delivery and not handed out a second time."""
        if limit <= 0:
            return []
        token = uuid.uuid4()
        claims: list[Claim] = []
        resumed: list[_Held] = []
        async with self._connection("claim due messages") as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, now, limit, self.node_id, token, self.lease_seconds)
            if not rows:
                return []
            by_id = await self._recipient_rows(conn, [row["id"] for row in rows])
            for row in sorted(rows, key=lambda r: r["id"]):
                mine = self._held.get(row["id"])
                if mine is not None and mine.token == row["previous_token"]:
                    resumed.append(mine)
                    if row["previous_rerun"]:  # a retry asked meanwhile is still for our save to honour
                        await conn.execute("UPDATE messages SET rerun = true WHERE id = $1", row["id"])
                    continue
                try:
                    envelope = _decode(row, by_id.get(row["id"], []))
                except (ValueError, KeyError, TypeError) as exc:
                    await self._set_aside(conn, row["id"], str(exc) or type(exc).__name__)
                    continue
                claims.append(Claim(envelope, row["previous"] or ""))
        for held in resumed:  # only now that the claim is committed
            held.token = token
        for claim in claims:
            self._held[claim.envelope.id] = _Held(token, claim.envelope)
        return claims

    async def renew(self, queue_ids: Iterable[str] | None = None) -> set[str]:
        """Extend by lease_seconds the leases this node holds on `queue_ids` (default: all it holds).
        Returns the ids still held; a lease found taken over is forgotten (its save would be refused)."""
        wanted = self._held if queue_ids is None else queue_ids
        held = {q: self._held[q].token for q in wanted if q in self._held}
        if not held:
            return set()
        ids, tokens = list(held), list(held.values())
        async with self._connection("renew leases") as conn:
            rows = await conn.fetch(_RENEW, ids, tokens, self.lease_seconds)
        kept = {row["id"] for row in rows}
        for queue_id in held.keys() - kept:
            self._forget(queue_id, held[queue_id])
        return kept

    async def release(self, queue_id: str) -> bool:
        """Give the lease back unchanged (a delivery that was cancelled). Best effort: False when this node
        did not hold it or the database could not be told; the lease then expires by itself."""
        held = self._held.pop(queue_id, None)
        if held is None:
            return False
        token = held.token
        try:
            async with self._connection("release the lease") as conn, conn.transaction():
                released = await conn.fetchval(
                    f"UPDATE messages SET {_RELEASE_COLUMNS} WHERE id = $1 AND lease_token = $2 RETURNING id",
                    queue_id,
                    token,
                )
                if released is not None:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, queue_id)
        except QueueError:
            return False
        return released is not None

    def abandon(self, queue_id: str) -> None:
        """Stop renewing this lease and let it expire (nothing is written): after lease_seconds any node
        may claim the message again, flagged as taken over."""
        self._held.pop(queue_id, None)

    @property
    def held(self) -> frozenset[str]:
        """The ids this node holds leases on (claimed, not yet saved, released or completed)."""
        return frozenset(self._held)

    def _forget(self, queue_id: str, token: uuid.UUID) -> None:
        held = self._held.get(queue_id)
        if held is not None and held.token == token:  # not a newer claim of the same message
            del self._held[queue_id]

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(QueueError):  # the database is away: the next round tries again
                await self.renew()
                await self._renew_slots()

    # -- connection slots per link (the whole cluster) -----------------------------------------------
    @contextlib.asynccontextmanager
    async def link_slot(self, link: str, limit: int) -> AsyncIterator[None]:
        """Hold one of `limit` connection slots of `link` for the whole cluster while the block runs
        (delivery.max_connections_per_domain across nodes); waits while all are taken. A slot is leased
        like a message: renewed while held, and a dead node's slots expire after lease_seconds. When the
        database cannot be reached the block runs anyway: the node's own limit still holds, and a stalled
        delivery is worse than a connection too many."""
        token = await self._take_slot(link, max(1, limit))
        try:
            yield
        finally:
            if token is not None:
                await self._give_slot(link, token)

    async def _take_slot(self, link: str, limit: int) -> uuid.UUID | None:
        token = uuid.uuid4()
        while True:
            self._slot_freed.clear()
            try:
                async with self._connection("take a connection slot") as conn:
                    if self._slot_rows.get(link, 0) < limit:
                        await conn.execute(
                            "INSERT INTO link_slots (link, slot) SELECT $1, generate_series(0, $2 - 1)"
                            " ON CONFLICT DO NOTHING",
                            _text(link),
                            limit,
                        )
                        self._slot_rows[link] = limit
                    slot = await conn.fetchval(
                        _TAKE_SLOT, _text(link), limit, self.node_id, token, self.lease_seconds
                    )
            except QueueError:
                return None
            if slot is not None:
                self._slots[token] = link
                return token
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), SLOT_POLL)

    async def _give_slot(self, link: str, token: uuid.UUID) -> None:
        """Best effort: a slot that cannot be given back expires."""
        self._slots.pop(token, None)
        with contextlib.suppress(QueueError):
            async with self._connection("give a connection slot back") as conn:
                await conn.execute(
                    "WITH given AS (UPDATE link_slots SET leased_by = NULL, token = NULL, lease_until = NULL"
                    " WHERE link = $1 AND token = $2 RETURNING link)"
                    " SELECT pg_notify($3, '') FROM given",
                    _text(link),
                    token,
                    SLOT_CHANNEL,
                )

    async def _renew_slots(self) -> None:
        if not self._slots:
            return
        async with self._connection("renew connection slots") as conn:
            await conn.execute(
                "UPDATE link_slots SET lease_until = clock_timestamp() + make_interval(secs => $2)"
                " WHERE token = ANY($1::uuid[])",
                list(self._slots),
                self.lease_seconds,
            )

    # -- operator verbs (every node sees them at once) ----------------------------------------------
    async def set_frozen(self, queue_id: str, frozen: bool) -> Envelope | None:
        """Hold a message (not claimed until thawed; a delivery under way finishes) or thaw it; then the
        envelope as stored. None: no such message."""
        async with self._connection("freeze or thaw the message") as conn, conn.transaction():
            found = await conn.fetchval(
                "UPDATE messages SET frozen = $2, corrupt = CASE WHEN $2 THEN corrupt END"
                " WHERE id = $1 RETURNING id",
                queue_id,
                frozen,
            )
            if found is not None and not frozen:
                await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, queue_id)
        if found is None:
            return None
        return await self.get(queue_id)

    async def make_due(
        self, now: float, queue_id: str = "", domain: str = "", subdomains: bool = False, link: str = ""
    ) -> Rescheduled:
        """Force Connection / ETRN: the pending recipients of one message (`queue_id`), of every message
        (neither given), or at `domain` (and its subdomains) are due at `now`. Frozen messages are left
        alone. A message being delivered gets its rerun flag: its next save makes them due now, as the
        delivery overwrites them. Every node (this one included) hears of the links made due through
        NOTIFY and lifts its per-destination backoff for them (on_forced_retry)."""
        domain = domain.rstrip(".").lower()
        async with self._connection("reschedule") as conn, conn.transaction():
            rows = await conn.fetch(
                "UPDATE recipients SET next_attempt = $1 WHERE state = 'pending'"
                " AND ($2 = '' OR message_id = $2)"
                " AND ($3 = '' OR domain = $3 OR ($4 AND right(domain, length($3) + 1) = '.' || $3))"
                " AND ($5 = '' OR route = $5)"
                " AND message_id IN (SELECT id FROM messages WHERE NOT frozen)"
                " RETURNING message_id, route",
                now,
                queue_id,
                domain,
                subdomains,
                link,
            )
            links = frozenset(row["route"] for row in rows)
            count = await self._made_due(conn, {row["message_id"] for row in rows}, now, links)
        return Rescheduled(count, links)

    async def recategorize(
        self,
        route_of: Callable[[str], str],
        now: float,
        *,
        queue_id: str = "",
        changed_only: Callable[[str], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Rescheduled:
        """ResetMessageStatus (QueueStore.recategorize): a page of RECATEGORIZE_BATCH unfrozen messages at a
        time, by id, each page read and updated in a transaction of its own; a leased message gets its
        rerun flag (`_made_due`). The routes are computed here, with the caller's `route_of`."""
        total = 0
        if progress is not None:
            async with self._connection("count the queue") as conn:
                total = int(
                    await conn.fetchval(
                        "SELECT count(*) FROM messages WHERE NOT frozen AND ($1 = '' OR id = $1)", queue_id
                    )
                )
        count, looked_at, links, after = 0, 0, set[str](), ""
        while True:
            async with self._connection("recategorize") as conn, conn.transaction():
                rows = await conn.fetch(_RECATEGORIZE_PAGE, after, queue_id, RECATEGORIZE_BATCH)
                if not rows:
                    break
                wanted = [
                    row
                    for row in rows
                    if row["address"] is not None and (changed_only is None or changed_only(row["address"]))
                ]
                updated = await conn.fetch(
                    _REROUTE,
                    [row["id"] for row in wanted],
                    [row["idx"] for row in wanted],
                    [_text(route_of(row["address"])) for row in wanted],
                    now,
                )
                count += await self._made_due(conn, {row["message_id"] for row in updated}, now)
            links.update(row["route"] for row in updated)
            after = rows[-1]["id"]
            looked_at += len({row["id"] for row in rows})
            if progress is not None:
                progress(looked_at, max(total, looked_at))
        return Rescheduled(count, frozenset(links))

    async def _made_due(
        self, conn: Any, ids: set[str], now: float, forced: frozenset[str] | None = None
    ) -> int:
        """After recipients of `ids` were made due at `now`: move the messages' due time, flag those
        under a lease for a rerun at save, wake the nodes (telling them the `forced` links, when given)."""
        if not ids:
            return 0
        changed = await conn.fetchval(
            "WITH c AS (UPDATE messages SET next_due = LEAST(next_due, $2),"
            " rerun = rerun OR lease_token IS NOT NULL WHERE id = ANY($1::text[]) RETURNING id)"
            " SELECT count(*) FROM c",
            list(ids),
            now,
        )
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, _retry_payload(forced))
        return int(changed)

    async def delete(self, queue_id: str) -> bool:
        """Remove a message without a report (the operator's decision). False: no such message."""
        async with self._connection("delete the message") as conn:
            found = await conn.fetchval("DELETE FROM messages WHERE id = $1 RETURNING id", queue_id)
        self._held.pop(queue_id, None)
        return found is not None

    async def set_link_frozen(self, link: str, frozen: bool) -> None:
        """Freeze or thaw a next hop for the whole cluster: a pending recipient routed to a frozen link is
        not delivered by any node until the link is thawed (its message still accepts mail). Taken under
        the links lock, so a save in progress either finishes first or sees the change."""
        async with self._connection("freeze or thaw the link") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", LINKS_LOCK)
            if frozen:
                await conn.execute(
                    "INSERT INTO links (link, frozen_by) VALUES ($1, $2) ON CONFLICT (link) DO NOTHING",
                    _text(link),
                    _text(self.node_id),
                )
            else:
                await conn.execute("DELETE FROM links WHERE link = $1", _text(link))
            await conn.execute(_RECOMPUTE_DUE, _text(link))
            if not frozen:
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)

    async def frozen_links(self) -> frozenset[str]:
        async with self._connection("read the frozen links") as conn:
            rows = await conn.fetch("SELECT link FROM links")
        return frozenset(row["link"] for row in rows)

    async def _set_aside(self, conn: Any, queue_id: str, reason: str) -> None:
        """An unreadable row (a newer envelope version, a hand edit) is frozen with the reason, never
        dropped and never claimed again in a loop; on_corrupt tells the event log."""
        await conn.execute(
            f"UPDATE messages SET frozen = true, corrupt = $2, {_RELEASE_COLUMNS} WHERE id = $1",
            queue_id,
            _text(reason),
        )
        self._on_corrupt(queue_id, reason)

    # -- waiting for work ----------------------------------------------------------------------------
    async def wait_for_work(self, timeout: float | None) -> bool:
        """Sleep until a NOTIFY says a message may be due (True), or `timeout` seconds, at most
        poll_interval, pass (False): another node's NOTIFY can be missed while our listener reconnects,
        and a lease that expires sends none, so the caller looks at the queue at least that often."""
        limit = self.poll_interval if timeout is None else max(0.0, min(timeout, self.poll_interval))
        try:
            await asyncio.wait_for(self._work.wait(), limit)
        except TimeoutError:
            return False
        self._work.clear()
        return True

    def wake(self) -> None:
        """Make a pending wait_for_work() return now (this node queued mail or finished a delivery)."""
        self._work.set()

    def _notified(self, _conn: object, _pid: object, _channel: object, payload: object) -> None:
        self._work.set()
        if self.on_forced_retry is not None and isinstance(payload, str) and payload.startswith(RETRY_PREFIX):
            links = payload.removeprefix(RETRY_PREFIX)
            # A malformed payload is not ours to fail on: the wake-up itself went through.
            with contextlib.suppress(ValueError, TypeError):
                self.on_forced_retry(None if links == "*" else frozenset(json.loads(links)))

    async def _listen(self) -> Any:
        assert asyncpg is not None
        try:
            conn = await asyncpg.connect(
                self.dsn, timeout=self._connect_timeout, command_timeout=self._command_timeout
            )
        except Exception as exc:
            raise pgschema.explain(exc, self.dsn) from exc
        try:
            await conn.add_listener(CHANNEL, self._notified)
            await conn.add_listener(SLOT_CHANNEL, lambda *_: self._slot_freed.set())
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _keep_listening(self, conn: Any) -> None:
        """Hold the LISTEN connection; when it is lost, reconnect (every RECONNECT_DELAY) and wake the
        caller once, for what was sent meanwhile."""
        try:
            while True:
                if conn is not None:
                    with contextlib.suppress(*_DB_ERRORS):
                        await self._watch(conn)
                    conn.terminate()
                    conn = None
                await asyncio.sleep(min(RECONNECT_DELAY, self.poll_interval))
                try:
                    conn = await self._listen()
                except QueueError:
                    continue
                self._work.set()
                self._slot_freed.set()
        finally:
            if conn is not None:
                conn.terminate()

    async def _watch(self, conn: Any) -> None:
        """Return when the connection is gone: closed by the server, or silent to a ping (no FIN)."""
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _conn: lost.set())
        while not conn.is_closed():
            try:
                await asyncio.wait_for(lost.wait(), self.poll_interval)
                return
            except TimeoutError:
                await conn.execute("SELECT 1", timeout=self._command_timeout)

    # -- reading -------------------------------------------------------------------------------------
    async def get(self, queue_id: str) -> Envelope | None:
        """The stored envelope (for a leased message: as of its last save), or None."""
        async with self._connection("read the message") as conn:
            row = await conn.fetchrow(f"SELECT {_SELECT_MESSAGE} FROM messages m WHERE m.id = $1", queue_id)
            if row is None:
                return None
            by_id = await self._recipient_rows(conn, [queue_id])
        return self._decode_or_report(row, by_id.get(queue_id, []))

    async def open_message(self, queue_id: str) -> BinaryIO:
        """The message bytes, in memory. Raises QueueError when there is no such message."""
        async with self._connection("read the message") as conn:
            body = await conn.fetchval("SELECT body FROM messages WHERE id = $1", queue_id)
        if body is None:
            raise QueueError(f"cannot read the queued message {queue_id}: there is no such message")
        return io.BytesIO(body)

    async def xexch50_blob(self, queue_id: str) -> bytes | None:
        """The XEXCH50 blob received with the message, or None."""
        async with self._connection("read the message") as conn:
            blob = await conn.fetchval("SELECT xexch50 FROM messages WHERE id = $1", queue_id)
        return bytes(blob) if blob is not None else None

    async def next_due(self) -> float | None:
        """When a claim may next find work: the earliest due time of an unfrozen message, or for one under
        another claim, the end of that lease if later. Leases this node holds are left out (they come
        back through save). None: nothing to wait for."""
        async with self._connection("read the due times") as conn:
            due = await conn.fetchval(
                "SELECT min(GREATEST(next_due, coalesce(extract(epoch FROM lease_until)::float8, 0)))"
                " FROM messages WHERE NOT frozen AND next_due IS NOT NULL"
                " AND (lease_token IS NULL OR NOT (lease_token = ANY($1::uuid[])))",
                list({held.token for held in self._held.values()}),
            )
        return float(due) if due is not None else None

    async def _recipient_rows(self, conn: Any, ids: list[str]) -> dict[str, list[Any]]:
        by_id: dict[str, list[Any]] = {}
        for row in await conn.fetch(_SELECT_RECIPIENTS, ids):
            by_id.setdefault(row["message_id"], []).append(row)
        return by_id

    def _decode_or_report(self, row: Any, recipients: list[Any]) -> Envelope | None:
        try:
            return _decode(row, recipients)
        except (ValueError, KeyError, TypeError) as exc:
            self._on_corrupt(row["id"], str(exc) or type(exc).__name__)
            return None

    async def count(self) -> int:
        async with self._connection("count the queue") as conn:
            return int(await conn.fetchval("SELECT count(*) FROM messages"))

    async def ids(self, frozen: bool | None = None) -> list[str]:
        async with self._connection("list the queue's ids") as conn:
            rows = await conn.fetch(
                "SELECT id FROM messages WHERE $1::boolean IS NULL OR frozen = $1::boolean", frozen
            )
        return [row["id"] for row in rows]

    async def holders(self) -> dict[str, str]:
        """Queue id -> the node that holds a lease on it that has not expired (delivering it now)."""
        async with self._connection("read the leases") as conn:
            rows = await conn.fetch(
                "SELECT id, leased_by FROM messages WHERE lease_token IS NOT NULL"
                " AND lease_until > clock_timestamp()"
            )
        return {row["id"]: row["leased_by"] or "" for row in rows}

    async def summary(self) -> QueueSummary:
        """Counts by state and link, computed by the database (one consistent snapshot)."""
        frozen_links = sorted(await self.frozen_links())
        snapshot = {"isolation": "repeatable_read", "readonly": True}
        async with self._connection("summarize the queue") as conn, conn.transaction(**snapshot):
            total = await conn.fetchrow(
                "SELECT count(*) AS messages, coalesce(sum(size), 0) AS bytes, min(received_at) AS oldest"
                " FROM messages"
            )
            rows = await conn.fetch(_SUMMARY, frozen_links, SAMPLE_IDS, time.time())
        states = dict.fromkeys(QUEUE_STATES, 0)
        links: dict[str, dict[str, Any]] = {}
        for row in rows:
            if row["link"] is None:  # the per-state totals
                states[row["state"]] += int(row["messages"])
                continue
            link = links.setdefault(
                row["link"] or NO_LINK,
                {
                    "messages": 0,
                    "recipients": 0,
                    "oldest": None,
                    "next_due": None,
                    "states": set(),
                    "ids": [],
                },
            )
            link["messages"] += int(row["messages"])
            link["recipients"] += int(row["recipients"])
            link["oldest"] = _least(link["oldest"], row["oldest"])
            link["next_due"] = _least(link["next_due"], row["next_due"])
            link["states"].add(row["state"])
            link["ids"].extend(row["sample"])
        return QueueSummary(
            messages=int(total["messages"]),
            states=states,
            links={
                name: LinkStats(
                    messages=data["messages"],
                    recipients=data["recipients"],
                    oldest=float(data["oldest"] or 0.0),
                    next_due=data["next_due"],
                    states=frozenset(data["states"]),
                    sample=tuple(sorted(data["ids"])[:SAMPLE_IDS]),
                )
                for name, data in links.items()
            },
            oldest=total["oldest"],
            bytes=int(total["bytes"]),
        )

    def recent(self, queue_id: str) -> Envelope | None:
        """An envelope this node queued lately (the last RECENT_KEPT), or None; no database round trip."""
        return self._recent.get(queue_id)

    async def list(self) -> list[Envelope]:
        """Every queued message, by id, as stored (one consistent snapshot). Unreadable rows are reported
        to on_corrupt and left out."""
        snapshot = {"isolation": "repeatable_read", "readonly": True}
        async with self._connection("list the queue") as conn, conn.transaction(**snapshot):
            rows = await conn.fetch(f"SELECT {_SELECT_MESSAGE} FROM messages m ORDER BY m.id")
            by_id = await self._recipient_rows(conn, [row["id"] for row in rows])
        decoded = (self._decode_or_report(row, by_id.get(row["id"], [])) for row in rows)
        return [envelope for envelope in decoded if envelope is not None]


# The queue state of each message (model.queue_status_of: frozen when the message is, or every link it waits
# for; retry when a pending recipient was tried or the message is held until later, its next_due past $3,
# now; else ready), then per state the totals (link NULL) and per (state, link) the messages with
# recipients pending for that link. $1: the frozen links.
_SUMMARY = """
WITH pending AS (
    SELECT message_id, bool_and(route = ANY($1::text[])) AS on_frozen, bool_or(attempts > 0) AS tried
    FROM recipients WHERE state = 'pending' GROUP BY message_id
), state AS (
    SELECT m.id, m.received_at,
        CASE WHEN m.frozen OR coalesce(p.on_frozen, false) THEN 'frozen'
             WHEN coalesce(p.tried, false) OR coalesce(m.next_due > $3, false) THEN 'retry'
             ELSE 'ready' END AS state,
        m.frozen OR m.lease_token IS NOT NULL AS waits_not
    FROM messages m LEFT JOIN pending p ON p.message_id = m.id
)
SELECT state, NULL AS link, count(*) AS messages, 0 AS recipients, NULL::float8 AS oldest,
    NULL::float8 AS next_due, ARRAY[]::text[] AS sample
FROM state GROUP BY state
UNION ALL
SELECT s.state, r.route AS link, count(DISTINCT r.message_id), count(*), min(s.received_at),
    min(CASE WHEN NOT s.waits_not AND r.route <> ALL($1::text[]) THEN r.next_attempt END),
    (array_agg(DISTINCT r.message_id ORDER BY r.message_id))[1:$2]
FROM recipients r JOIN state s ON s.id = r.message_id
WHERE r.state = 'pending' GROUP BY s.state, r.route
"""


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


# -- the row <-> envelope mapping ------------------------------------------------------------------------
def _encode(envelope: Envelope) -> tuple[str, tuple[Any, ...]]:
    """The envelope's JSON for `messages.envelope` (fields without a column), and the recipients as
    column arrays for _INSERT_RECIPIENTS ($2...$13)."""
    data = _without_nul(envelope.to_json())
    recipients: list[dict[str, Any]] = data.pop("recipients")
    for key in _MESSAGE_COLUMNS:
        data.pop(key)
    columns: dict[str, list[Any]] = {key: [] for key in _RECIPIENT_COLUMNS}
    rest: list[str] = []
    for rcpt in recipients:
        for key in _RECIPIENT_COLUMNS:
            columns[key].append(rcpt.pop(key))
        rest.append(_json(rcpt))
    arrays = (
        list(range(len(recipients))),
        columns["address"],
        [domain_of(address) for address in columns["address"]],
        columns["state"],
        columns["notified"],
        [float(t) for t in columns["next_attempt"]],
        columns["attempts"],
        columns["route"],
        columns["last_reply"],
        columns["status"],
        columns["remote_mta"],
        rest,
    )
    return _json(data), arrays


def _decode(row: Any, recipients: list[Any]) -> Envelope:
    """Rebuild the envelope from its rows (raises ValueError/KeyError/TypeError when malformed)."""
    data: dict[str, Any] = json.loads(row["envelope"])
    for key in _MESSAGE_COLUMNS:
        data[key] = row[key]
    rcpts = []
    for r in recipients:
        rcpt: dict[str, Any] = json.loads(r["data"])
        for key in _RECIPIENT_COLUMNS:
            rcpt[key] = r[key]
        rcpts.append(rcpt)
    data["recipients"] = rcpts
    return Envelope.from_json(data)


def _retry_payload(links: frozenset[str] | None) -> str:
    """The NOTIFY payload: "" (just wake up), or the forced links for the nodes' backoff."""
    if links is None:
        return ""
    text = RETRY_PREFIX + _json(sorted(_text(link) for link in links))
    return text if len(text.encode()) <= RETRY_PAYLOAD_MAX else RETRY_PREFIX + "*"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL, nor UTF-8 a lone surrogate; a text with one must not make put or
    save fail forever (the driver's UnicodeEncodeError is no QueueError), so each becomes U+FFFD."""
    value = value.replace("\x00", "\ufffd")
    if value.isascii():
        return value
    try:
        value.encode()
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, dict):
        return {_text(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nul(v) for v in value]
    return value


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
