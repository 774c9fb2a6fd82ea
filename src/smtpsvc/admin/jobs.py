"""Bulk admin operations as background jobs: one job per bulk request (retry, recategorize, freeze, thaw or
delete many messages; freeze, thaw or retry a link), run as an asyncio task in the event loop of whoever
holds the queue (the running service, or the CLI on a stopped service's files), with its progress, and its
result or error. A table keeps the running jobs and the newest finished ones, for polling
(`GET /api/jobs/<id>`, `smtpsvc queue jobs`).

The request answers at once and the work goes on, so a bulk change to a queue of 100,000 messages is never
a request that times out while the change happens anyway. At most one job per request (same kind and
target) runs at a time: asking again while it runs gets the running one.

Nothing here knows the queue: `QueueAdmin` (admin/service.py) supplies each job's work, and the work says
how far it is through `Progress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

KEEP = 50  # finished jobs kept for polling (running ones are always kept)
STOP_GRACE = 5.0  # seconds a stopping service gives running jobs to reach the end of a batch


class JobState(StrEnum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


KINDS = ("retry", "recategorize", "freeze", "thaw", "delete")


@dataclass(frozen=True, slots=True)
class BulkRequest:
    """What a bulk job does: `kind` on every message, or on those with a pending recipient at `domain`
    (retry), or on `link` (freeze, thaw, retry); `ndr` for delete: each message is returned to its sender
    first (status 4.3.2)."""

    kind: str
    domain: str = ""
    link: str = ""
    ndr: bool = False

    def problem(self) -> str:
        """Why this request cannot be a job ("" when it can)."""
        if self.kind not in KINDS:
            return f"unknown bulk operation {self.kind!r}: {', '.join(KINDS)}"
        if self.domain and self.link:
            return "give a domain or a link, not both"
        if self.domain and self.kind != "retry":
            return f"{self.kind} by domain is not a bulk operation: use its link (`smtpsvc queue summary`)"
        if self.link and self.kind not in ("retry", "freeze", "thaw"):
            return f"{self.kind} by link is not a bulk operation"
        if self.ndr and self.kind != "delete":
            return "ndr goes with delete only"
        return ""

    @property
    def target(self) -> str:
        if self.link:
            return f"link {self.link}"
        return f"domain {self.domain}" if self.domain else "every message"

    @property
    def description(self) -> str:
        """In the words of the event log: "retry of link smarthost", "delete of every message with an NDR"."""
        return f"{self.kind} of {self.target}" + (" with an NDR to each sender" if self.ndr else "")


@dataclass(frozen=True, slots=True)
class Outcome:
    """A job's result: how many messages it changed, how many it `left` alone on purpose (being delivered
    right now, for a delete), and one line saying so (the text of its event 9006)."""

    count: int
    message: str
    left: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "left": self.left, "message": self.message}


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job as seen at one moment: what the API answers and the CLI shows. `done` of `total` messages
    looked at so far (`total` None until known); `result` once done, `error` once failed."""

    id: str
    request: BulkRequest
    state: JobState
    done: int
    total: int | None
    started: float
    finished: float | None = None
    result: Outcome | None = None
    error: str = ""

    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.request.kind,
            "domain": self.request.domain,
            "link": self.request.link,
            "ndr": self.request.ndr,
            "description": self.request.description,
            "state": self.state.value,
            "done": self.done,
            "total": self.total,
            "started": self.started,
            "finished": self.finished,
            "result": self.result.to_json() if self.result else None,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobStatus:
        result = data.get("result")
        return cls(
            id=str(data["id"]),
            request=BulkRequest(
                str(data["kind"]),
                str(data.get("domain", "")),
                str(data.get("link", "")),
                bool(data.get("ndr")),
            ),
            state=JobState(data["state"]),
            done=int(data.get("done", 0)),
            total=None if data.get("total") is None else int(data["total"]),
            started=float(data["started"]),
            finished=None if data.get("finished") is None else float(data["finished"]),
            result=(
                Outcome(int(result["count"]), str(result.get("message", "")), int(result.get("left", 0)))
                if isinstance(result, dict)
                else None
            ),
            error=str(data.get("error", "")),
        )


class JobStopped(Exception):
    """The job's loop is stopping (the service stops, or the CLI was interrupted): the work ends at the
    end of the batch it was in; what it changed stays changed."""


class Progress:
    """Handed to a job's work: `progress(done, total)` after each batch (the signature of
    `QueueStore.recategorize`'s callback), and `await progress.next_batch()` between batches, which gives
    the event loop to everything else and ends the work (JobStopped) when its loop is stopping."""

    def __init__(self, listener: Callable[[int, int], None] | None = None) -> None:
        self.job_id = ""
        self.done = 0
        self.total: int | None = None
        self.stopping = ""  # why the work should stop at its next batch ("" while it should go on)
        self._listener = listener

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self._listener is not None:
            self._listener(done, total)

    async def next_batch(self) -> None:
        await asyncio.sleep(0)
        if self.stopping:
            raise JobStopped(self.stopping)


Work = Callable[[Progress], Awaitable[Outcome]]


@dataclass(eq=False)
class _Job:
    id: str
    request: BulkRequest
    started: float
    progress: Progress = field(default_factory=Progress)
    state: JobState = JobState.RUNNING
    finished: float | None = None
    result: Outcome | None = None
    error: str = ""
    task: asyncio.Task[None] | None = None

    def status(self) -> JobStatus:
        return JobStatus(
            self.id,
            self.request,
            self.state,
            self.progress.done,
            self.progress.total,
            self.started,
            self.finished,
            self.result,
            self.error,
        )


class JobTable:
    """The jobs of one admin layer: the running ones and the newest `keep` finished ones, in memory (a
    restart forgets them; what they changed is in the queue)."""

    def __init__(self, keep: int = KEEP) -> None:
        self._keep = keep
        self._jobs: dict[str, _Job] = {}  # oldest first
        self._closing = ""

    def running(self, request: BulkRequest) -> JobStatus | None:
        """The job doing this very request now, if one is."""
        for job in self._jobs.values():
            if job.state is JobState.RUNNING and job.request == request:
                return job.status()
        return None

    def start(self, request: BulkRequest, work: Work) -> tuple[JobStatus, bool]:
        """Run `work` as a new job in this event loop, or (False) the job already doing this request."""
        already = self.running(request)
        if already is not None:
            return already, False
        if self._closing:
            raise JobStopped(self._closing)
        job_id = secrets.token_hex(4)
        while job_id in self._jobs:
            job_id = secrets.token_hex(4)
        job = _Job(job_id, request, time.time())
        job.progress.job_id = job_id
        self._jobs[job_id] = job
        job.task = asyncio.get_running_loop().create_task(self._run(job, work), name=f"admin-job-{job_id}")
        self._trim()
        return job.status(), True

    async def _run(self, job: _Job, work: Work) -> None:
        try:
            job.result = await work(job.progress)
            job.state = JobState.DONE
        except asyncio.CancelledError:
            job.state, job.error = JobState.FAILED, f"stopped before the end: {self._closing or 'cancelled'}"
            raise
        except JobStopped as exc:
            job.state, job.error = JobState.FAILED, f"stopped before the end: {exc}"
        except Exception as exc:  # a job ends, whatever happens: its error is its answer
            job.state, job.error = JobState.FAILED, str(exc) or type(exc).__name__
        finally:
            job.finished = time.time()
            self._trim()

    def _trim(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.state is not JobState.RUNNING]
        for job_id in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[job_id]

    def get(self, job_id: str) -> JobStatus | None:
        job = self._jobs.get(job_id)
        return job.status() if job else None

    def list(self) -> list[JobStatus]:
        """Newest first."""
        return [job.status() for job in reversed(self._jobs.values())]

    async def wait(self, job_id: str, timeout: float) -> JobStatus | None:
        """The job once it has ended, or as it is after `timeout` seconds (the viewer's buttons)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.task is not None and not job.task.done():
            await asyncio.wait([job.task], timeout=timeout)
        return job.status()

    async def close(self, reason: str, grace: float = STOP_GRACE) -> None:
        """Stop the running jobs: each ends at the end of its batch (within `grace` seconds, else it is
        cancelled where it is), failed with `reason`. Starts no new ones afterwards."""
        self._closing = reason
        tasks = []
        for job in self._jobs.values():
            if job.state is JobState.RUNNING and job.task is not None:
                job.progress.stopping = reason
                tasks.append(job.task)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task
