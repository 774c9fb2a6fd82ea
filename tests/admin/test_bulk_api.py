"""Bulk changes through the admin API of a running service: each answers 202 at once with a job to poll
(GET /api/jobs/<id>), whatever the size of the queue, and the job ends done with its count, or failed with
the error of the queue's storage."""

from __future__ import annotations

import shutil
import time

from smtpsvc.admin.jobs import Progress
from smtpsvc.admin.service import QueueAdmin
from smtpsvc.queue.local import LocalSpool
from tests.admin.conftest import Admin, job_done, queue_many
from tests.conftest import events_of, wait_until

MANY = 300  # more than one batch (256) of the per-message jobs


def admin_layer(admin: Admin) -> QueueAdmin:
    assert admin.service.admin_context is not None
    return admin.service.admin_context.admin


async def test_a_bulk_retry_answers_202_at_once_with_a_running_job_to_poll(admin: Admin) -> None:
    await queue_many(admin.service, MANY)
    async with admin.client() as http:
        started = await http.post("/api/queue/retry", json={})
        assert started.status_code == 202
        job = started.json()["job"]
        assert (
            job["state"] == "running"
            and job["kind"] == "retry"
            and job["description"] == ("retry of every message")
        )
        assert started.headers["location"] == f"/api/jobs/{job['id']}"
        assert (await http.get(f"/api/jobs/{job['id']}")).json()["job"]["id"] == job["id"]
        await job_done(http, started)


async def test_a_bulk_retry_job_ends_done_with_the_number_of_messages_made_due(admin: Admin) -> None:
    await queue_many(admin.service, MANY)
    before = time.time()
    async with admin.client() as http:
        job = await job_done(http, await http.post("/api/queue/retry", json={}))
    assert job["state"] == "done" and job["error"] == ""
    assert job["result"]["count"] == MANY and (job["done"], job["total"]) == (MANY, MANY)
    assert job["result"]["message"] == f"retry forced for every link: {MANY} message(s)"
    await wait_until(lambda: len(admin.sink.messages) == MANY, what="every message delivered after the retry")
    assert job["finished"] >= job["started"] >= before


async def test_a_bulk_job_reports_its_progress_after_each_batch(admin: Admin) -> None:
    await queue_many(admin.service, MANY)
    seen: list[tuple[int, int]] = []
    outcome = await admin_layer(admin).set_frozen_all(True, Progress(lambda *p: seen.append(p)))
    assert outcome.count == MANY
    assert seen == [(0, MANY), (256, MANY), (MANY, MANY)]


async def test_a_bulk_job_logs_one_event_9006_with_its_count_not_one_per_message(admin: Admin) -> None:
    await queue_many(admin.service, MANY)
    async with admin.client() as http:
        job = await job_done(http, await http.post("/api/queue/freeze"))
    [event] = events_of(admin.service, 9006)
    assert event["text"] == (
        f"Queue administration: every queued message frozen: {MANY} message(s) (job {job['id']})"
    )


async def test_freeze_all_then_thaw_all_through_the_api(admin: Admin) -> None:
    ids = await queue_many(admin.service, 3)
    queue = admin.service.queue
    async with admin.client() as http:
        frozen = await job_done(http, await http.post("/api/queue/freeze"))
        assert frozen["result"]["count"] == 3
        assert all(queue.get(i).frozen for i in ids)  # type: ignore[union-attr]
        thawed = await job_done(http, await http.post("/api/queue/thaw"))
        assert thawed["result"]["count"] == 3
    assert not any(queue.get(i).frozen for i in ids)  # type: ignore[union-attr]


async def test_delete_all_needs_all_true_in_the_body(admin: Admin) -> None:
    ids = await queue_many(admin.service, 2)
    async with admin.client() as http:
        refused = await http.post("/api/queue/delete", json={"ndr": True})
        assert refused.status_code == 400 and '{"all": true}' in refused.json()["error"]
        job = await job_done(http, await http.post("/api/queue/delete", json={"all": True}))
    assert job["result"] == {
        "count": 2,
        "left": 0,
        "message": "every queued message deleted without a report: 2 message(s)",
    }
    assert all(admin.service.queue.get(i) is None for i in ids)


async def test_jobs_are_listed_newest_first_and_an_unknown_one_is_404(admin: Admin) -> None:
    await queue_many(admin.service, 2)
    async with admin.client() as http:
        first = await job_done(http, await http.post("/api/queue/freeze"))
        second = await job_done(http, await http.post("/api/queue/thaw"))
        listed = (await http.get("/api/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [second["id"], first["id"]]
        missing = await http.get("/api/jobs/nope")
        assert missing.status_code == 404 and "no job 'nope'" in missing.json()["error"]


async def test_a_job_whose_queue_storage_fails_ends_failed_with_the_error_text(admin: Admin) -> None:
    await queue_many(admin.service, 3)
    spool = admin.service.queue
    assert isinstance(spool, LocalSpool)
    shutil.rmtree(spool.tmp_dir)
    spool.tmp_dir.write_bytes(b"")  # a file where the folder was: every envelope update fails (ENOTDIR)
    try:
        async with admin.client() as http:
            job = await job_done(http, await http.post("/api/queue/freeze"))
    finally:
        spool.tmp_dir.unlink()
        spool.tmp_dir.mkdir()
    assert job["state"] == "failed" and job["result"] is None
    assert "cannot update" in job["error"]
    [event] = events_of(admin.service, 9006)
    assert "freeze of every message failed after 3 of 3 message(s)" in event["text"]
