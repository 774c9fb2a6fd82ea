"""The local file spool: `queue/<id>.eml` (the message) + `queue/<id>.env` (the JSON envelope).

Commit protocol (the durability argument, see docs/architecture.md):
  put:      the .eml written into queue/ (a large one was streamed to tmp/ and is renamed in), then the
            envelope as queue/<id>.pending, carrying the size and CRC-32 of what it commits; one round
            fsyncs the files and queue/ side by side; then the .pending is renamed to .env (for the
            running service: that rename needs no sync of its own, recovery redoes it). A message exists
            when its .env exists, or its .pending is whole and the files match its checksum.
  save:     write+fsync tmp/<id>.env, rename over queue/<id>.env, fsync queue/.
  complete: move queue/<id>.env out first (the message ceases to exist), then the .eml, fsync queue/.
            "Out" is into spare/, where new messages take their files from (queue/spares.py).
An Exchange XEXCH50 blob, when one came with the message, is `<id>.x50`, written and synced with the .eml.
Recovery at open: tmp/ is emptied (nothing there was acknowledged); a .pending that does not parse was cut
short before its sync, so it was never acknowledged: removed; a whole .pending whose files match is
renamed to .env, one whose files do not is moved to corrupt/ with an event; then a .eml or .x50 without
.env is a put that never finished or a completion that did, so it is removed; a .env that does not parse,
or lacks its .eml, is moved to corrupt/ with an event, never dropped silently and never blocking the rest.

Frozen links (the operator's "freeze this next hop") are queue state too: `queue/links.json`, written
atomically; a recipient on a frozen link is not due until the link is thawed (its message still accepts).

Each spool has an id (`queue/spool.id`, made at first open) that it stamps on every envelope it writes. An
envelope that carries another id was copied in from another server's queue (KB306043 "Queue to Queue"): at
open it is adopted, its pending recipients due at once (their retry times were the other server's), and
listed in `adopted`.

One process owns a spool at a time (an exclusive lock on queue/.lock); the in-memory index of due times is
rebuilt from the .env files at every start, so the files stay the single truth.

`LocalSpool` keeps its synchronous, in-memory reading API (`lease`, `get`, `list`, `next_due`); `LocalStore`
adapts it to the async `QueueStore` interface the pipeline uses (thin wrappers: no thread hop, no copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, BinaryIO

from smtpsvc.model import Envelope, new_queue_id
from smtpsvc.queue.base import Claim, MessageWriter, QueueError, QueueLocked, Rescheduled
from smtpsvc.queue.commit import Commit, GroupCommitter
from smtpsvc.queue.spares import FILE_MODE, SparePool
from smtpsvc.safeio import fsync_dir, publish, write_new, write_synced

try:  # POSIX advisory locking; Windows gets msvcrt below
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

WRITE_BUFFER = 256 * 1024
MEMORY_LIMIT = 256 * 1024  # a message up to this size is held in memory until its commit
WORKERS_LOCK = ".workers.lock"  # shared by the running SMTP workers; exclusive during recovery
WORKERS_GONE_TIMEOUT = 30.0  # how long a start waits for an earlier run's SMTP workers to finish
UPDATE_BATCH = 256  # operator changes to many messages written at once (the committer's largest batch)


class SpoolWriter:
    """A message being received. Small messages stay in memory and are written straight into queue/ at
    their commit; past MEMORY_LIMIT the bytes go to tmp/<id>.eml through plain buffered writes
    (page-cache speed), renamed into queue/ and fsynced at commit. The CRC-32 the commit records is
    computed on the way."""

    def __init__(self, spool: LocalSpool, queue_id: str) -> None:
        self._spool = spool
        self._id = queue_id
        self._memory: bytearray | None = bytearray()
        self._file: IO[bytes] | None = None
        self._crc = 0  # of the bytes already in the file (a streamed message)
        self._blob = b""
        self._closed = False
        self._size = 0

    @property
    def id(self) -> str:
        return self._id

    @property
    def path(self) -> Path:
        """Where a streamed message is written until its commit (made when needed)."""
        return self._spool.tmp_dir / f"{self._id}.eml"

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if self._closed:
            raise QueueError("message writer already closed")
        try:
            if self._memory is not None:
                if len(self._memory) + len(data) <= MEMORY_LIMIT:
                    self._memory += data
                    self._size += len(data)
                    return
                self._file = open(self.path, "xb", buffering=WRITE_BUFFER)  # noqa: SIM115
                self._file.write(self._memory)
                self._crc = zlib.crc32(self._memory)
                self._memory = None
            assert self._file is not None
            self._file.write(data)
        except OSError as exc:
            self.abort()
            raise QueueError(f"cannot write queue file: {exc.strerror}") from exc
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)

    def attach_xexch50(self, blob: bytes) -> None:
        """Keep an Exchange XEXCH50 blob with the message: queue/<id>.x50, committed with it."""
        if self._closed:
            raise QueueError("message writer already closed")
        self._blob = bytes(blob)

    def abort(self) -> None:
        self._closed = True
        self._memory = None
        self._blob = b""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                self.path.unlink()

    def _detach(self) -> tuple[IO[bytes] | bytes, int]:
        """For the commit: the open file (flushed), or the bytes still in memory, and the CRC-32 of the
        message followed by the XEXCH50 blob."""
        if self._closed:
            raise QueueError("message writer already closed")
        self._closed = True
        if self._memory is not None:
            data, self._memory = bytes(self._memory), None
            return data, zlib.crc32(self._blob, zlib.crc32(data))
        assert self._file is not None
        self._file.flush()
        handle, self._file = self._file, None
        return handle, zlib.crc32(self._blob, self._crc)


class LocalSpool:
    def __init__(self, root: Path, on_corrupt: Callable[[str, str], None] | None = None) -> None:
        self.dir = root
        self.tmp_dir = root / "tmp"
        self._dir_str = f"{root}{os.sep}"  # for the per-message commit path, which joins strings
        self.corrupt_dir = root / "corrupt"
        self.spares = SparePool(root / "spare")
        self._on_corrupt = on_corrupt or (lambda name, reason: None)
        self._committer = GroupCommitter()
        self._envelopes: dict[str, Envelope] = {}
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._leased: set[str] = set()
        self._lock_file: IO[bytes] | None = None
        self._frozen_links: frozenset[str] = frozenset()
        self.spool_id = ""
        self.adopted: list[str] = []  # ids copied in from another spool, found at open
        # Ids whose files exist but must not be (re)indexed from disk by `rescan`: being put by this
        # process, or being completed (forgotten, files not yet unlinked).
        self._putting: set[str] = set()
        self._completing: set[str] = set()
        self._update_seq = itertools.count()  # tells concurrent updates' temporary files apart

    # -- lifecycle -----------------------------------------------------------------------------------
    def open(self) -> None:
        """Create folders, take the spool lock, recover from any crash and index what is queued."""
        for d in (self.dir, self.tmp_dir, self.corrupt_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            workers_gone = self._wait_for_old_workers()
        except (QueueError, OSError):
            self.close()
            raise
        try:
            self._recover()
        finally:
            if workers_gone is not None:
                workers_gone.close()

    def _wait_for_old_workers(self) -> IO[bytes] | None:
        """Recovery must not run while SMTP workers of an earlier run still commit into this queue: when
        their main process dies, they finish the transactions under way (and acknowledge them) before
        they stop. Each worker holds a shared lock on queue/.workers.lock for its life; recovery takes it
        exclusively, waiting for them to be gone. Returns the held lock, to release after recovery."""
        if fcntl is None:  # pragma: no cover - Windows has no SMTP workers
            return None
        handle = open(self.dir / WORKERS_LOCK, "a+b")  # noqa: SIM115 - closed by open() after recovery
        deadline = time.monotonic() + WORKERS_GONE_TIMEOUT
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return handle
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.close()
                    raise QueueError(
                        f"SMTP worker processes of an earlier run still use {self.dir} after "
                        f"{WORKERS_GONE_TIMEOUT:g}s; stop them (pgrep -af 'smtpsvc serve --worker-fd') "
                        "and start again"
                    ) from None
                time.sleep(0.05)  # they stop within their grace period (10 s) once their parent is gone

    def _recover(self) -> None:
        """What a crash left is settled (module docstring), then the queue indexed; both locks held."""
        self._frozen_links = self._read_links()
        self.spool_id = self._read_or_make_id()
        for leftover in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                leftover.unlink()
        self.spares.clear()
        promoted = self._settle_pending()
        envs = {p.stem for p in self.dir.glob("*.env")}
        for orphan in [*self.dir.glob("*.eml"), *self.dir.glob("*.x50")]:
            if orphan.stem not in envs:
                with contextlib.suppress(OSError):
                    orphan.unlink()
        now = time.time()
        for stem in sorted(envs):
            envelope = self._load(stem)
            if envelope is None:
                continue
            if envelope.spool != self.spool_id:
                self._adopt(envelope, now)
            self._index(envelope)
        if self.adopted or promoted:
            fsync_dir(self.dir)

    def _settle_pending(self) -> bool:
        """Settle the puts a crash caught in their commit: True when one of them became a queued message."""
        promoted = False
        for path in sorted(self.dir.glob("*.pending")):
            stem = path.stem
            if (self.dir / f"{stem}.env").exists():
                path.unlink()  # cannot happen (the rename is atomic); the .env is the later word
                continue
            try:
                envelope = Envelope.from_json(json.loads(path.read_bytes()))
                if envelope.id != stem:
                    raise ValueError("another id")
            except OSError as exc:
                self._move_aside(stem, f"{path.name} is unreadable: {exc.strerror or exc}")
                continue
            except (ValueError, KeyError, TypeError):
                # Not whole, so its fsync never finished and no 250 was sent: as if it were in tmp/.
                # Its .eml and .x50 are orphans now, removed with the others.
                path.unlink()
                continue
            problem = self._mismatch(envelope)
            if problem:
                # Whole yet not matching its files: a commit cut off by a power loss (its 250 was never
                # sent, but the service cannot prove it) or a damaged disk; the operator decides.
                self._move_aside(stem, f"{problem} (a commit interrupted by a crash, or disk damage)")
                continue
            os.replace(path, self.dir / f"{stem}.env")  # synced, and might have been acknowledged
            promoted = True
        return promoted

    def _mismatch(self, envelope: Envelope) -> str:
        """What is wrong with the files a .pending commits, or "" when their size and CRC-32 match it."""
        crc, size = 0, 0
        try:
            with open(self.dir / f"{envelope.id}.eml", "rb") as message:
                while chunk := message.read(WRITE_BUFFER):
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
            blob = (self.dir / f"{envelope.id}.x50").read_bytes() if envelope.xexch50 else b""
        except FileNotFoundError as exc:
            return f"{Path(str(exc.filename)).name} is missing"
        except OSError as exc:
            return f"{Path(str(exc.filename)).name} is unreadable: {exc.strerror or exc}"
        if size != envelope.size:
            return f"the message file has {size} bytes, its envelope says {envelope.size}"
        if len(blob) != envelope.xexch50 or zlib.crc32(blob, crc) != envelope.crc32:
            return "the message files do not match the envelope's CRC-32"
        return ""

    def _adopt(self, envelope: Envelope, now: float) -> None:
        for rcpt in envelope.pending:
            rcpt.next_attempt = min(rcpt.next_attempt, now)
        envelope.spool = self.spool_id
        tmp = self.tmp_dir / f"{envelope.id}.env.adopt"
        write_synced(tmp, _encode(envelope), FILE_MODE)
        os.replace(tmp, self.dir / f"{envelope.id}.env")
        self.adopted.append(envelope.id)

    def _read_or_make_id(self) -> str:
        path = self.dir / "spool.id"
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            text = ""
        if text:
            return text
        text = uuid.uuid4().hex
        tmp = self.tmp_dir / "spool.id"
        write_synced(tmp, text.encode() + b"\n", FILE_MODE)
        publish(tmp, path)
        return text

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def drain(self) -> None:
        await self._committer.close()

    def _lock(self) -> None:
        self._lock_file = open(self.dir / ".lock", "a+b")  # noqa: SIM115 - held for the process's life
        try:
            if fcntl is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:  # pragma: no cover - Windows
                import msvcrt

                msvcrt.locking(self._lock_file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError as exc:
            self._lock_file.close()
            self._lock_file = None
            raise QueueLocked(f"the queue folder {self.dir} is in use by another smtpsvc process") from exc

    def _load(self, stem: str, payload: bytes | None = None) -> Envelope | None:
        """The envelope of queue/<stem>.env (its bytes in `payload` when the caller read them), or None
        when it is unusable: then its files are moved aside and reported."""
        # Strings, not Path objects: every message a worker commits comes through here.
        try:
            if payload is None:
                payload = _read(f"{self._dir_str}{stem}.env")
            envelope = Envelope.from_json(json.loads(payload))
            if envelope.id != stem:
                raise ValueError(f"envelope id {envelope.id!r} does not match its file name")
            if not os.path.exists(f"{self._dir_str}{stem}.eml"):
                raise ValueError("message file (.eml) is missing")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._move_aside(stem, str(exc) or type(exc).__name__)
            return None
        return envelope

    def _move_aside(self, stem: str, reason: str) -> None:
        for suffix in (".env", ".pending", ".eml", ".x50"):
            src = self.dir / f"{stem}{suffix}"
            if src.exists():
                with contextlib.suppress(OSError):
                    shutil.move(str(src), str(self.corrupt_dir / src.name))
        self._on_corrupt(stem, reason)

    # -- writing -------------------------------------------------------------------------------------
    def create_writer(self) -> SpoolWriter:
        try:
            return SpoolWriter(self, new_queue_id())
        except OSError as exc:
            raise QueueError(f"cannot create queue file: {exc.strerror}") from exc

    async def put(self, writer: MessageWriter, envelope: Envelope) -> None:
        self._putting.add(envelope.id)  # its .env appears before it is indexed: rescan must not take it
        try:
            await self._put(writer, envelope)
        finally:
            self._putting.discard(envelope.id)

    async def _put(self, writer: MessageWriter, envelope: Envelope) -> None:
        if not isinstance(writer, SpoolWriter) or envelope.id != writer.id:
            raise ValueError("envelope and writer ids differ")
        blob = writer._blob
        body, envelope.crc32 = writer._detach()
        envelope.size = writer.size
        envelope.spool = self.spool_id
        payload = _encode(envelope)
        # Plain strings on this path, every message takes it (pathlib costs a few microseconds a join).
        final, stem = self._dir_str, envelope.id
        eml, pending = f"{final}{stem}.eml", f"{final}{stem}.pending"
        fds: list[int] = []
        try:
            # The writes go to the page cache here, on the loop; the committer fsyncs them in threads.
            # The .pending last: once whole, it vouches for the files before it (recovery checks them).
            if isinstance(body, bytes):
                fds.append(self.spares.write(eml, body))
            else:
                body.close()  # flushed by _detach; an fd of our own is enough to fsync it
                os.replace(writer.path, eml)
                fds.append(os.open(eml, os.O_RDONLY))
            if blob:
                fds.append(write_new(f"{final}{stem}.x50", blob, FILE_MODE))
            fds.append(self.spares.write(pending, payload))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self._discard(writer)
            raise QueueError(f"cannot commit queue file: {exc.strerror}") from exc

        def publish() -> None:  # durable already (see open): the .env is the name the service works with
            os.replace(pending, f"{final}{stem}.env")

        try:
            await self._committer.run(Commit(fds, publish, created_in=(self.dir,)))
        except OSError as exc:
            self._discard(writer)
            raise QueueError(f"cannot commit queue file: {exc.strerror}") from exc
        self._index(envelope)

    def _discard(self, writer: SpoolWriter) -> None:
        """A put that failed leaves nothing behind, in tmp/ or in queue/."""
        queued = [self.dir / f"{writer.id}{suffix}" for suffix in (".pending", ".env", ".x50", ".eml")]
        for path in (writer.path, *queued):
            with contextlib.suppress(OSError):
                path.unlink()

    async def save(self, envelope: Envelope) -> None:
        envelope.spool = self.spool_id
        try:
            await self._replace(self.dir / f"{envelope.id}.env", _encode(envelope), f"{envelope.id}.env.new")
        finally:
            self._leased.discard(envelope.id)
        self._index(envelope)

    async def _replace(
        self, final: Path, payload: bytes, tmp_name: str, unless: Callable[[], bool] | None = None
    ) -> None:
        """Atomically replace `final` with `payload` (write, fsync, rename, directory fsync). With `unless`,
        the rename is skipped when it says so at that moment."""
        tmp = self.tmp_dir / tmp_name
        try:
            fd = write_new(tmp, payload, FILE_MODE)
        except OSError as exc:
            raise QueueError(f"cannot update {final.name}: {exc.strerror}") from exc

        def publish() -> None:
            if unless is not None and unless():
                os.unlink(tmp)
                return
            os.replace(tmp, final)

        try:
            await self._committer.run(Commit([fd], publish, (self.dir,)))
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise QueueError(f"cannot update {final.name}: {exc.strerror}") from exc

    async def update(self, envelope: Envelope, *, index: bool = True) -> None:
        """Persist an operator's change (freeze, thaw, retry) without touching the lease: a message being
        delivered keeps its lease, and the delivery's own save later carries the change. The due index is
        updated before the write, so the scheduler never leases a message on the state it had before;
        `index=False` leaves that to the caller (`reschedule` once the write is done)."""
        if envelope.id not in self._envelopes:
            return  # completed meanwhile (delivered, or deleted by another request)
        if index and envelope.id not in self._leased:
            self._index(envelope)
        envelope.spool = self.spool_id
        final = self.dir / f"{envelope.id}.env"
        payload = _encode(envelope)
        # completed meanwhile: a stale write must not bring it back
        # A temporary name of its own: two changes to one message may be in flight at once (two ETRNs),
        # and each renames its own file; the later one, encoded later, lands last.
        tmp_name = f"{envelope.id}.env.admin{next(self._update_seq)}"
        await self._replace(final, payload, tmp_name, unless=lambda: not final.exists())

    async def complete(self, queue_id: str) -> None:
        known = self._envelopes.get(queue_id)
        stem = f"{self._dir_str}{queue_id}"
        # The .env first: once it is gone the message no longer exists. The files go to the spare pool.
        paths: list[tuple[str, int | None]] = [(f"{stem}.env", None)]
        if known is None:
            paths += [(f"{stem}.eml", None), (f"{stem}.x50", None)]
        else:
            paths.append((f"{stem}.eml", known.size))
            if known.xexch50:
                paths.append((f"{stem}.x50", known.xexch50))
        retired: list[str] = []

        def retire() -> None:
            retired.extend(self.spares.retire(paths))

        self._completing.add(queue_id)
        self._forget(queue_id)
        try:
            await self._committer.run(Commit((), retire, (self.dir,)))
        finally:
            self._completing.discard(queue_id)
        self.spares.release(retired)  # their removal from queue/ is durable now: they may be reused

    # -- messages committed by the SMTP worker processes (server.workers) ----------------------------
    def adopt_new(self, queue_id: str) -> Envelope | None:
        """Index a message another process of this service committed into queue/ (an SMTP worker tells
        us its id after its commit). Unknown, unreadable or already indexed ids are ignored."""
        if queue_id in self._envelopes or queue_id in self._completing or queue_id in self._putting:
            return None
        if "/" in queue_id:
            return None
        try:
            payload = _read(f"{self._dir_str}{queue_id}.env")
        except FileNotFoundError:
            return None  # completed meanwhile, or a notice for nothing
        except OSError:
            payload = None  # unreadable: _load reads it again and reports it
        envelope = self._load(queue_id, payload)
        if envelope is not None:
            self._index(envelope)
        return envelope

    def rescan(self) -> list[str]:
        """Index the .env files nobody told us about (a worker that died between its commit and its
        notice); returns their ids."""
        return [path.stem for path in self.dir.glob("*.env") if self.adopt_new(path.stem) is not None]

    # -- scheduling ----------------------------------------------------------------------------------
    def _index(self, envelope: Envelope) -> None:
        self._envelopes[envelope.id] = envelope
        due = envelope.next_due(self._frozen_links)
        if due is None or envelope.frozen:
            self._due.pop(envelope.id, None)
            return
        self._due[envelope.id] = due
        heapq.heappush(self._heap, (due, envelope.id))

    def _forget(self, queue_id: str) -> None:
        self._envelopes.pop(queue_id, None)
        self._due.pop(queue_id, None)
        self._leased.discard(queue_id)

    def lease(self, now: float, limit: int) -> list[Envelope]:
        out: list[Envelope] = []
        while self._heap and len(out) < limit and self._heap[0][0] <= now:
            due, queue_id = heapq.heappop(self._heap)
            if self._due.get(queue_id) != due or queue_id in self._leased:
                continue  # stale heap entry: the envelope was re-indexed since
            if self._envelopes[queue_id].frozen:
                self._due.pop(queue_id)  # frozen by an operator since it was indexed
                continue
            self._due.pop(queue_id)
            self._leased.add(queue_id)
            out.append(self._envelopes[queue_id])
        return out

    def release(self, queue_id: str) -> None:
        self._leased.discard(queue_id)
        envelope = self._envelopes.get(queue_id)
        if envelope is not None:
            self._index(envelope)

    def reschedule(self, queue_id: str) -> None:
        """Re-read the due time of a message whose state was changed in memory (an operator's change, once
        written; a freeze whose write failed, put back). A leased message is left alone: its delivery is
        under way."""
        envelope = self._envelopes.get(queue_id)
        if envelope is not None and queue_id not in self._leased:
            self._index(envelope)

    def next_due(self) -> float | None:
        while self._heap:
            due, queue_id = self._heap[0]
            if self._due.get(queue_id) == due and queue_id not in self._leased:
                return due
            heapq.heappop(self._heap)
        return None

    # -- frozen links -------------------------------------------------------------------------------
    @property
    def frozen_links(self) -> frozenset[str]:
        return self._frozen_links

    async def set_link_frozen(self, link: str, frozen: bool) -> None:
        """Freeze or thaw a next hop for every message queued for it, now and later (persisted)."""
        links = self._frozen_links | {link} if frozen else self._frozen_links - {link}
        payload = json.dumps({"frozen": sorted(links)}).encode()
        await self._replace(self.dir / "links.json", payload, "links.json.new")
        self._frozen_links = frozenset(links)
        for queue_id, envelope in self._envelopes.items():
            if queue_id not in self._leased:
                self._index(envelope)

    def _read_links(self) -> frozenset[str]:
        try:
            data = json.loads((self.dir / "links.json").read_bytes())
            return frozenset(str(link) for link in data.get("frozen", []))
        except FileNotFoundError:
            return frozenset()
        except (ValueError, AttributeError, TypeError) as exc:
            self._on_corrupt("links.json", f"not valid JSON ({exc}); no link is frozen")
            return frozenset()

    # -- reading -------------------------------------------------------------------------------------
    def get(self, queue_id: str) -> Envelope | None:
        return self._envelopes.get(queue_id)

    def list(self) -> list[Envelope]:
        return sorted(self._envelopes.values(), key=lambda e: e.id)

    def count(self) -> int:
        return len(self._envelopes)

    def open_message(self, queue_id: str) -> BinaryIO:
        return open(f"{self._dir_str}{queue_id}.eml", "rb")

    def xexch50_blob(self, queue_id: str) -> bytes | None:
        """The XEXCH50 blob received with the message, or None."""
        try:
            return (self.dir / f"{queue_id}.x50").read_bytes()
        except FileNotFoundError:
            return None

    def message_path(self, queue_id: str) -> Path:
        return self.dir / f"{queue_id}.eml"

    def envelopes(self) -> Iterable[Envelope]:
        """Every queued envelope, in no order, without a copy: iterate it without awaiting in between."""
        return self._envelopes.values()

    @property
    def leased(self) -> frozenset[str]:
        return frozenset(self._leased)

    def is_leased(self, queue_id: str) -> bool:
        return queue_id in self._leased

    @property
    def commit_stats(self) -> tuple[int, int]:
        return self._committer.batches, self._committer.jobs


class LocalStore:
    """The local spool as a `QueueStore`: one node, no lease expiry, the in-memory index answers reads.

    An operator's change to a message being delivered (Force Connection, ResetMessageStatus) is remembered
    and applied when the delivery saves or releases it (the PostgreSQL backend's `rerun` flag): the
    delivery overwrites the recipients' next attempts with its own results, so the change must come after.
    """

    shared = False

    def __init__(self, spool: LocalSpool, node_id: str = "") -> None:
        self.spool = spool
        self._node_id = node_id
        self._wake = asyncio.Event()
        self._rerun: set[str] = set()  # changed by an operator while leased: due again at save/release

    @property
    def node_id(self) -> str:
        return self._node_id

    async def close(self) -> None:
        await self.spool.drain()
        self.spool.close()

    # -- intake --------------------------------------------------------------------------------------
    def create_writer(self) -> MessageWriter:
        return self.spool.create_writer()

    async def put(self, writer: MessageWriter, envelope: Envelope) -> None:
        await self.spool.put(writer, envelope)

    # -- delivery ------------------------------------------------------------------------------------
    async def claim(self, now: float, limit: int) -> list[Claim]:
        return [Claim(envelope) for envelope in self.spool.lease(now, limit)]

    async def next_due(self) -> float | None:
        return self.spool.next_due()

    def wake(self) -> None:
        self._wake.set()

    async def wait_for_work(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self._wake.clear()
        return True

    async def save(self, envelope: Envelope) -> None:
        self._apply_rerun(envelope)
        await self.spool.save(envelope)
        if envelope.id in self._rerun:  # asked while that write was under way: the message is still due
            self._apply_rerun(envelope)
            await self.spool.update(envelope)

    async def release(self, queue_id: str) -> bool:
        if not self.spool.is_leased(queue_id):
            return False
        envelope = self.spool.get(queue_id)
        if envelope is not None:
            self._apply_rerun(envelope)
        self.spool.release(queue_id)
        return True

    def abandon(self, queue_id: str) -> None:
        # The envelope in memory carries the caller's new next attempts; releasing re-indexes by them.
        self.spool.release(queue_id)

    def _apply_rerun(self, envelope: Envelope) -> None:
        if envelope.id in self._rerun:
            self._rerun.discard(envelope.id)
            now = time.time()
            for rcpt in envelope.pending:
                rcpt.next_attempt = min(rcpt.next_attempt, now)

    async def complete(self, queue_id: str) -> None:
        self._rerun.discard(queue_id)
        await self.spool.complete(queue_id)

    async def open_message(self, queue_id: str) -> BinaryIO:
        try:
            return self.spool.open_message(queue_id)
        except OSError as exc:
            raise QueueError(f"cannot read the queued message {queue_id}: {exc.strerror or exc}") from exc

    async def xexch50_blob(self, queue_id: str) -> bytes | None:
        return self.spool.xexch50_blob(queue_id)

    def link_slot(self, link: str, limit: int) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()  # one node: the scheduler's per-link semaphore is the limit

    # -- reading -------------------------------------------------------------------------------------
    async def get(self, queue_id: str) -> Envelope | None:
        return self.spool.get(queue_id)

    async def list(self) -> list[Envelope]:
        return self.spool.list()

    async def count(self) -> int:
        return self.spool.count()

    async def holders(self) -> dict[str, str]:
        return dict.fromkeys(self.spool.leased, self._node_id)

    def recent(self, queue_id: str) -> Envelope | None:
        return self.spool.get(queue_id)

    async def frozen_links(self) -> frozenset[str]:
        return self.spool.frozen_links

    # -- operator verbs ------------------------------------------------------------------------------
    async def set_frozen(self, queue_id: str, frozen: bool) -> Envelope | None:
        envelope = self.spool.get(queue_id)
        if envelope is None:
            return None
        # A leased message: its delivery's save writes the change too (the same object).
        previous, envelope.frozen = envelope.frozen, frozen
        try:
            await self.spool.update(envelope)
        except QueueError:
            envelope.frozen = previous  # not written: as it was, in memory too
            self.spool.reschedule(envelope.id)
            raise
        return envelope

    async def make_due(
        self, now: float, queue_id: str = "", domain: str = "", subdomains: bool = False
    ) -> Rescheduled:
        domain = domain.rstrip(".").lower()
        chosen = [self.spool.get(queue_id)] if queue_id else list(self.spool.envelopes())
        count, links, changed = 0, set[str](), list[Envelope]()
        for envelope in chosen:
            if envelope is None or envelope.frozen:
                continue
            touched = [r for r in envelope.pending if _at_domain(r.domain, domain, subdomains)]
            if not touched:
                continue
            count += 1
            links.update(r.route for r in touched)
            if self.spool.is_leased(envelope.id):
                self._rerun.add(envelope.id)  # not under its delivery's feet: its save makes them due
                continue
            for rcpt in touched:
                rcpt.next_attempt = now
            changed.append(envelope)
        await self._update_many(changed)
        return Rescheduled(count, frozenset(links))

    async def recategorize(
        self,
        route_of: Callable[[str], str],
        now: float,
        *,
        queue_id: str = "",
        changed_only: Callable[[str], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Rescheduled:
        ids = [queue_id] if queue_id else [envelope.id for envelope in self.spool.envelopes()]
        count, links = 0, set[str]()
        for start in range(0, len(ids), UPDATE_BATCH):  # routing a batch, then writing it, frees the loop
            changed: list[Envelope] = []
            for envelope in filter(None, map(self.spool.get, ids[start : start + UPDATE_BATCH])):
                if envelope.frozen:
                    continue
                touched = [r for r in envelope.pending if changed_only is None or changed_only(r.address)]
                if not touched:
                    continue
                count += 1
                routes = [route_of(rcpt.address) for rcpt in touched]
                links.update(routes)
                if self.spool.is_leased(envelope.id):
                    self._rerun.add(envelope.id)  # its delivery routes every recipient again anyway
                    continue
                for rcpt, link in zip(touched, routes, strict=True):
                    rcpt.route, rcpt.next_attempt = link, now
                changed.append(envelope)
            await self._update_many(changed)
            if progress is not None:
                progress(min(start + UPDATE_BATCH, len(ids)), len(ids))
        return Rescheduled(count, frozenset(links))

    async def _update_many(self, envelopes: Sequence[Envelope]) -> None:
        """Persist an operator's change to many messages, UPDATE_BATCH at a time (updates in flight together
        share the committer's fsync rounds), and only then index their new due times, all at once and
        without a pause: nothing made due is claimed before the caller gets control back, so a caller
        that lifts a destination's backoff right after loses no race to a delivery pass that would
        postpone the message again for the destination it is about to lift."""
        try:
            for start in range(0, len(envelopes), UPDATE_BATCH):
                batch = envelopes[start : start + UPDATE_BATCH]
                await asyncio.gather(*(self.spool.update(e, index=False) for e in batch))
        finally:
            for envelope in envelopes:
                self.spool.reschedule(envelope.id)

    async def delete(self, queue_id: str) -> bool:
        if self.spool.get(queue_id) is None:
            return False
        await self.complete(queue_id)
        return True

    async def set_link_frozen(self, link: str, frozen: bool) -> None:
        await self.spool.set_link_frozen(link, frozen)


def _at_domain(rcpt_domain: str, domain: str, subdomains: bool) -> bool:
    """Is a recipient's domain the one asked ("" = any), or with `subdomains` one of its subdomains?"""
    return not domain or rcpt_domain == domain or (subdomains and rcpt_domain.endswith("." + domain))


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as file:
        return file.read()


def _encode(envelope: Envelope) -> bytes:
    # "backslashreplace" writes a lone surrogate (which UTF-8 cannot hold) as the JSON escape \udXXX,
    # so json.loads gives it back as it was, instead of the write failing with a UnicodeEncodeError.
    text = json.dumps(envelope.to_json(), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")
