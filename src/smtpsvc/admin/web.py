"""The admin HTTP API (JSON) and the web queue viewer (server-rendered HTML), SPEC 1.5.

A Starlette application over the one admin service layer (`QueueAdmin`), so the CLI, the API and the page
can never disagree. Every change needs the token (Authorization: Bearer, or the viewer's login cookie);
without it loopback clients may read. The viewer works without JavaScript; a small inline script only
refreshes the event tail.

A bulk change (retry, freeze, thaw, delete or recategorize many messages, a link's freeze, thaw or retry)
answers `202 Accepted` at once with its job (`Location: /api/jobs/<id>`), which the client polls; the
viewer's buttons wait a few seconds for it. The application's lifespan stops running jobs when the admin
server stops.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from smtpsvc import __version__
from smtpsvc.admin import badmail as badmail_admin
from smtpsvc.admin import eventview
from smtpsvc.admin.access import COOKIE, Level, level_of
from smtpsvc.admin.jobs import BulkRequest, JobStatus
from smtpsvc.admin.service import LIST_LIMIT, TRACK_LIMIT, AdminError, BadRequest, NotFound, QueueAdmin
from smtpsvc.dsn import split_headers
from smtpsvc.model import rfc5322_date

Endpoint = Callable[[Request], Awaitable[Response]]

UI_WAIT = 5.0  # seconds a viewer button waits for its job before saying it goes on in the background


@dataclass(slots=True)
class AdminContext:
    """What the web layer needs from the running service."""

    admin: QueueAdmin
    token: str
    badmail_dir: Path
    pickup_dir: Path
    events_path: Path
    flush_events: Callable[[], None]
    metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None
    health: Callable[[], Awaitable[dict[str, Any]]]


VIEW_LINKS = 100  # links the queue page shows (the busiest)
VIEW_PER_LINK = 50  # messages it shows per link (the oldest)


def build_app(ctx: AdminContext) -> Starlette:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("smtpsvc.admin", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["age"] = _age
    env.filters["when"] = _when
    env.filters["date"] = rfc5322_date
    env.filters["q"] = lambda text: quote(str(text), safe="")
    templates = Jinja2Templates(env=env)

    def level(request: Request) -> Level:
        return level_of(
            ctx.token,
            request.client.host if request.client else None,
            request.headers.get("authorization", ""),
            request.cookies.get(COOKIE, ""),
        )

    def guard(needed: Level, endpoint: Endpoint, html: bool = False) -> Endpoint:
        async def guarded(request: Request) -> Response:
            have = level(request)
            if have < needed:
                if html:
                    return RedirectResponse("/login?" + urlencode({"note": _why(have, needed)}), 303)
                return _error(401 if have is Level.NONE else 403, _why(have, needed))
            if html and needed is Level.WRITE and not _same_origin(request):
                return _error(403, "cross-site form post refused")
            try:
                return await endpoint(request)
            except AdminError as exc:
                if html:
                    return _back(request, str(exc))
                return _error(exc.status, str(exc))

        return guarded

    # -- JSON API ------------------------------------------------------------------------------------
    async def api_queue(request: Request) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", LIST_LIMIT))
        except ValueError:
            return _error(400, "limit must be a number of messages")
        return JSONResponse(
            await ctx.admin.listing(
                q.get("state", ""),
                q.get("to", ""),
                q.get("domain", ""),
                q.get("link", ""),
                limit=max(1, limit),
            )
        )

    async def api_summary(request: Request) -> Response:
        return JSONResponse([asdict(s) for s in await ctx.admin.summary(time.time())])

    async def api_message(request: Request) -> Response:
        queue_id = request.path_params["id"]
        envelope = await ctx.admin.get(queue_id)
        leased_by = await ctx.admin.leased_by(queue_id)
        return JSONResponse(
            {
                "envelope": envelope.to_json(),
                "in_flight": bool(leased_by),
                "leased_by": leased_by,
                "headers": (await ctx.admin.headers(queue_id)).decode("utf-8", "replace"),
            }
        )

    async def api_message_action(request: Request) -> Response:
        queue_id, action = request.path_params["id"], request.path_params["action"]
        operations = {"retry": ctx.admin.retry, "freeze": ctx.admin.freeze, "thaw": ctx.admin.thaw}
        if action not in operations:
            return _error(404, f"unknown action {action!r}: retry, freeze or thaw")
        envelope = await operations[action](queue_id)
        return JSONResponse(
            {
                "id": envelope.id,
                "frozen": envelope.frozen,
                "in_flight": await ctx.admin.in_flight(envelope.id),
            }
        )

    async def api_delete(request: Request) -> Response:
        ndr = request.query_params.get("ndr", "").lower() in ("1", "true", "yes")
        envelope = await ctx.admin.delete(request.path_params["id"], ndr=ndr)
        return JSONResponse({"id": envelope.id, "deleted": True, "ndr": ndr})

    async def api_recategorize(request: Request) -> Response:
        body = await _json_body(request)
        queue_id = str(body.get("id", "") or request.query_params.get("id", ""))
        if queue_id:  # one message: done at once
            return JSONResponse({"recategorized": await ctx.admin.recategorize(queue_id)})
        return await start(BulkRequest("recategorize"))

    async def api_retry_many(request: Request) -> Response:
        body = await _json_body(request)
        domain = str(body.get("domain", "") or request.query_params.get("domain", ""))
        link = str(body.get("link", "") or request.query_params.get("link", ""))
        return await start(BulkRequest("retry", domain=domain, link=link))

    def api_bulk(kind: str) -> Endpoint:
        """POST /api/queue/freeze|thaw|delete: every queued message (delete: with {"all": true})."""

        async def endpoint(request: Request) -> Response:
            body = await _json_body(request)
            if kind == "delete" and body.get("all") is not True:
                raise BadRequest(
                    'deleting every queued message needs {"all": true} in the body (and "ndr": true to '
                    "return each to its sender); one message: DELETE /api/queue/{id}"
                )
            return await start(BulkRequest(kind, ndr=kind == "delete" and body.get("ndr") is True))

        return endpoint

    async def api_link_action(request: Request) -> Response:
        link, action = request.path_params["link"], request.path_params["action"]
        if action not in ("freeze", "thaw", "retry"):
            return _error(404, f"unknown action {action!r}: retry, freeze or thaw")
        return await start(BulkRequest(action, link=link))

    async def start(bulk: BulkRequest) -> Response:
        status, started = await ctx.admin.start_job(bulk)
        body: dict[str, Any] = {"job": status.to_json()}
        if not started:
            body["already_running"] = True  # one job per request at a time: this is the one doing it
        return JSONResponse(body, status_code=202, headers={"Location": f"/api/jobs/{status.id}"})

    async def api_jobs(request: Request) -> Response:
        return JSONResponse({"jobs": [job.to_json() for job in await ctx.admin.recent_jobs()]})

    async def api_job(request: Request) -> Response:
        return JSONResponse({"job": (await ctx.admin.job(request.path_params["id"])).to_json()})

    async def api_badmail(request: Request) -> Response:
        return JSONResponse([asdict(i) for i in badmail_admin.items(ctx.badmail_dir)])

    async def api_badmail_item(request: Request) -> Response:
        item, envelope, content = badmail_admin.show(ctx.badmail_dir, request.path_params["name"])
        return JSONResponse({**asdict(item), "envelope": envelope, "headers": _headers_text(content)})

    async def api_badmail_replay(request: Request) -> Response:
        target = badmail_admin.replay(ctx.badmail_dir, ctx.pickup_dir, request.path_params["name"])
        ctx.admin.log_action(f"Badmail {request.path_params['name']} replayed through Pickup")
        return JSONResponse({"name": request.path_params["name"], "pickup_file": target.name})

    async def api_events(request: Request) -> Response:
        q = request.query_params
        try:
            event_id = int(q["id"]) if q.get("id") else None
            limit = min(int(q.get("limit", "100")), 1000)
        except ValueError:
            return _error(400, "id and limit must be numbers")
        ctx.flush_events()
        return JSONResponse(eventview.tail(ctx.events_path, limit, q.get("since", ""), event_id))

    async def track(request: Request) -> dict[str, Any]:
        """GET /api/track and the viewer's search: the same query, the same document (QueueAdmin.track)."""
        q = request.query_params
        try:
            limit = min(int(q.get("limit") or TRACK_LIMIT), 1000)
        except ValueError:
            raise BadRequest("limit must be a number of messages") from None
        ctx.flush_events()  # the events and protocol log lines of the last second too
        return await ctx.admin.track(
            q.get("sender", ""), q.get("recipient", ""), q.get("id", ""), q.get("since", ""), max(1, limit)
        )

    async def api_track(request: Request) -> Response:
        return JSONResponse(await track(request))

    async def page_track(request: Request) -> Response:
        q = request.query_params
        form = {k: q.get(k, "") for k in ("sender", "recipient", "id", "since")}
        searched = any(form.values()) or "search" in q
        document: dict[str, Any] = {"messages": [], "protocol_log": ""}
        error = ""
        if searched:
            try:
                document = await track(request)
            except BadRequest as exc:
                error = str(exc)
        return templates.TemplateResponse(
            request,
            "track.html",
            {
                "form": form,
                "searched": searched,
                "error": error,
                **document,
                **_page(request, level(request)),
            },
        )

    async def metrics(request: Request) -> Response:
        if ctx.metrics is None:
            return _error(404, "metrics are not enabled in this build")
        body, content_type = await ctx.metrics()
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        report = await ctx.health()
        return JSONResponse(report, status_code=200 if report.get("status") == "ok" else 503)

    # -- web viewer ----------------------------------------------------------------------------------
    async def page_queue(request: Request) -> Response:
        now = time.time()
        # From the queue's summary: the busiest links, and the oldest messages of each (a queue of a
        # million messages is not one page); only those envelopes are read.
        links = (await ctx.admin.summary(now))[:VIEW_LINKS]
        entries = await ctx.admin.entries_of([q for link in links for q in link.ids[:VIEW_PER_LINK]])
        by_id = {e.envelope.id: e for e in entries}
        links = [
            replace(link, ids=tuple(q for q in link.ids[:VIEW_PER_LINK] if q in by_id)) for link in links
        ]
        ctx.flush_events()
        return templates.TemplateResponse(
            request,
            "queue.html",
            {
                "now": now,
                "links": links,
                "by_id": by_id,
                "in_flight": {e.envelope.id: e.leased_by for e in entries if e.leased_by},
                "shared": ctx.admin.store.shared,
                "badmail": badmail_admin.items(ctx.badmail_dir),
                "jobs": await ctx.admin.recent_jobs(),
                "events": eventview.tail(ctx.events_path, 20),
                **_page(request, level(request)),
            },
        )

    async def page_message(request: Request) -> Response:
        queue_id = request.path_params["id"]
        envelope = await ctx.admin.get(queue_id)
        return templates.TemplateResponse(
            request,
            "message.html",
            {
                "now": time.time(),
                "env": envelope,
                "in_flight": await ctx.admin.leased_by(queue_id),
                "shared": ctx.admin.store.shared,
                "headers": (await ctx.admin.headers(queue_id)).decode("utf-8", "replace"),
                **_page(request, level(request)),
            },
        )

    async def page_login(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", _page(request, level(request)))

    async def login(request: Request) -> Response:
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        token = form.get("token", [""])[0].strip()
        if level_of(ctx.token, None, f"Bearer {token}", "") is not Level.WRITE:
            return RedirectResponse("/login?" + urlencode({"note": "That token is not right."}), 303)
        response = RedirectResponse("/", 303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def ui_message_action(request: Request) -> Response:
        queue_id, action = request.path_params["id"], request.path_params["action"]
        if action == "delete":
            await ctx.admin.delete(queue_id)
            return _back(request, f"{queue_id} deleted", "/")
        if action == "delete-ndr":
            await ctx.admin.delete(queue_id, ndr=True)
            return _back(request, f"{queue_id} deleted; an NDR goes to the sender", "/")
        await api_message_action(request)
        return _back(request, f"{queue_id}: {action} done")

    async def ui_link_action(request: Request) -> Response:
        link, action = request.path_params["link"], request.path_params["action"]
        if action not in ("freeze", "thaw", "retry"):
            raise NotFound(f"unknown action {action!r}: retry, freeze or thaw")
        status, _ = await ctx.admin.start_job(BulkRequest(action, link=link))
        return _back(request, _job_note(await ctx.admin.jobs.wait(status.id, UI_WAIT) or status))

    async def ui_badmail_replay(request: Request) -> Response:
        await api_badmail_replay(request)
        return _back(request, f"Badmail {request.path_params['name']} replayed through Pickup")

    read, write = Level.READ, Level.WRITE
    routes = [
        Route("/api/queue", guard(read, api_queue)),
        Route("/api/queue/summary", guard(read, api_summary)),
        Route("/api/queue/recategorize", guard(write, api_recategorize), methods=["POST"]),
        Route("/api/queue/retry", guard(write, api_retry_many), methods=["POST"]),
        Route("/api/queue/freeze", guard(write, api_bulk("freeze")), methods=["POST"]),
        Route("/api/queue/thaw", guard(write, api_bulk("thaw")), methods=["POST"]),
        Route("/api/queue/delete", guard(write, api_bulk("delete")), methods=["POST"]),
        Route("/api/queue/{id}", guard(read, api_message)),
        Route("/api/queue/{id}", guard(write, api_delete), methods=["DELETE"]),
        Route("/api/queue/{id}/{action}", guard(write, api_message_action), methods=["POST"]),
        Route("/api/links/{link}/{action}", guard(write, api_link_action), methods=["POST"]),
        Route("/api/jobs", guard(read, api_jobs)),
        Route("/api/jobs/{id}", guard(read, api_job)),
        Route("/api/badmail", guard(read, api_badmail)),
        Route("/api/badmail/{name}", guard(read, api_badmail_item)),
        Route("/api/badmail/{name}/replay", guard(write, api_badmail_replay), methods=["POST"]),
        Route("/api/events", guard(read, api_events)),
        Route("/api/track", guard(read, api_track)),
        Route("/metrics", guard(read, metrics)),
        Route("/healthz", healthz),
        Route("/", guard(read, page_queue, html=True)),
        Route("/message/{id}", guard(read, page_message, html=True)),
        Route("/track", guard(read, page_track, html=True)),
        Route("/login", page_login),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/ui/queue/{id}/{action}", guard(write, ui_message_action, html=True), methods=["POST"]),
        Route("/ui/links/{link}/{action}", guard(write, ui_link_action, html=True), methods=["POST"]),
        Route("/ui/badmail/{name}/replay", guard(write, ui_badmail_replay, html=True), methods=["POST"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await ctx.admin.jobs.close("the service is stopping")

    return Starlette(routes=routes, lifespan=lifespan)


def _job_note(status: JobStatus) -> str:
    """A viewer button's one-line answer about its job."""
    what = f"{status.request.target}: {status.request.kind}"
    if status.result is not None:
        return f"{what} done ({status.result.count} message(s))"
    if status.error:
        return f"{what} failed: {status.error}"
    return f"{what} goes on in the background as job {status.id} (see Jobs below)"


def _page(request: Request, have: Level) -> dict[str, Any]:
    return {
        "can_change": have is Level.WRITE,
        "note": request.query_params.get("note", ""),
        "version": __version__,
    }


def _why(have: Level, needed: Level) -> str:
    if have is Level.NONE:
        return "This client is not on loopback: present the admin token (Authorization: Bearer …)."
    return "Changes need the admin token (admin.token_file, or <root>/admin.token when none is configured)."


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _back(request: Request, note: str, default: str = "") -> Response:
    """After a form post, back to the page it came from, with a one-line note."""
    referer = urlsplit(request.headers.get("referer", ""))
    path = default or referer.path or "/"
    if not path.startswith("/") or path.startswith("//"):
        path = "/"
    return RedirectResponse(f"{path}?{urlencode({'note': note})}", 303)


def _same_origin(request: Request) -> bool:
    """Form posts must come from our own pages (the cookie is SameSite=Strict too: belt and braces)."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if not origin:
        return True  # non-browser clients send neither, and they carry the token themselves
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _headers_text(content: bytes) -> str:
    return split_headers(content[:65536]).decode("utf-8", "replace")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def _when(due: float | None, now: float) -> str:
    if due is None:
        return "-"
    return "now" if due <= now else "in " + _age(due - now)
