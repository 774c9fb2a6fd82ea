"""The CLI's way to the queue: the files of a stopped service, the admin API of a running one, or the
PostgreSQL queue of a cluster.

`open_admin` with the local backend tries the spool lock first: if it is free the service is stopped and the
CLI works on the files (`QueueAdmin.offline`); if the service holds it, the same operations go to its admin
HTTP API, with the token this machine's files give (`admin.token_file`, or `<root>/admin.token`). With the
PostgreSQL backend the CLI works on the database directly, from any node, whether the nodes run or not: the
database is the arbiter, and every node sees the change. All return the same objects, so the CLI prints them
the same way and says which path it took.

A bulk change is a job in the service (admin/jobs.py): one short request starts it, short requests poll it.
No request waits for the work, so none times out on a large queue while the change goes on regardless; a
poll that gets no answer in time is only that (`ServiceSilent`), and the caller polls again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from smtpsvc.admin.access import ADMIN_ADDRESS_FILE, read_token
from smtpsvc.admin.jobs import BulkRequest, JobStatus
from smtpsvc.admin.service import (
    LIST_LIMIT,
    TRACK_LIMIT,
    AdminError,
    LinkSummary,
    QueueAdmin,
    QueueEntry,
    QueueOpener,
    ServiceRunning,
)
from smtpsvc.config import Config
from smtpsvc.model import Envelope

TIMEOUT = 30.0  # one request (never the work of a bulk job: that is polled)
POLL_TIMEOUT = 10.0  # one poll of a job


class ServiceSilent(AdminError):
    """The admin API did not answer one request in time (the service is busy or stuck): the request may
    have been done all the same."""


class RemoteAdmin:
    """The admin layer of a running service, reached over its HTTP API."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.where = f"the running service (admin API {self.base_url})"

    @classmethod
    def for_config(cls, config: Config) -> RemoteAdmin:
        if config.admin.listen is None:
            raise AdminError(
                'The service is running and its admin API is off (admin.listen = ""): set admin.listen and '
                "restart it, or stop the service to work on the queue files."
            )
        host, port = config.admin.listen
        with contextlib.suppress(OSError, ValueError):
            written = (Path(config.server.root) / ADMIN_ADDRESS_FILE).read_text(encoding="utf-8").strip()
            host, _, port_text = written.rpartition(":")
            host, port = host.strip("[]"), int(port_text)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
        shown = f"[{host}]" if ":" in host else host
        return cls(f"http://{shown}:{port}", read_token(config))

    # -- reading -------------------------------------------------------------------------------------
    async def track(
        self,
        sender: str = "",
        recipient: str = "",
        queue_id: str = "",
        since: str = "",
        limit: int = TRACK_LIMIT,
    ) -> dict[str, Any]:
        """The service's own `GET /api/track` document (see QueueAdmin.track)."""
        query = {
            "sender": sender,
            "recipient": recipient,
            "id": queue_id,
            "since": since,
            "limit": str(limit),
        }
        data: dict[str, Any] = await asyncio.to_thread(
            self._request, "GET", "/api/track", {k: v for k, v in query.items() if v}
        )
        return data

    async def entries(
        self, state: str = "", to: str = "", domain: str = "", link: str = "", limit: int = LIST_LIMIT
    ) -> list[QueueEntry]:
        query = {k: v for k, v in {"state": state, "to": to, "domain": domain, "link": link}.items() if v}
        query["limit"] = str(limit)
        data = await asyncio.to_thread(self._request, "GET", "/api/queue", query)
        frozen = frozenset(str(link) for link in data.get("frozen_links", []))
        return [
            QueueEntry(Envelope.from_json(m["envelope"]), frozen, str(m.get("leased_by", "")))
            for m in data["messages"]
        ]

    async def listing(
        self, state: str = "", to: str = "", domain: str = "", link: str = "", limit: int = LIST_LIMIT
    ) -> dict[str, Any]:
        """The service's own `GET /api/queue` document (see QueueAdmin.listing)."""
        query = {k: v for k, v in {"state": state, "to": to, "domain": domain, "link": link}.items() if v}
        query["limit"] = str(limit)
        data: dict[str, Any] = await asyncio.to_thread(self._request, "GET", "/api/queue", query)
        return data

    async def summary(self, now: float) -> list[LinkSummary]:
        data = await asyncio.to_thread(self._request, "GET", "/api/queue/summary")
        return [LinkSummary(**{**item, "ids": tuple(item.get("ids", ()))}) for item in data]

    async def get(self, queue_id: str) -> Envelope:
        return Envelope.from_json((await self._message(queue_id))["envelope"])

    async def headers(self, queue_id: str) -> bytes:
        return str((await self._message(queue_id))["headers"]).encode("utf-8")

    async def leased_by(self, queue_id: str) -> str:
        return str((await self._message(queue_id)).get("leased_by", ""))

    # -- changes -------------------------------------------------------------------------------------
    async def freeze(self, queue_id: str) -> Envelope:
        return await self._change_message(queue_id, "freeze")

    async def thaw(self, queue_id: str) -> Envelope:
        return await self._change_message(queue_id, "thaw")

    async def retry(self, queue_id: str) -> Envelope:
        return await self._change_message(queue_id, "retry")

    async def delete(self, queue_id: str, ndr: bool = False) -> None:
        query = {"ndr": "true"} if ndr else {}
        await asyncio.to_thread(self._request, "DELETE", f"/api/queue/{_q(queue_id)}", query)

    async def recategorize(self, queue_id: str) -> int:
        """One message (every message is a job: `start_job`)."""
        data = await asyncio.to_thread(
            self._request, "POST", "/api/queue/recategorize", None, {"id": queue_id}
        )
        return int(data["recategorized"])

    # -- bulk jobs -----------------------------------------------------------------------------------
    async def start_job(self, request: BulkRequest) -> tuple[JobStatus, bool]:
        """Ask the service to start a bulk job; it answers at once (202) with the job, or with the one
        already doing this request (False)."""
        body: dict[str, Any] | None = None
        if request.link:
            path = f"/api/links/{_q(request.link)}/{request.kind}"
        elif request.kind == "retry":
            path, body = "/api/queue/retry", {"domain": request.domain}
        elif request.kind == "recategorize":
            path, body = "/api/queue/recategorize", {"id": ""}
        elif request.kind == "delete":
            path, body = "/api/queue/delete", {"all": True, "ndr": request.ndr}
        else:
            path = f"/api/queue/{request.kind}"
        data = await asyncio.to_thread(self._request, "POST", path, None, body)
        return JobStatus.from_json(data["job"]), not data.get("already_running", False)

    async def job(self, job_id: str) -> JobStatus:
        data = await asyncio.to_thread(
            self._request, "GET", f"/api/jobs/{_q(job_id)}", None, None, POLL_TIMEOUT
        )
        return JobStatus.from_json(data["job"])

    async def recent_jobs(self) -> list[JobStatus]:
        data = await asyncio.to_thread(self._request, "GET", "/api/jobs")
        return [JobStatus.from_json(job) for job in data["jobs"]]

    # -- HTTP ----------------------------------------------------------------------------------------
    async def _change_message(self, queue_id: str, action: str) -> Envelope:
        await asyncio.to_thread(self._request, "POST", f"/api/queue/{_q(queue_id)}/{action}")
        return await self.get(queue_id)

    async def _message(self, queue_id: str) -> dict[str, Any]:
        data: dict[str, Any] = await asyncio.to_thread(self._request, "GET", f"/api/queue/{_q(queue_id)}")
        return data

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        timeout: float = TIMEOUT,
    ) -> Any:
        url = self.base_url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        payload = json.dumps(body).encode() if body is not None else (b"" if method != "GET" else None)
        request = urllib.request.Request(url, data=payload, method=method)
        request.add_header("Accept", "application/json")
        if body is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise AdminError(_error_text(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError):
                raise ServiceSilent(
                    f"the running service's admin API at {self.base_url} did not answer {method} {path} "
                    f"within {timeout:.0f} s (busy?); it may have done it all the same"
                ) from None
            raise AdminError(
                f"the service holds the queue but its admin API at {self.base_url} does not answer "
                f"({reason}); is admin.listen the same in this config as in the running service's?"
            ) from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        message = str(json.loads(exc.read()).get("error", ""))
    except (ValueError, AttributeError, OSError):
        message = ""
    if exc.code in (401, 403) and not message:
        message = "the admin API refused the request"
    if exc.code in (401, 403):
        message += " (the CLI sends the token from admin.token_file, or <root>/admin.token)"
    return message or f"the admin API answered HTTP {exc.code}"


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


@asynccontextmanager
async def open_admin(config: Config, open_queue: QueueOpener) -> AsyncIterator[QueueAdmin | RemoteAdmin]:
    """The queue of a stopped service (its files, under its lock), of a running one (its admin API), or
    of a cluster (the PostgreSQL database, directly). `open_queue` opens the first and the last: the
    composition root's `app.open_queue`, which the CLI passes in."""
    async with AsyncExitStack() as stack:
        admin: QueueAdmin | RemoteAdmin
        try:
            admin = await stack.enter_async_context(QueueAdmin.offline(config, open_queue))
        except ServiceRunning:
            admin = RemoteAdmin.for_config(config)
        yield admin
