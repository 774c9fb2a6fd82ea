"""The local file spool: `queue/<id>.eml` (the message) + `queue/<id>.env` (the JSON envelope).

Commit protocol (the durability argument, see docs/architecture.md):
  put:      the .eml written into queue/incoming/ (a large one was streamed to tmp/ and is renamed in),
            then the envelope as incoming/<id>.pending, carrying the size and CRC-32 of what it commits;
            one round fsyncs the files and incoming/ side by side; then the files are renamed into queue/,
            the .pending last, as <id>.env (for the running service: those renames need no sync of their
            own, recovery redoes them). A message exists when its .env exists, or its .pending is whole and
            the files match its checksum.
  save:     write+fsync tmp/<id>.env, rename over queue/<id>.env, fsync queue/.
  complete: move queue/<id>.env out first (the message ceases to exist), then the .eml, fsync queue/.
            "Out" is into spare/, where new messages take their files from (queue/spares.py).
An Exchange XEXCH50 blob, when one came with the message, is `<id>.x50`, written and synced with the .eml.

Recovery at open, before anything else writes: tmp/ is emptied (nothing there was acknowledged); in incoming/
(only what was in flight: small), a .pending that does not parse was cut short before its sync, so it was
never acknowledged: removed with its files; a whole .pending whose files match is published, one whose files
do not, or that is JSON of the wrong shape, is moved to corrupt/ with an event; files without a .pending are
finished (their .env is in queue/) or removed (a put that never got that far). Then the queue is indexed: at
once for a tool, in the background for the service (`recover`), which takes mail meanwhile. The .env files are
read in a thread; one that does not parse (not an object, nested too deep, a field of the wrong type, over 64
MB, ...) or lacks its .eml is moved to corrupt/ with an event, never dropped silently and never blocking the
rest (a field the index does not need is checked at the envelope's first full read instead: a lease, a tool);
a .eml or .x50 without .env is removed when it is the rest of a completion a crash cut short (its other files
are in spare/ at the start), else moved to corrupt/ with an event. A .eml that cannot be opened later (a
delivery) is moved aside too, once (`MessageSetAside`), not retried.

Memory does not grow with the size of the envelopes: per queued message the spool keeps its id, its due
time (`queue/index.py`) and its shape (frozen, tried, pending recipients per link: what the summaries
count, shared by the many messages that look alike), about 250 bytes. Envelopes stay on disk and are read
when needed; those in use (leased, being changed) and the CACHE_LIMIT most recently used are in memory.

Frozen links (the operator's "freeze this next hop") are queue state too: `queue/links.json`, written
atomically; a recipient on a frozen link is not due until the link is thawed (its message still accepts).
So is a Force Connection of the whole queue (`queue retry --all`): `queue/forced.json` holds its time, and
every pending recipient not tried since then is due at that time, whatever its envelope says, until its
next attempt: one durable write for a queue of any size, instead of rewriting every envelope (Postfix's
`postqueue -f` rewrites none either).

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
import builtins
import contextlib
import errno
import heapq
import itertools
import json
import os
import shutil
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from smtpsvc.diskspace import SpaceWatcher, is_full
from smtpsvc.model import NO_LINK, QUEUE_STATES, Envelope, RecipientState, new_queue_id, queue_status_of
from smtpsvc.queue.base import (
    SAMPLE_IDS,
    Claim,
    LinkStats,
    MessageSetAside,
    MessageWriter,
    QueueError,
    QueueLocked,
    QueueSummary,
    Rescheduled,
)
from smtpsvc.queue.commit import Commit, GroupCommitter, Lingering
from smtpsvc.queue.index import DueIndex
from smtpsvc.queue.spares import FILE_MODE, SparePool
from smtpsvc.safeio import publish, write_new, write_synced

try:  # POSIX advisory locking; Windows gets msvcrt below
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

WRITE_BUFFER = 256 * 1024
MEMORY_LIMIT = 256 * 1024  # a message up to this size is held in memory until its commit
WORKERS_LOCK = ".workers.lock"  # shared by the running SMTP workers; exclusive during recovery
WORKERS_GONE_TIMEOUT = 30.0  # how long a start waits for an earlier run's SMTP workers to finish
UPDATE_BATCH = 256  # operator changes to many messages written at once (the committer's largest batch)
FORCED = "forced.json"  # the last Force Connection of the whole queue
INCOMING = "incoming"  # queue/incoming/: the files of puts being committed
CACHE_LIMIT = 5_000  # envelopes kept in memory besides those in use (a few MB)
RECOVERY_BATCH = 1000  # envelopes read by the recovery thread per batch handed to the loop
RECOVERY_AHEAD = 4  # batches the recovery thread may read ahead of the loop
# open() errors that say nothing about the file: a shortage of the moment, tried again later as usual
_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN, errno.ENOBUFS})
MAX_ENVELOPE_BYTES = 64 * 1024 * 1024  # a larger .env or .pending is damage, set aside unread
ORPHAN_MARGIN = 5.0  # a file without .env newer than the start minus this may be a put of this run

# What the summaries count of a message: (frozen, tried before, ((link, pending recipients), ...), a
# report still to make for a failed recipient).
Shape = tuple[bool, bool, tuple[tuple[str, int], ...], bool]


@dataclass(slots=True)
class _ShapeStats:
    ids: list[str] = field(default_factory=list)
    next_due: float = float("inf")


@dataclass(slots=True)
class _LinkTotals:
    messages: int = 0
    recipients: int = 0
    next_due: float = float("inf")
    states: set[str] = field(default_factory=set)
    ids: list[list[str]] = field(default_factory=list)


INFINITY = float("inf")
HEX_DIGITS = frozenset("0123456789ABCDEFabcdef")
SUMMARY_CHUNK = 20_000  # index entries looked at between two yields to the loop


@dataclass(frozen=True, slots=True)
class _Found:
    """A .env the recovery read: what the index keeps of it, or why it cannot be used."""

    id: str
    problem: str = ""
    shape: Shape | None = None
    due: float | None = None
    size: int = 0
    forced_at: float = 0.0  # the last Force Connection of the whole queue when it was read


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
            raise self._spool.failed("cannot write queue file", exc) from exc
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
        self.incoming_dir = root / INCOMING
        self._dir_str = f"{root}{os.sep}"  # for the per-message commit path, which joins strings
        self._incoming_str = f"{self.incoming_dir}{os.sep}"
        self.corrupt_dir = root / "corrupt"
        self.spares = SparePool(root / "spare")
        report = on_corrupt or (lambda name, reason: None)
        # A file name that is not UTF-8 (copied in from another system) reaches the event log escaped: a
        # lone surrogate there would make the log unwritable.
        self._on_corrupt: Callable[[str, str], None] = lambda name, reason: report(
            _shown(name), _shown(reason)
        )
        self._committer = GroupCommitter()
        self._lingering = Lingering(self._committer)  # completions: one sync of queue/ for many
        # Every queued message by id, with its shape (what the summaries count); its envelope stays on disk.
        self._known: dict[str, Shape] = {}
        self._shapes: dict[Shape, Shape] = {}  # interned: a queue of a million messages has a few shapes
        self._due = DueIndex()  # the messages with a due time: not frozen, not leased, not parked
        self._parked: set[str] = set()  # outstanding only on frozen links: indexed again at a thaw
        self._leased: set[str] = set()
        # Envelopes in memory: the ones in use (leased, being put or changed) and the most recent others,
        # at most CACHE_LIMIT of those (the active window), oldest use first.
        self._cache: dict[str, Envelope] = {}
        self._pinned: dict[str, Envelope] = {}
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self._lock_file: IO[bytes] | None = None
        self._frozen_links: frozenset[str] = frozenset()
        self._forced_at = 0.0  # the last Force Connection of the whole queue (queue/forced.json)
        self.spool_id = ""
        self.adopted: list[str] = []  # ids copied in from another spool, found at recovery
        self.set_aside = 0  # unusable files moved to corrupt/ at recovery
        # Ids whose files exist but must not be (re)indexed from disk: being put by this process, or
        # being completed (forgotten, files not yet gone), or gone during a background recovery.
        self._putting: set[str] = set()
        self._completing: set[str] = set()
        self._gone: set[str] | None = None  # while a background recovery runs
        self._started = 0.0  # when open() began: files newer than this may be another process's puts
        self._recovered: asyncio.Event | None = None  # set when the background recovery is over
        self._update_seq = itertools.count()  # tells concurrent updates' temporary files apart
        self._removals: set[asyncio.Future[None]] = set()  # completed messages' files being removed
        # A full disk: the watcher reports it (events 9010, 9011) and says when there is room again; then
        # the envelopes whose save failed for lack of space (kept in memory meanwhile, with the results of
        # their delivery) are written and due at once, not on the 5-minute internal-error schedule.
        self.space = SpaceWatcher()
        self.space.subscribe(self._space_back)
        self._unsaved: dict[str, Envelope] = {}
        self._rewriting: asyncio.Task[None] | None = None
        self._room_again = False  # the watcher saw room while the writes of the last time were under way
        self.wake: Callable[[], None] = lambda: None  # the scheduler's wake-up (set by LocalStore)
        self._retired: frozenset[str] = frozenset()  # ids with files in spare/ at the start (completions)
        self._aside: set[str] = set()  # ids moved to corrupt/ while running (open_message)

    # -- lifecycle -----------------------------------------------------------------------------------
    def open(self, *, scan: bool = True) -> None:
        """Create folders, take the spool lock, settle what a crash left in incoming/ and index the queue.
        `scan=False` leaves the indexing to `recover()` in the background (the service: it takes mail at
        once, whatever the size of the queue)."""
        self._started = time.time()
        for d in (self.dir, self.tmp_dir, self.corrupt_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            workers_gone = self._wait_for_old_workers()
        except (QueueError, OSError):
            self.close()
            raise
        try:
            self._frozen_links = self._read_links()
            self._forced_at = self._read_forced()
            self.spool_id = self._read_or_make_id()
            for leftover in self.tmp_dir.iterdir():
                with contextlib.suppress(OSError):
                    leftover.unlink()
            self._retired = self._retired_ids()  # before the pool is emptied: what completions had begun
            self.spares.clear()
            self._settle_incoming()
            if scan:
                for batch in self._scan():
                    self._take_batch(batch)
            else:  # recover() indexes the queue; what is put or completed meanwhile is known from now
                self._recovered = asyncio.Event()
                self._gone = set()
        finally:
            if workers_gone is not None:
                workers_gone.close()

    @property
    def recovering(self) -> bool:
        return self._recovered is not None and not self._recovered.is_set()

    async def recover(self, progress: Callable[[int], None] | None = None) -> None:
        """Index the queue in the background (after `open(scan=False)`): the .env files are read in a
        thread and indexed here, a batch at a time, while mail is taken and delivered; what is due
        is delivered as soon as it is indexed. `progress(messages indexed so far)` after each batch."""
        if self._recovered is None or self._gone is None:
            raise QueueError("recover() needs open(scan=False) first")
        loop = asyncio.get_running_loop()
        batches: asyncio.Queue[list[_Found] | None] = asyncio.Queue()
        room = threading.Semaphore(RECOVERY_AHEAD)  # batches read ahead of the loop, at most
        stop = threading.Event()

        def scan() -> None:
            try:
                for batch in self._scan(stop):
                    room.acquire()
                    loop.call_soon_threadsafe(batches.put_nowait, batch)
            finally:
                loop.call_soon_threadsafe(batches.put_nowait, None)

        thread = loop.run_in_executor(None, scan)
        try:
            while (batch := await batches.get()) is not None:
                room.release()
                self._take_batch(batch)
                if progress is not None:
                    progress(len(self._known))
            await thread
        finally:
            stop.set()
            for _ in range(RECOVERY_AHEAD):
                room.release()  # a scan waiting for room sees the stop
            self._gone = None
            self._recovered.set()

    async def recovered(self) -> None:
        """Return once the queue is fully indexed (at once when it is)."""
        if self._recovered is not None:
            await self._recovered.wait()

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

    # -- recovery ------------------------------------------------------------------------------------
    def _settle_incoming(self) -> None:
        """The puts a crash caught in their commit (incoming/, small: only what was in flight). Run at every
        start before anything else writes, so it needs no care for puts of this run."""
        names = sorted(os.listdir(self.incoming_dir))
        stems = {name.rsplit(".", 1)[0] for name in names}
        for stem in sorted(stems):
            pending = self.incoming_dir / f"{stem}.pending"
            if pending.exists():
                problem = self._settle_pending(pending, stem)
                if problem:
                    self._move_aside(stem, problem)
                    self.set_aside += 1
            elif (self.dir / f"{stem}.env").exists():
                self._finish_publish(stem)  # the .env made it into queue/ and a file did not
            else:
                for suffix in (".eml", ".x50"):  # a put that never finished: never acknowledged
                    with contextlib.suppress(OSError):
                        (self.incoming_dir / f"{stem}{suffix}").unlink()

    def _settle_pending(self, path: Path, stem: str) -> str:
        """One .pending a crash left: whole and matching its files, it is published (it may have been
        acknowledged); cut short, it was never acknowledged and goes; whole but not matching, the reason is
        returned, for the caller to move it aside. Also takes an older version's queue/<id>.pending."""
        if (self.dir / f"{stem}.env").exists():
            path.unlink()  # cannot happen (the rename is atomic); the .env is the later word
            self._finish_publish(stem)
            return ""
        try:
            envelope = _envelope_from(_read(str(path)))
            if envelope.id != stem:
                raise ValueError(f"{path.name} holds the envelope of {envelope.id!r}, another message")
        except OSError as exc:
            return f"{path.name} is unreadable: {exc.strerror or exc}"
        except (ValueError, KeyError, TypeError) as exc:
            if not isinstance(exc, _NotJson):
                # Whole JSON of the wrong shape is not a write cut short (that leaves no JSON at all): the
                # file was damaged or put there by hand; it may stand for acknowledged mail, so set aside.
                return f"{path.name} is not an envelope: {_problem(exc)}"
            # Not whole, so its fsync never finished and no 250 was sent: as if it were in tmp/.
            path.unlink()
            for folder in (self.incoming_dir, self.dir):
                for suffix in (".eml", ".x50"):
                    with contextlib.suppress(OSError):
                        (folder / f"{stem}{suffix}").unlink()
            return ""
        problem = self._mismatch(envelope)
        if problem:
            # Whole yet not matching its files: a commit cut off by a power loss (its 250 was never
            # sent, but the service cannot prove it) or a damaged disk; the operator decides.
            return f"{problem} (a commit interrupted by a crash, or disk damage)"
        self._finish_publish(stem)
        os.replace(path, self.dir / f"{stem}.env")  # synced, and might have been acknowledged
        return ""

    def _finish_publish(self, stem: str) -> None:
        for suffix in (".eml", ".x50"):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.incoming_dir / f"{stem}{suffix}", self.dir / f"{stem}{suffix}")

    def _message_file(self, stem: str, suffix: str) -> Path:
        """Where a file of a message being settled is: still in incoming/, or published into queue/."""
        incoming = self.incoming_dir / f"{stem}{suffix}"
        return incoming if incoming.exists() else self.dir / f"{stem}{suffix}"

    def _mismatch(self, envelope: Envelope) -> str:
        """What is wrong with the files a .pending commits, or "" when their size and CRC-32 match it."""
        crc, size = 0, 0
        try:
            with open(self._message_file(envelope.id, ".eml"), "rb") as message:
                while chunk := message.read(WRITE_BUFFER):
                    crc = zlib.crc32(chunk, crc)
                    size += len(chunk)
            blob = self._message_file(envelope.id, ".x50").read_bytes() if envelope.xexch50 else b""
        except FileNotFoundError as exc:
            return f"{Path(str(exc.filename)).name} is missing"
        except OSError as exc:
            return f"{Path(str(exc.filename)).name} is unreadable: {exc.strerror or exc}"
        if size != envelope.size:
            return f"the message file has {size} bytes, its envelope says {envelope.size}"
        if len(blob) != envelope.xexch50 or zlib.crc32(blob, crc) != envelope.crc32:
            return "the message files do not match the envelope's CRC-32"
        return ""

    def _scan(self, stop: threading.Event | None = None) -> Iterator[list[_Found]]:
        """Every queued message, in batches, read from queue/ (in a thread when recovering in the
        background): the envelopes that parse, adopted when another spool wrote them; what cannot be used
        moved aside; an older version's .pending settled; a .eml or .x50 without .env (a completion that a
        crash cut short) removed, unless it may be a put of this run (newer than the start)."""
        batch: list[_Found] = []
        with os.scandir(self.dir) as entries:
            for entry in entries:
                if stop is not None and stop.is_set():
                    return
                stem, dot, suffix = entry.name.rpartition(".")
                if not dot or entry.name.startswith("."):
                    continue
                if suffix == "env":
                    found = self._found(stem)
                    if found is not None:
                        batch.append(found)
                        if len(batch) >= RECOVERY_BATCH:
                            yield batch
                            batch = []
                elif suffix == "pending":
                    problem = self._settle_pending(Path(entry.path), stem)
                    if problem:
                        batch.append(_Found(stem, problem))
                    elif (self.dir / f"{stem}.env").exists() and (found := self._found(stem)) is not None:
                        batch.append(found)
                elif suffix in ("eml", "x50"):
                    problem = self._orphan(entry, stem, suffix)
                    if problem:
                        batch.append(_Found(stem, problem))
        if batch:
            yield batch

    def _found(self, stem: str) -> _Found | None:
        if self._gone is not None and (stem in self._known or stem in self._gone):
            return None  # put by this run meanwhile, or already delivered
        forced_at = self._forced_at
        try:
            payload = _read(f"{self._dir_str}{stem}.env")
        except FileNotFoundError:
            return None  # completed meanwhile
        except OSError as exc:
            return _Found(stem, f"{stem}.env is unreadable: {exc.strerror or exc}")
        found = self._digest(stem, payload, forced_at)
        if found is not None:
            return found
        envelope, problem = self._parse(stem, payload)  # damaged, or another spool's: read it all
        if envelope is not None and envelope.spool != self.spool_id:
            problem = self._adopt(envelope, time.time())
        if envelope is None or problem:
            return _Found(stem, problem or "unusable")
        return _Found(stem, "", self._shape(envelope), self._due_of(envelope), envelope.size, forced_at)

    def _digest(self, stem: str, payload: bytes, forced_at: float | None = None) -> _Found | None:
        """What the index keeps of an envelope of this spool, read from its JSON without building the
        envelope (the recovery's speed: a third of its time went to that). None when anything is unusual
        (damage, another spool, an unexpected type): the caller then reads the whole envelope, which says
        precisely what is wrong."""
        try:
            data = json.loads(payload)
            if (
                type(data) is not dict
                or data.get("version") != 1
                or data.get("id") != stem
                or data.get("spool") != self.spool_id
                or not os.path.exists(f"{self._dir_str}{stem}.eml")
            ):
                return None
            frozen_links = self._frozen_links
            forced_at = self._forced_at if forced_at is None else forced_at
            frozen = bool(data.get("frozen"))
            links: dict[str, int] = {}
            tried = unreported = False
            due: float | None = None
            recipients = data["recipients"]
            if type(recipients) is not list:
                return None
            for rcpt in recipients:
                state, when, route = rcpt["state"], rcpt.get("next_attempt", 0.0), rcpt.get("route", "")
                if (
                    type(when) not in (float, int)
                    or type(route) is not str
                    or not -_LARGEST < when < _LARGEST
                ):
                    return None  # NaN or Infinity would never be due: the whole envelope says what is wrong
                if state == "pending":
                    links[route or NO_LINK] = links.get(route or NO_LINK, 0) + 1
                    tried = tried or bool(rcpt.get("attempts"))
                    if route in frozen_links:
                        continue
                    if forced_at and not frozen and when > forced_at:
                        history = rcpt.get("history") or ()
                        if not history or history[-1]["time"] < forced_at:
                            when = forced_at  # forced by `queue retry --all` and not tried since
                elif state == "failed" and not rcpt.get("notified"):
                    unreported = True
                elif state not in ("delivered", "failed"):
                    return None
                else:
                    continue
                due = when if due is None or when < due else due
            size = data.get("size", 0)
            if type(size) is not int:
                return None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None
        shape: Shape = (frozen, tried, tuple(sorted(links.items())), unreported)
        return _Found(stem, "", shape, None if frozen else due, size, forced_at)

    def _orphan(self, entry: os.DirEntry[str], stem: str, suffix: str) -> str:
        """A .eml or .x50 without its .env, from before this start: the rest of a completion a crash cut
        short (its other files are in spare/) is removed; any other .eml is moved aside with an event
        (returns why), never deleted unseen: its .env was removed by hand, or lost. An .x50 without .eml
        is only part of a message: removed."""
        if (
            os.path.exists(f"{self._dir_str}{stem}.env")
            or stem in self._putting
            or stem in self._completing
            or (self._gone is not None and stem in self._gone)
        ):
            return ""
        try:
            if entry.stat().st_mtime >= self._started - ORPHAN_MARGIN:
                return ""  # may be a put of this run, its .env on the way
        except OSError:
            return ""
        if suffix == "eml" and stem not in self._retired:
            return (
                "its envelope file (.env) is missing: removed by hand or lost; the message file is kept for "
                "the operator (a delivery completed just before a crash can also leave one)"
            )
        if suffix == "x50" and os.path.exists(f"{self._dir_str}{stem}.eml") and stem not in self._retired:
            return ""  # set aside with its .eml
        with contextlib.suppress(OSError):
            os.unlink(entry.path)
        return ""

    def _retired_ids(self) -> frozenset[str]:
        """Ids whose files a completion had moved into spare/ when the last run stopped (`.<id>.env` until
        the removal was synced, `<id>.env` after): their files still in queue/ are the rest of it."""
        try:
            names = os.listdir(self.spares.dir)
        except OSError:
            return frozenset()
        return frozenset(name.lstrip(".").rsplit(".", 1)[0] for name in names)

    def _take_batch(self, batch: list[_Found]) -> None:
        """Index what a scan found (on the loop when recovering in the background)."""
        for found in batch:
            if self._gone is not None and (found.id in self._known or found.id in self._gone):
                continue
            if found.shape is None:
                self._move_aside(found.id, found.problem)
                self.set_aside += 1
                continue
            due, forced = found.due, self._forced_at
            if due is not None and found.forced_at < forced and due > forced:
                # `queue retry --all` came after the thread read it: its pending recipients (none tried
                # since: this run has not seen it yet) are due at that time too.
                due = forced
            self._place(found.id, found.shape, due, found.size)

    def _adopt(self, envelope: Envelope, now: float) -> str:
        """An envelope another spool wrote (KB306043): its pending recipients are due at once, here."""
        for rcpt in envelope.pending:
            rcpt.next_attempt = min(rcpt.next_attempt, now)
        envelope.spool = self.spool_id
        tmp = self.tmp_dir / f"{envelope.id}.env.adopt"
        try:
            write_synced(tmp, _encode(envelope), FILE_MODE)
            os.replace(tmp, self.dir / f"{envelope.id}.env")
        except OSError as exc:
            if is_full(exc):
                return ""  # a full disk: used as it is, and made ours by its first save
            return f"cannot adopt it from another server's queue: {exc.strerror or exc}"
        self.adopted.append(envelope.id)
        return ""

    def _read_or_make_id(self) -> str:
        path = self.dir / "spool.id"
        try:
            with open(path, "rb") as fh:
                text = fh.read(200).decode("ascii").strip()
            if not text or len(text) > 64 or not text.isalnum():
                raise ValueError("it does not hold an id")
        except FileNotFoundError:
            text = ""
        except (OSError, ValueError) as exc:  # a new id: this spool's envelopes are adopted as another's
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._state_aside("spool.id", f"{why}; a new one is made", "the queued messages are adopted")
            text = ""
        if text:
            return text
        text = uuid.uuid4().hex
        tmp = self.tmp_dir / "spool.id"
        try:
            write_synced(tmp, text.encode() + b"\n", FILE_MODE)
            publish(tmp, path)
        except OSError as exc:  # a first start on a full disk: the queue cannot be made
            raise QueueError(
                f"the queue's id file {path} cannot be made: {exc.strerror or exc}", full=is_full(exc)
            ) from exc
        return text

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def removed(self) -> None:
        """Wait until the files of every message completed so far are removed, and that is durable (the
        first error, if any, is raised): a completion returns before (tests, tools)."""
        self._lingering.flush()
        if self._removals:
            await asyncio.gather(*self._removals)

    async def drain(self) -> None:
        await self.space.close()
        if self._rewriting is not None:
            self._rewriting.cancel()
            await asyncio.gather(self._rewriting, return_exceptions=True)
        self._lingering.flush()
        if self._removals:  # completions under way: their files go before the committer stops
            await asyncio.gather(*self._removals, return_exceptions=True)
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

    def _parse(self, stem: str, payload: bytes) -> tuple[Envelope | None, str]:
        """The envelope in `payload` (queue/<stem>.env), or why it cannot be used."""
        try:
            envelope = _envelope_from(payload)
            if envelope.id != stem:
                raise ValueError(f"envelope id {envelope.id!r} does not match its file name")
            if not os.path.exists(f"{self._dir_str}{stem}.eml"):
                raise ValueError("message file (.eml) is missing")
        except (ValueError, KeyError, TypeError) as exc:
            return None, _problem(exc)
        self._apply_force(envelope)
        return envelope, ""

    def _load(self, stem: str, payload: bytes | None = None) -> Envelope | None:
        """The envelope of queue/<stem>.env (its bytes in `payload` when the caller read them), or None
        when it is unusable: then its files are moved aside and reported, and it is forgotten."""
        # Strings, not Path objects: every message a worker commits comes through here.
        try:
            if payload is None:
                payload = _read(f"{self._dir_str}{stem}.env")
        except OSError as exc:
            envelope, problem = None, f"{stem}.env is unreadable: {exc.strerror or exc}"
        else:
            envelope, problem = self._parse(stem, payload)
        if envelope is None:
            self._forget(stem)
            self._move_aside(stem, problem)
        return envelope

    def _move_aside(self, stem: str, reason: str) -> None:
        for folder in (self.dir, self.incoming_dir):
            for suffix in (".env", ".pending", ".eml", ".x50"):
                src = folder / f"{stem}{suffix}"
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
        incoming, final, stem = self._incoming_str, self._dir_str, envelope.id
        eml, pending = f"{incoming}{stem}.eml", f"{incoming}{stem}.pending"
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
                fds.append(write_new(f"{incoming}{stem}.x50", blob, FILE_MODE))
            fds.append(self.spares.write(pending, payload))
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            self._discard(writer)
            raise self.failed("cannot commit queue file", exc) from exc

        def publish() -> None:
            # Durable already (the round synced the files and incoming/): into queue/, the files first and
            # the .env last, so a .env in queue/ always has its message beside it. These renames need no
            # sync of their own: after a crash, whatever of them did not last is redone by recovery.
            os.replace(eml, f"{final}{stem}.eml")
            if blob:
                os.replace(f"{incoming}{stem}.x50", f"{final}{stem}.x50")
            os.replace(pending, f"{final}{stem}.env")

        try:
            await self._committer.run(Commit(fds, publish, created_in=(self.incoming_dir,)))
        except OSError as exc:
            self._discard(writer)
            raise self.failed("cannot commit queue file", exc) from exc
        self._index(envelope)

    def _discard(self, writer: SpoolWriter) -> None:
        """A put that failed leaves nothing behind, in tmp/, incoming/ or queue/."""
        paths = [writer.path]
        for folder in (self.incoming_dir, self.dir):
            paths += [folder / f"{writer.id}{suffix}" for suffix in (".pending", ".env", ".x50", ".eml")]
        for path in paths:
            with contextlib.suppress(OSError):
                path.unlink()

    async def save(self, envelope: Envelope) -> None:
        if envelope.id in self._aside:  # moved to corrupt/ during its delivery: a write would bring it back
            self._leased.discard(envelope.id)
            self._unpin(envelope.id)
            return
        envelope.spool = self.spool_id
        try:
            await self._replace(self.dir / f"{envelope.id}.env", _encode(envelope), f"{envelope.id}.env.new")
        except QueueError as exc:
            if exc.full:
                self._hold_unsaved(envelope)
            raise
        finally:
            self._leased.discard(envelope.id)
            self._unpin(envelope.id)
        self._written(envelope.id)
        self._index(envelope)

    async def _replace(
        self, final: Path, payload: bytes, tmp_name: str, unless: Callable[[], bool] | None = None
    ) -> None:
        """Atomically replace `final` with `payload` (write, fsync, rename, directory fsync). With `unless`,
        the rename is skipped when it says so at that moment."""
        tmp = self.tmp_dir / tmp_name
        try:
            fd = write_new(tmp, payload, FILE_MODE)  # removed again when the write fails
        except OSError as exc:
            raise self.failed(f"cannot update {final.name}", exc) from exc

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
            raise self.failed(f"cannot update {final.name}", exc) from exc

    async def update(self, envelope: Envelope, *, index: bool = True) -> None:
        """Persist an operator's change (freeze, thaw, retry) without touching the lease: a message being
        delivered keeps its lease, and the delivery's own save later carries the change. The due index is
        updated before the write, so the scheduler never leases a message on the state it had before;
        `index=False` leaves that to the caller (`reschedule` once the write is done)."""
        if envelope.id not in self._known:
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
        self._pin(envelope)  # the same object for every reader until it is written
        try:
            await self._replace(final, payload, tmp_name, unless=lambda: not final.exists())
        finally:
            self._unpin(envelope.id)
        self._written(envelope.id)

    async def complete(self, queue_id: str) -> None:
        known = self._cached(queue_id)
        if known is None and queue_id in self._known:
            known = self._read_quietly(queue_id)
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

        def done(commit: asyncio.Future[None]) -> None:
            self._completing.discard(queue_id)
            if not commit.cancelled() and commit.exception() is None:
                self.spares.release(retired)  # their removal from queue/ is durable now: they may be reused

        self._completing.add(queue_id)
        self._forget(queue_id, known)
        # Nobody waits for the removal to be durable: a completion that a crash undoes is a message
        # delivered again, which at-least-once allows (Postfix does not sync a removal either). The
        # delivery's slot is free at once, and the files become spares only after the directory's sync.
        # Should the removal itself fail (a disk error), the message stays on disk, out of the index, and
        # is delivered again after the next start. Held a moment (Lingering), so that the completions of
        # a stream of deliveries share one sync of queue/.
        commit = self._lingering.run(Commit((), retire, (self.dir,)))
        commit.add_done_callback(done)
        self._removals.add(commit)
        commit.add_done_callback(self._removals.discard)

    # -- a full disk -------------------------------------------------------------------------------
    def failed(self, what: str, exc: OSError) -> QueueError:
        """The QueueError for a write that failed; one for lack of space is marked `full` (SMTP answers
        452 4.3.1) and reported to the watcher, which watches for room again."""
        full = is_full(exc)
        if full:
            self.space.full(
                self.dir,
                "the queue",
                "SMTP clients are answered 452 4.3.1 and Pickup files wait in pickup/; delivery goes on and "
                "frees space as messages leave the queue; delivery results that could not be saved are kept "
                "in memory and written as soon as there is room.",
            )
        return QueueError(f"{what}: {exc.strerror or exc}", full=full)

    def _hold_unsaved(self, envelope: Envelope) -> None:
        """A save failed for lack of space: keep this envelope (what its delivery did) in memory until it is
        written, whatever the cache forgets meanwhile."""
        if envelope.id not in self._unsaved:
            self._unsaved[envelope.id] = envelope
            self._pin(envelope)

    def _written(self, queue_id: str) -> None:
        """The envelope is on disk as it is in memory: no longer held for lack of space."""
        if self._unsaved.pop(queue_id, None) is not None:
            self._unpin(queue_id)

    @property
    def unsaved(self) -> int:
        """Envelopes whose save failed for lack of space and that wait for room to be written."""
        return len(self._unsaved)

    def _space_back(self) -> None:
        """The watcher saw room again: write what could not be written, now."""
        self._room_again = True
        if self._unsaved and (self._rewriting is None or self._rewriting.done()):
            self._rewriting = asyncio.get_running_loop().create_task(
                self._write_unsaved(), name="queue-unsaved-writes"
            )

    async def _write_unsaved(self) -> None:
        """Each envelope held for lack of space is made due at once (what was left to do is tried again now,
        not minutes later) and written; again while the watcher saw room meanwhile (envelopes held since).
        One being delivered again is left to that delivery's save."""
        while self._room_again:
            self._room_again = False
            # Full again: the write told the watcher, whose next "room" sets _room_again (this loop goes
            # on if that came meanwhile, else it starts the next pass).
            await self._write_held()

    async def _write_held(self) -> bool:
        """One pass of `_write_unsaved`; False when the disk was full again."""
        now = time.time()
        held = [e for e in self._unsaved.values() if e.id in self._known and e.id not in self._leased]
        for envelope in held:
            if not envelope.frozen:
                for rcpt in envelope.recipients:
                    if rcpt.outstanding:
                        rcpt.next_attempt = min(rcpt.next_attempt, now)
            self._index(envelope)
        if held:
            self.wake()
        for start in range(0, len(held), UPDATE_BATCH):
            batch = [e for e in held[start : start + UPDATE_BATCH] if e.id in self._unsaved]
            results = await asyncio.gather(
                *(self.update(e, index=False) for e in batch), return_exceptions=True
            )
            if any(isinstance(r, QueueError) and r.full for r in results):
                return False
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, QueueError):
                    raise result
        return True

    # -- messages committed by the SMTP worker processes (server.workers) ----------------------------
    def adopt_new(self, queue_id: str) -> Envelope | None:
        """Index a message another process of this service committed into queue/ (an SMTP worker tells
        us its id after its commit). Unknown, unreadable or already indexed ids are ignored."""
        if queue_id in self._known or queue_id in self._completing or queue_id in self._putting:
            return None
        if "/" in queue_id or (self._gone is not None and queue_id in self._gone):
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

    async def rescan(self) -> list[str]:
        """Index the .env files nobody told us about (a worker that died between its commit and its
        notice); returns their ids. The folder is listed in a thread (it may hold a million names)."""
        if self.recovering:
            return []  # the recovery under way takes them

        def unknown() -> list[str]:
            with os.scandir(self.dir) as entries:
                return [
                    e.name[:-4] for e in entries if e.name.endswith(".env") and e.name[:-4] not in self._known
                ]

        ids = await asyncio.to_thread(unknown)
        return [queue_id for queue_id in ids if self.adopt_new(queue_id) is not None]

    # -- the index -----------------------------------------------------------------------------------
    def _index(self, envelope: Envelope, *, cache: bool = True) -> None:
        if cache:
            self._keep(envelope)
        self._place(envelope.id, self._shape(envelope), self._due_of(envelope), envelope.size)

    def _due_of(self, envelope: Envelope) -> float | None:
        return None if envelope.frozen else envelope.next_due(self._frozen_links)

    def _place(self, queue_id: str, shape: Shape, due: float | None, size: int) -> None:
        """Index a message: its shape, and its due time (None: frozen, or waiting only on frozen links)."""
        if queue_id not in self._known:
            self._bytes += size
        self._known[queue_id] = self._shapes.setdefault(shape, shape)
        if queue_id in self._leased:
            return
        if due is None:
            self._due.discard(queue_id)
            if shape[0]:
                self._parked.discard(queue_id)
            else:
                self._parked.add(queue_id)  # waits only on frozen links
            return
        self._parked.discard(queue_id)
        self._due.set(queue_id, due)

    def _shape(self, envelope: Envelope) -> Shape:
        pending = envelope.pending
        links: dict[str, int] = {}
        for rcpt in pending:
            link = rcpt.route or NO_LINK
            links[link] = links.get(link, 0) + 1
        unreported = any(r.state is RecipientState.FAILED and not r.notified for r in envelope.recipients)
        return (envelope.frozen, any(r.attempts for r in pending), tuple(sorted(links.items())), unreported)

    def _forget(self, queue_id: str, envelope: Envelope | None = None) -> None:
        if self._known.pop(queue_id, None) is not None and envelope is not None:
            self._bytes -= envelope.size
        self._due.discard(queue_id)
        self._parked.discard(queue_id)
        self._leased.discard(queue_id)
        self._cache.pop(queue_id, None)
        self._pinned.pop(queue_id, None)
        self._pins.pop(queue_id, None)
        self._unsaved.pop(queue_id, None)
        if self._gone is not None:
            self._gone.add(queue_id)

    # -- envelopes in memory -------------------------------------------------------------------------
    def _cached(self, queue_id: str) -> Envelope | None:
        envelope = self._pinned.get(queue_id)
        return envelope if envelope is not None else self._cache.get(queue_id)

    def _keep(self, envelope: Envelope) -> None:
        """Remember an envelope: the newest of the cache (the pinned ones stay where they are)."""
        queue_id = envelope.id
        if queue_id in self._pinned:
            self._pinned[queue_id] = envelope
            return
        cache = self._cache
        cache.pop(queue_id, None)
        cache[queue_id] = envelope
        while len(cache) > CACHE_LIMIT:
            del cache[next(iter(cache))]  # the one used longest ago

    def _pin(self, envelope: Envelope) -> None:
        """Keep this very object in memory while it is in use (a delivery, an operator's write): every
        reader then sees and changes the same envelope."""
        queue_id = envelope.id
        self._pins[queue_id] = self._pins.get(queue_id, 0) + 1
        self._cache.pop(queue_id, None)
        self._pinned[queue_id] = envelope

    def _unpin(self, queue_id: str) -> None:
        count = self._pins.get(queue_id, 0) - 1
        if count > 0:
            self._pins[queue_id] = count
            return
        self._pins.pop(queue_id, None)
        envelope = self._pinned.pop(queue_id, None)
        if envelope is not None and queue_id in self._known:
            self._keep(envelope)

    def _envelope(self, queue_id: str) -> Envelope | None:
        """A queued message's envelope: the one in memory, else read from disk (and kept)."""
        envelope = self._cached(queue_id)
        if envelope is not None:
            return envelope
        if queue_id not in self._known:
            return None
        envelope = self._load(queue_id)
        if envelope is not None:
            self._keep(envelope)
        return envelope

    def _read_quietly(self, queue_id: str) -> Envelope | None:
        try:
            envelope, _ = self._parse(queue_id, _read(f"{self._dir_str}{queue_id}.env"))
        except OSError:
            return None
        return envelope

    # -- scheduling ----------------------------------------------------------------------------------
    def lease(self, now: float, limit: int) -> list[Envelope]:
        out: list[Envelope] = []
        while len(out) < limit:
            ids = self._due.pop_due(now, limit - len(out))
            if not ids:
                break
            for queue_id in ids:
                envelope = self._envelope(queue_id)
                if envelope is None:
                    continue  # unusable: moved aside and forgotten
                due = None if envelope.frozen else envelope.next_due(self._frozen_links)
                if due is None or due > now:
                    self._index(envelope)  # frozen, or its links were, since it was indexed
                    continue
                self._leased.add(queue_id)
                self._pin(envelope)
                out.append(envelope)
        return out

    def release(self, queue_id: str) -> None:
        if queue_id in self._leased:
            self._leased.discard(queue_id)
            self._unpin(queue_id)
        envelope = self._cached(queue_id)
        if envelope is not None:
            self._index(envelope)

    def reschedule(self, queue_id: str) -> None:
        """Re-read the due time of a message whose state was changed in memory (an operator's change, once
        written; a freeze whose write failed, put back). A leased message is left alone: its delivery is
        under way."""
        envelope = self._cached(queue_id)
        if envelope is not None and queue_id not in self._leased:
            self._index(envelope)

    def next_due(self) -> float | None:
        return self._due.next_due()

    # -- frozen links -------------------------------------------------------------------------------
    @property
    def frozen_links(self) -> frozenset[str]:
        return self._frozen_links

    async def set_link_frozen(self, link: str, frozen: bool) -> None:
        """Freeze or thaw a next hop for every message queued for it, now and later (persisted). A freeze
        takes effect as each message falls due (it is parked then); a thaw indexes the parked ones again."""
        links = self._frozen_links | {link} if frozen else self._frozen_links - {link}
        payload = json.dumps({"frozen": sorted(links)}).encode()
        await self._replace(self.dir / "links.json", payload, "links.json.new")
        self._frozen_links = frozenset(links)
        if frozen:
            # Park at once what now waits only on frozen links (the shapes say which, no envelope read).
            ids = self._due.ids()
            for start in range(0, len(ids), SUMMARY_CHUNK):
                for queue_id in ids[start : start + SUMMARY_CHUNK]:
                    shape = self._known.get(queue_id)
                    # Waiting only on frozen links, and no report to make (that is due whatever the link).
                    if shape and shape[2] and not shape[3] and all(link in links for link, _ in shape[2]):
                        self._due.discard(queue_id)
                        self._parked.add(queue_id)
                await asyncio.sleep(0)
            return
        for count, queue_id in enumerate(list(self._parked)):
            envelope = self._envelope(queue_id)
            if envelope is not None:
                self._index(envelope)
            if count % UPDATE_BATCH == UPDATE_BATCH - 1:
                await asyncio.sleep(0)  # a long list of parked messages must not stall the loop

    # -- Force Connection of the whole queue --------------------------------------------------------
    async def force_all(self, now: float) -> tuple[int, frozenset[str], list[str]]:
        """Every pending recipient of every message that is not frozen is due at `now` (module docstring):
        persisted as one time, applied to the index here and to each envelope as it is read. Returns the
        messages concerned, their pending links, and the leased ones among them (their delivery is under
        way: the caller makes them due again when it ends)."""
        payload = json.dumps({"at": now}).encode()
        await self._replace(self.dir / FORCED, payload, f"{FORCED}.new")
        self._forced_at = now
        for envelope in [*self._cache.values(), *self._pinned.values()]:
            if envelope.id not in self._leased:
                self._apply_force(envelope)
        count, links, leased = 0, set[str](), list[str]()
        ids = [*self._due.ids(), *self._parked, *self._leased]
        for start in range(0, len(ids), SUMMARY_CHUNK):
            for queue_id in ids[start : start + SUMMARY_CHUNK]:
                shape = self._known.get(queue_id)
                if shape is None or shape[0] or not shape[2]:
                    continue  # gone meanwhile, frozen, or nothing pending
                count += 1
                links.update(link for link, _ in shape[2])
                if queue_id in self._leased:
                    leased.append(queue_id)
                    continue
                due = self._due.get(queue_id)
                if due is not None and due > now:
                    self._due.set(queue_id, now)
            await asyncio.sleep(0)  # a million messages: the loop answers meanwhile
        return count, frozenset(links), leased

    def _apply_force(self, envelope: Envelope) -> None:
        """What the last Force Connection of the whole queue means for this envelope."""
        at = self._forced_at
        if not at or envelope.frozen:
            return
        for rcpt in envelope.recipients:
            if rcpt.pending and rcpt.next_attempt > at and (not rcpt.history or rcpt.history[-1].time < at):
                rcpt.next_attempt = at

    def _read_forced(self) -> float:
        found, data = self._read_state(FORCED, "the last `queue retry --all` is forgotten")
        if not found:
            return 0.0
        at: Any = data.get("at") if isinstance(data, dict) else None
        if type(at) not in (int, float) or not -_LARGEST < at < _LARGEST:
            self._state_aside(FORCED, "its time is not a number", "the last `queue retry --all` is forgotten")
            return 0.0
        return float(at)

    def _read_links(self) -> frozenset[str]:
        found, data = self._read_state("links.json", "no link is frozen")
        if not found:
            return frozenset()
        frozen = data.get("frozen", []) if isinstance(data, dict) else None
        if type(frozen) is not list or any(type(link) is not str for link in frozen):
            self._state_aside("links.json", "it is not a list of frozen links", "no link is frozen")
            return frozenset()
        return frozenset(frozen)

    def _read_state(self, name: str, meanwhile: str) -> tuple[bool, Any]:
        """(True, the JSON of queue/<name>), or (False, None) when there is none to use: absent, or it
        cannot be read or parsed, and then it is set aside with an event saying what is lost."""
        try:
            return True, json.loads(_read(f"{self._dir_str}{name}"))
        except FileNotFoundError:
            return False, None
        except OSError as exc:
            self._state_aside(name, f"it cannot be read: {exc.strerror or exc}", meanwhile)
        except ValueError as exc:
            self._state_aside(name, f"not valid JSON ({exc})", meanwhile)
        except RecursionError:
            self._state_aside(name, "not valid JSON (nested too deep)", meanwhile)
        return False, None

    def _state_aside(self, name: str, problem: str, meanwhile: str) -> None:
        with contextlib.suppress(OSError):
            shutil.move(str(self.dir / name), str(self.corrupt_dir / name))
        self._on_corrupt(name, f"{problem}; {meanwhile}")

    # -- reading -------------------------------------------------------------------------------------
    def get(self, queue_id: str) -> Envelope | None:
        return self._envelope(queue_id)

    def list(self) -> list[Envelope]:
        """Every queued envelope, by id (read from disk: for tools and small queues)."""
        return [e for e in map(self._envelope, sorted(self._known)) if e is not None]

    def ids(self) -> Sequence[str]:
        """Every queued message's id, by id (the oldest first)."""
        return sorted(self._known)

    def count(self) -> int:
        return len(self._known)

    def unordered_ids(self, frozen: bool | None = None) -> builtins.list[str]:
        """The ids as the index has them (no sort: a million would hold the loop), filtered by the frozen
        flag of their shapes when `frozen` is given."""
        if frozen is None:
            return list(self._known)
        return [queue_id for queue_id, shape in self._known.items() if shape[0] is frozen]

    def shape(self, queue_id: str) -> Shape | None:
        return self._known.get(queue_id)

    def due_at(self, queue_id: str) -> float | None:
        return self._due.get(queue_id)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    async def summary(self) -> QueueSummary:
        """Counts by state and link from the index (no envelope read), in chunks so the loop keeps
        answering: about a second of CPU for a million messages, most of them sharing a few shapes."""
        frozen_links = self._frozen_links
        # Per shape, and apart the messages held until later (model.queue_status_of: in retry untried).
        shapes: dict[tuple[Shape, bool], _ShapeStats] = {}
        known, due_at = self._known, self._due.get
        now = time.time()
        ids = list(known)  # the ids as they are now; one removed meanwhile is skipped below
        for start in range(0, len(ids), SUMMARY_CHUNK):
            for queue_id in ids[start : start + SUMMARY_CHUNK]:
                shape = known.get(queue_id)
                if shape is None:
                    continue
                due = due_at(queue_id)
                key = (shape, due is not None and due > now)
                stats = shapes.get(key)
                if stats is None:
                    stats = shapes[key] = _ShapeStats()
                stats.ids.append(queue_id)
                if due is not None and due < stats.next_due:
                    stats.next_due = due
            await asyncio.sleep(0)
        return self._summarize(shapes, frozen_links, now)

    def _summarize(
        self, shapes: dict[tuple[Shape, bool], _ShapeStats], frozen_links: frozenset[str], now: float
    ) -> QueueSummary:
        states = dict.fromkeys(QUEUE_STATES, 0)
        links: dict[str, _LinkTotals] = {}
        oldest: str | None = None
        messages = 0
        for ((frozen, tried, pending, _), _held), stats in shapes.items():
            count = len(stats.ids)
            messages += count
            all_frozen = bool(pending) and all(link in frozen_links for link, _ in pending)
            # The messages of a group are all held, or none is: the earliest due time tells for all.
            due = None if stats.next_due == INFINITY else stats.next_due
            state = queue_status_of(frozen or all_frozen, tried, due, now).state
            states[state] += count
            first = min(stats.ids)
            oldest = first if oldest is None or first < oldest else oldest
            for link, recipients in pending:
                totals = links.setdefault(link, _LinkTotals())
                totals.messages += count
                totals.recipients += recipients * count
                totals.states.add(state)
                totals.ids.append(stats.ids)
                if not frozen and link not in frozen_links:
                    totals.next_due = min(totals.next_due, stats.next_due)
        out: dict[str, LinkStats] = {}
        for link, totals in links.items():
            sample = heapq.nsmallest(SAMPLE_IDS, itertools.chain.from_iterable(totals.ids))
            out[link] = LinkStats(
                messages=totals.messages,
                recipients=totals.recipients,
                oldest=self._received(sample[0]) if sample else 0.0,
                next_due=None if totals.next_due == INFINITY else totals.next_due,
                states=frozenset(totals.states),
                sample=tuple(sample),
            )
        return QueueSummary(
            messages=messages,
            states=states,
            links=out,
            oldest=self._received(oldest) if oldest is not None else None,
            bytes=self._bytes,
        )

    def _received(self, queue_id: str) -> float:
        """When a message arrived: its id says (ids begin with the microsecond they were made); the
        envelope is read only for an id of another form."""
        stamp = queue_id[:14]
        if len(queue_id) == 24 and all(c in HEX_DIGITS for c in stamp):
            return int(stamp, 16) / 1_000_000
        envelope = self._envelope(queue_id)
        return envelope.received_at if envelope is not None else 0.0

    def open_message(self, queue_id: str) -> BinaryIO:
        """The message file, open. One that cannot be opened for a lasting reason (damaged, missing, a
        folder, no permission) is moved aside with its envelope (MessageSetAside): retrying it every few
        minutes would not mend it. A shortage of the moment (file handles, memory) raises OSError."""
        if queue_id in self._completing:  # its files go a moment after the completion returns
            raise FileNotFoundError(f"message {queue_id} is completed")
        try:
            return open(f"{self._dir_str}{queue_id}.eml", "rb")
        except OSError as exc:
            if exc.errno in _SHORTAGES or queue_id not in self._known or queue_id in self._completing:
                raise
            reason = f"{queue_id}.eml cannot be opened: {exc.strerror or exc}"
            self._set_aside(queue_id, reason)
            raise MessageSetAside(f"message {queue_id} was moved to queue/corrupt: {reason}") from exc

    def _set_aside(self, queue_id: str, reason: str) -> None:
        """A queued message found unusable while running: out of the index, its files into corrupt/, the
        event; a save of its envelope still under way (its delivery) then writes nothing."""
        envelope = self._pinned.get(queue_id) or self._cache.get(queue_id)
        self._forget(queue_id, envelope)
        self._aside.add(queue_id)
        self._move_aside(queue_id, reason)

    def xexch50_blob(self, queue_id: str) -> bytes | None:
        """The XEXCH50 blob received with the message, or None."""
        if queue_id in self._completing:
            return None
        try:
            return _read(f"{self._dir_str}{queue_id}.x50")
        except FileNotFoundError:
            return None
        except OSError as exc:  # as for the message file (open_message): set aside once, not retried
            if exc.errno in _SHORTAGES or queue_id not in self._known or queue_id in self._completing:
                raise
            reason = f"{queue_id}.x50 cannot be read: {exc.strerror or exc}"
            self._set_aside(queue_id, reason)
            raise MessageSetAside(f"message {queue_id} was moved to queue/corrupt: {reason}") from exc

    def message_path(self, queue_id: str) -> Path:
        return self.dir / f"{queue_id}.eml"

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
        spool.wake = self.wake  # room again after a full disk: what waited for it is due

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

    async def ids(self, frozen: bool | None = None) -> builtins.list[str]:
        await self.spool.recovered()  # every message, not only those indexed so far
        return self.spool.unordered_ids(frozen)

    async def summary(self) -> QueueSummary:
        return await self.spool.summary()

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
        self, now: float, queue_id: str = "", domain: str = "", subdomains: bool = False, link: str = ""
    ) -> Rescheduled:
        domain = domain.rstrip(".").lower()
        if not (queue_id or domain or link):  # the whole queue: one write (LocalSpool.force_all)
            count, forced, leased = await self.spool.force_all(now)
            self._rerun.update(leased)  # not under their deliveries' feet: their saves make them due
            return Rescheduled(count, forced)
        await self.spool.recovered()  # every message, not only those indexed so far
        count, links, changed = 0, set[str](), _no_envelopes()
        for batch in self._batches([queue_id] if queue_id else self.spool.ids()):
            for envelope in batch:
                if envelope.frozen:
                    continue
                touched = [
                    r
                    for r in envelope.pending
                    if _at_domain(r.domain, domain, subdomains) and (not link or r.route == link)
                ]
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
            if len(changed) >= UPDATE_BATCH:
                await self._update_many(changed)
                changed = _no_envelopes()
        await self._update_many(changed)
        return Rescheduled(count, frozenset(links))

    def _batches(self, ids: Sequence[str]) -> Iterator[Sequence[Envelope]]:
        """The envelopes of `ids`, UPDATE_BATCH at a time (read from disk when not in memory): a queue of a
        million messages is worked through without holding its envelopes, the caller awaiting between."""
        return _batches(self.spool, ids)

    async def recategorize(
        self,
        route_of: Callable[[str], str],
        now: float,
        *,
        queue_id: str = "",
        changed_only: Callable[[str], bool] | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Rescheduled:
        await self.spool.recovered()  # every message, not only those indexed so far
        ids = [queue_id] if queue_id else self.spool.ids()
        count, links = 0, set[str]()
        for start, batch in zip(itertools.count(0, UPDATE_BATCH), self._batches(ids), strict=False):
            changed = _no_envelopes()  # routing a batch, then writing it, frees the loop
            for envelope in batch:
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


def _batches(spool: LocalSpool, ids: Sequence[str]) -> Iterator[Sequence[Envelope]]:
    for start in range(0, len(ids), UPDATE_BATCH):
        yield [e for e in map(spool.get, ids[start : start + UPDATE_BATCH]) if e is not None]


def _no_envelopes() -> list[Envelope]:
    """An empty list (a function: inside the classes, `list` names their `list` method)."""
    return []


_TEXT = (str,)
_NUMBER = (int, float)
_COUNT = (int,)
_FLAG = (bool,)
_ENVELOPE_TYPES: dict[str, tuple[type, ...]] = {
    "id": _TEXT,
    "sender": _TEXT,
    "received_at": _NUMBER,
    "source": _TEXT,
    "client_ip": _TEXT,
    "helo": _TEXT,
    "auth_user": _TEXT,
    "body": _TEXT,
    "size": _COUNT,
    "crc32": _COUNT,
    "ret": _TEXT,
    "envid": _TEXT,
    "smtputf8": _FLAG,
    "frozen": _FLAG,
    "xexch50": _COUNT,
    "delay_notified": _FLAG,
    "dsn_kind": _TEXT,
    "original_id": _TEXT,
    "spool": _TEXT,
}
_RECIPIENT_TYPES: dict[str, tuple[type, ...]] = {
    "address": _TEXT,
    "state": _TEXT,
    "orcpt": _TEXT,
    "attempts": _COUNT,
    "next_attempt": _NUMBER,
    "last_reply": _TEXT,
    "status": _TEXT,
    "remote_mta": _TEXT,
    "route": _TEXT,
    "notified": _FLAG,
}
_WANTED: dict[tuple[type, ...], str] = {
    _TEXT: "text",
    _NUMBER: "a number",
    _COUNT: "a whole number",
    _FLAG: "true or false",
}
_ATTEMPT_TYPES: dict[str, tuple[type, ...]] = {"time": _NUMBER, "reply": _TEXT, "host": _TEXT}
_LARGEST = 1e18  # no time, size or count in an envelope comes near; NaN and Infinity are not below it


def _shape_problem(data: Any) -> str:
    """What makes parsed JSON not an envelope: not an object, a field of the wrong type (a number where
    text belongs, `null`, a list...), a number that is not finite; "" when its shape is right. `[]`, `null`
    or `5` are damage like any other, reported instead of failing on them later."""
    if type(data) is not dict:
        return f"the envelope is {_json_type(data)}, not an object"
    problem = _fields_problem(data, _ENVELOPE_TYPES, "")
    if problem:
        return problem
    recipients = data.get("recipients")
    if type(recipients) is not list:
        return f"recipients is {_json_type(recipients)}, not a list"
    for n, rcpt in enumerate(recipients, 1):
        where = f"recipient {n}: "
        if type(rcpt) is not dict:
            return f"recipient {n} is {_json_type(rcpt)}, not an object"
        problem = _fields_problem(rcpt, _RECIPIENT_TYPES, where)
        if problem:
            return problem
        notify, history = rcpt.get("notify", []), rcpt.get("history", [])
        if type(notify) is not list or any(type(item) is not str for item in notify):
            return f"{where}notify is not a list of text"
        if type(history) is not list:
            return f"{where}history is {_json_type(history)}, not a list"
        for attempt in history:
            if type(attempt) is not dict:
                return f"{where}an attempt in its history is {_json_type(attempt)}, not an object"
            problem = _fields_problem(attempt, _ATTEMPT_TYPES, f"{where}history: ")
            if problem:
                return problem
    transcripts = data.get("transcripts", [])
    if type(transcripts) is not list or any(
        type(t) is not list or any(type(line) is not str for line in t) for t in transcripts
    ):
        return "transcripts is not a list of lists of text"
    return ""


def _fields_problem(data: dict[str, Any], types: dict[str, tuple[type, ...]], where: str) -> str:
    for name, allowed in types.items():
        if name not in data:
            continue  # an absent field takes its default (Envelope.from_json says which are required)
        value = data[name]
        if type(value) not in allowed:
            return f"{where}{name} is {_json_type(value)}, not {_WANTED[allowed]}"
        if allowed is not _TEXT and allowed is not _FLAG and not -_LARGEST < value < _LARGEST:
            return f"{where}{name} is {value!r}, out of range"
    return ""


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true or false", type(None): "null"}
    return names.get(type(value), "a number")


class _NotJson(ValueError):
    """The bytes are not JSON text: a write cut short (or a file that never was an envelope)."""


def _envelope_from(payload: bytes) -> Envelope:
    """The envelope in a .env or .pending file's bytes. Raises _NotJson (not JSON, not UTF-8), ValueError
    (nested too deep for the parser, wrong shape, wrong values), KeyError (a required field missing) or
    TypeError."""
    try:
        data = json.loads(payload)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise _NotJson(str(exc)) from None
    except RecursionError:
        raise ValueError("the JSON is nested too deep to be an envelope") from None
    problem = _shape_problem(data)
    if problem:
        raise ValueError(problem)
    return Envelope.from_json(data)


def _shown(text: str) -> str:
    """`text` as an event can hold it: bytes of a file name that are not UTF-8 and control characters as
    \\xNN escapes (folders/badmail.py `printable` does the same above this layer)."""
    if text.isprintable():
        return text
    raw = text.encode("utf-8", "surrogateescape" if _only_escapes(text) else "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(
        c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 0x100 else repr(c)[1:-1] for c in text
    )


def _only_escapes(text: str) -> bool:
    """True when every surrogate in `text` stands for a byte of a file name (U+DC80..U+DCFF)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _problem(exc: Exception) -> str:
    """An envelope's problem in words (a KeyError's text is only the key)."""
    if isinstance(exc, KeyError):
        return f"the field {exc} is missing"
    return str(exc) or type(exc).__name__


def _read(path: str) -> bytes:
    with open(path, "rb", buffering=0) as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_ENVELOPE_BYTES:  # read nothing: a hostile file must not take the memory
            raise OSError(
                errno.EFBIG, f"it has {size:,} bytes, more than an envelope ever has ({MAX_ENVELOPE_BYTES:,})"
            )
        return file.read()


def _encode(envelope: Envelope) -> bytes:
    # "backslashreplace" writes a lone surrogate (which UTF-8 cannot hold) as the JSON escape \udXXX,
    # so json.loads gives it back as it was, instead of the write failing with a UnicodeEncodeError.
    text = json.dumps(envelope.to_json(), ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "backslashreplace")
