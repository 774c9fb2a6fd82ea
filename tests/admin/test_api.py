"""The admin HTTP API (SPEC 1.5) on a running service: reads, changes with the token, links, Badmail, events,
/healthz and /metrics, and who may do what."""

from __future__ import annotations

import json
import shutil
import time

from prometheus_client.parser import text_string_to_metric_families

from smtpsvc.admin.access import Level, level_of
from smtpsvc.queue.local import LocalSpool
from tests.admin.conftest import Admin, job_done
from tests.conftest import events_of, wait_events, wait_until
from tests.test_relay import send


async def deferred(admin: Admin) -> str:
    """One message for x@remote.test that the smart host deferred once (it now waits an hour)."""
    admin.sink.handler.defer_everything = True
    await send(admin.service, "alice@local.test", ["x@remote.test"])
    [envelope] = await wait_until(
        lambda: [e for e in admin.service.queue.list() if e.recipients[0].attempts], what="a deferral"
    )
    return envelope.id


async def test_healthz_is_open_and_says_ok(admin: Admin) -> None:
    async with admin.client(token=False) as http:
        reply = await http.get("/healthz")
    assert reply.status_code == 200
    body = reply.json()
    assert body["status"] == "ok" and body["queue"] == 0 and body["smtp"]


async def test_loopback_reads_without_token_but_changes_need_it(admin: Admin) -> None:
    queue_id = await deferred(admin)
    async with admin.client(token=False) as http:
        listed = (await http.get("/api/queue")).json()
        assert [m["id"] for m in listed["messages"]] == [queue_id]
        refused = await http.post(f"/api/queue/{queue_id}/freeze")
        assert refused.status_code == 403 and "token" in refused.json()["error"]
        wrong = await http.post(f"/api/queue/{queue_id}/freeze", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
    assert not admin.service.queue.get(queue_id).frozen  # type: ignore[union-attr]


def test_access_levels() -> None:
    token = "t" * 32
    assert level_of(token, "192.0.2.7", "", "") is Level.NONE
    assert level_of(token, "192.0.2.7", f"Bearer {token}", "") is Level.WRITE
    assert level_of(token, "127.0.0.1", "", "") is Level.READ
    assert level_of(token, "::1", "", token) is Level.WRITE  # the viewer's cookie
    assert level_of("", "127.0.0.1", "Bearer ", "") is Level.READ  # no token configured: nobody writes


async def test_a_deferred_message_is_listed_under_its_link_with_its_details(admin: Admin) -> None:
    queue_id = await deferred(admin)
    async with admin.client() as http:
        [link] = (await http.get("/api/queue/summary")).json()
        assert link["link"] == "smarthost" and link["state"] == "retry" and link["ids"] == [queue_id]
        detail = (await http.get(f"/api/queue/{queue_id}")).json()
        assert detail["envelope"]["sender"] == "alice@local.test"
        assert "Subject: hello" in detail["headers"]
        assert "450 4.3.2" in detail["envelope"]["recipients"][0]["last_reply"]
        assert (await http.get("/api/queue/NOPE")).status_code == 404
        only = (await http.get("/api/queue", params={"state": "frozen"})).json()
        assert only["messages"] == []


async def test_freezing_a_link_stops_delivery_and_thaw_plus_retry_delivers(admin: Admin) -> None:
    queue_id = await deferred(admin)
    service = admin.service
    async with admin.client() as http:
        frozen = await job_done(http, await http.post("/api/links/smarthost/freeze"))
        assert frozen["kind"] == "freeze" and frozen["link"] == "smarthost" and frozen["result"]["count"] == 1
        admin.sink.handler.defer_everything = False  # the peer is back, but the link is frozen
        assert (await http.post("/api/links/smarthost/retry")).status_code == 409
        assert (await http.post(f"/api/queue/{queue_id}/retry")).status_code == 200
        assert service.queue.next_due() is None  # nothing is due: the frozen link holds it
        # a frozen link still accepts mail
        await send(service, "alice@local.test", ["y@remote.test"])
        assert len((await http.get("/api/queue", params={"link": "smarthost"})).json()["messages"]) == 2
        [link] = (await http.get("/api/queue/summary")).json()
        assert link["state"] == "frozen"
        assert (await job_done(http, await http.post("/api/links/smarthost/thaw")))["state"] == "done"
        # both are due at the thaw (one was retried while frozen, one never tried): the retry may find none
        assert (await job_done(http, await http.post("/api/links/smarthost/retry")))["state"] == "done"
    await wait_until(lambda: len(admin.sink.messages) == 2, what="both messages delivered after the thaw")
    await wait_until(lambda: not service.queue.list(), what="the queue to empty")
    texts = [e["text"] for e in events_of(service, 9006)]
    assert any("link smarthost frozen" in t for t in texts) and any("thawed" in t for t in texts)


async def test_message_freeze_thaw_retry(admin: Admin) -> None:
    queue_id = await deferred(admin)
    async with admin.client() as http:
        assert (await http.post(f"/api/queue/{queue_id}/freeze")).json()["frozen"] is True
        listed = (await http.get("/api/queue", params={"state": "frozen"})).json()["messages"]
        assert [m["id"] for m in listed] == [queue_id]
        assert (await http.post(f"/api/queue/{queue_id}/retry")).status_code == 409  # thaw first
        assert (await http.post(f"/api/queue/{queue_id}/bogus")).status_code == 404
        assert (await http.post(f"/api/queue/{queue_id}/thaw")).json()["frozen"] is False
        admin.sink.handler.defer_everything = False
        assert (await http.post(f"/api/queue/{queue_id}/retry")).status_code == 200
    await wait_until(lambda: admin.sink.messages, what="delivery after Force Connection")


async def test_delete_with_ndr_reports_4_3_2_to_the_sender(admin: Admin) -> None:
    queue_id = await deferred(admin)
    service = admin.service
    async with admin.client() as http:
        reply = await http.delete(f"/api/queue/{queue_id}", params={"ndr": "true"})
        assert reply.json() == {"id": queue_id, "deleted": True, "ndr": True}
        assert (await http.delete(f"/api/queue/{queue_id}")).status_code == 404
    [ndr] = await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="the NDR in Drop")
    text = ndr.read_text()
    assert "X-Receiver: <alice@local.test>" in text and "Status: 4.3.2" in text and "Action: failed" in text
    assert not (service.folders["queue"] / f"{queue_id}.env").exists()


async def test_delete_without_report_and_refused_while_being_delivered(admin: Admin) -> None:
    queue_id = await deferred(admin)
    service = admin.service
    async with admin.client() as http:
        [leased] = service.queue.lease(time.time() + 7200, 1)  # as if the scheduler were delivering it now
        try:
            busy = await http.delete(f"/api/queue/{queue_id}")
            assert busy.status_code == 409 and "being delivered" in busy.json()["error"]
        finally:
            service.queue.release(leased.id)
        assert (await http.delete(f"/api/queue/{queue_id}")).json()["ndr"] is False
    assert not service.queue.list() and not list(service.folders["drop"].glob("*.eml"))


async def test_recategorize_and_retry_by_domain(admin: Admin) -> None:
    await deferred(admin)
    async with admin.client() as http:
        recategorized = await job_done(http, await http.post("/api/queue/recategorize", json={}))
        assert recategorized["result"]["count"] == 1
        await wait_until(
            lambda: admin.service.queue.list()[0].recipients[0].attempts >= 2, what="the re-run attempt"
        )
        admin.sink.handler.defer_everything = False
        retried = await job_done(http, await http.post("/api/queue/retry", json={"domain": "remote.test"}))
        assert retried["result"]["count"] == 1
        malformed = await http.post("/api/queue/retry", content=b"not json")
        assert malformed.status_code == 400 and "not JSON" in malformed.json()["error"]
    await wait_until(lambda: admin.sink.messages, what="delivery after retry by domain")
    assert events_of(admin.service, 9005)


async def test_badmail_list_show_and_replay(admin: Admin) -> None:
    bad = admin.service.folders["badmail"]
    (bad / "Q1.bad").write_bytes(b"From: <postmaster@relay.test>\r\nSubject: ndr\r\n\r\nx\r\n")
    (bad / "Q1.bdr").write_text("Unable to deliver the report. 5.1.1\r\n")
    (bad / "Q1.bdp").write_text(json.dumps({"sender": "", "recipients": [{"address": "alice@local.test"}]}))
    async with admin.client() as http:
        [item] = (await http.get("/api/badmail")).json()
        assert item["name"] == "Q1" and "5.1.1" in item["reasons"][0]
        shown = (await http.get("/api/badmail/Q1")).json()
        assert "Subject: ndr" in shown["headers"] and shown["envelope"]["sender"] == ""
        assert (await http.post("/api/badmail/Q1/replay")).json()["pickup_file"] == "replay-Q1.eml"
        assert (await http.post("/api/badmail/Q1/replay")).status_code == 404
        assert (await http.post("/api/badmail/..%2Fx/replay")).status_code in (404, 409)
    await wait_until(lambda: list(admin.service.folders["drop"].glob("*.eml")), what="the replayed item")


async def test_events_tail_filters_by_id_and_time(admin: Admin) -> None:
    await send(admin.service, "alice@local.test", ["bob@local.test"])
    await wait_until(lambda: events_of(admin.service, 3002), what="delivery to Drop")
    await wait_events(admin.service, 3001)  # an SMTP worker's: written within a second
    async with admin.client(token=False) as http:
        received = (await http.get("/api/events", params={"id": "3001"})).json()
        assert received and all(e["id"] == 3001 for e in received)
        everything = (await http.get("/api/events", params={"limit": "1000"})).json()
        # Each process appends its own lines (a worker the session's, the main process the delivery's),
        # each within a second: the file is in time order per process, not across them.
        last = max(e["time"] for e in everything)
        assert (await http.get("/api/events", params={"since": last})).json() == []
        assert (await http.get("/api/events", params={"id": "x"})).status_code == 400


async def test_metrics_parse_and_move_when_mail_flows(admin: Admin) -> None:
    def sample(text: str, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    async with admin.client(token=False) as http:
        before = (await http.get("/metrics")).text
        await send(admin.service, "alice@local.test", ["x@remote.test"])
        await wait_until(lambda: admin.sink.messages, what="delivery")
        await wait_until(lambda: not admin.service.queue.list(), what="the queue to empty")
        after = (await http.get("/metrics")).text
    name = "smtpsvc_messages_received_total"
    assert sample(after, name, source="smtp") == sample(before, name, source="smtp") + 1
    attempts = "smtpsvc_delivery_attempts_total"
    delivered = sample(after, attempts, result="delivered", transport="smtp")
    assert delivered == sample(before, attempts, result="delivered", transport="smtp") + 1
    assert sample(after, "smtpsvc_smtp_commands_total", verb="DATA") >= 1


async def test_viewer_login_cookie_and_cross_site_posts(admin: Admin) -> None:
    queue_id = await deferred(admin)
    async with admin.client(token=False) as http:
        page = await http.get("/")
        assert page.status_code == 200 and queue_id in page.text and "sign in" in page.text
        bad = await http.post("/login", content=b"token=wrong", follow_redirects=False)
        assert bad.status_code == 303 and "not+right" in bad.headers["location"]
        good = await http.post("/login", content=f"token={admin.token}".encode(), follow_redirects=False)
        assert good.status_code == 303 and "samesite=strict" in good.headers["set-cookie"].lower()
        foreign = await http.post(
            f"/ui/queue/{queue_id}/freeze", headers={"Origin": "http://evil.test"}, follow_redirects=False
        )
        assert foreign.status_code == 403
        own = await http.post(
            f"/ui/queue/{queue_id}/freeze", headers={"Origin": admin.url}, follow_redirects=False
        )
        assert own.status_code == 303 and "freeze+done" in own.headers["location"]
        message_page = await http.get(f"/message/{queue_id}")
        assert "frozen" in message_page.text and "450 4.3.2" in message_page.text
    assert admin.service.queue.get(queue_id).frozen  # type: ignore[union-attr]


async def test_a_queue_that_cannot_be_written_answers_503_and_changes_nothing(admin: Admin) -> None:
    queue_id = await deferred(admin)
    spool = admin.service.queue
    assert isinstance(spool, LocalSpool)
    shutil.rmtree(spool.tmp_dir)
    spool.tmp_dir.write_bytes(b"")  # a file where the folder was: every envelope update fails (ENOTDIR)
    try:
        async with admin.client() as http:
            refused = await http.post(f"/api/queue/{queue_id}/freeze")
        assert refused.status_code == 503 and "cannot update" in refused.json()["error"]
    finally:
        spool.tmp_dir.unlink()
        spool.tmp_dir.mkdir()
    saved = json.loads((spool.dir / f"{queue_id}.env").read_bytes())
    assert saved["frozen"] is False  # the file on disk was not changed
    assert spool.get(queue_id).frozen is False  # type: ignore[union-attr]  # nor the service's view of it
