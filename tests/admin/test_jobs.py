"""Bulk admin jobs (admin/jobs.py) without a service: the job table, the requests it accepts, and how the CLI
follows a job (polls that get no answer, Ctrl-C, the progress bar)."""

from __future__ import annotations

import asyncio

import pytest

from smtpsvc.admin.client import RemoteAdmin, ServiceSilent
from smtpsvc.admin.jobs import BulkRequest, JobState, JobStatus, JobStopped, JobTable, Outcome, Progress
from smtpsvc.cli import _follow, progress_line
from tests.conftest import wait_until


async def test_a_job_runs_in_the_background_and_ends_done_with_its_outcome() -> None:
    table = JobTable()
    release = asyncio.Event()

    async def work(progress: Progress) -> Outcome:
        progress(1, 2)
        await release.wait()
        progress(2, 2)
        return Outcome(2, "2 message(s)")

    status, started = table.start(BulkRequest("retry"), work)
    assert started and status.state is JobState.RUNNING
    await wait_until(lambda: table.get(status.id).done == 1, what="the first batch")  # type: ignore[union-attr]
    release.set()
    ended = await table.wait(status.id, timeout=20)
    assert ended is not None and ended.state is JobState.DONE
    assert (ended.done, ended.total, ended.result) == (2, 2, Outcome(2, "2 message(s)"))
    assert ended.finished is not None and ended.finished >= ended.started


async def test_the_same_request_while_its_job_runs_gets_that_job() -> None:
    table = JobTable()
    release = asyncio.Event()

    async def work(progress: Progress) -> Outcome:
        await release.wait()
        return Outcome(0, "")

    first, _ = table.start(BulkRequest("freeze", link="smarthost"), work)
    again, started = table.start(BulkRequest("freeze", link="smarthost"), work)
    other, other_started = table.start(BulkRequest("freeze", link="partners"), work)
    assert not started and again.id == first.id
    assert other_started and other.id != first.id
    release.set()
    await table.wait(first.id, timeout=20)
    later, started = table.start(BulkRequest("freeze", link="smarthost"), work)
    assert started and later.id != first.id  # once it has ended, the same request is a new job


async def test_a_job_whose_work_fails_ends_failed_with_the_error_text() -> None:
    table = JobTable()

    async def work(progress: Progress) -> Outcome:
        progress(256, 1000)
        raise RuntimeError("cannot update 0660E2: [Errno 20] Not a directory")

    status, _ = table.start(BulkRequest("thaw"), work)
    ended = await table.wait(status.id, timeout=20)
    assert ended is not None and ended.state is JobState.FAILED and ended.result is None
    assert ended.error == "cannot update 0660E2: [Errno 20] Not a directory"
    assert (ended.done, ended.total) == (256, 1000)


async def test_closing_the_table_stops_a_running_job_at_its_next_batch() -> None:
    table = JobTable()
    batches = 0

    async def work(progress: Progress) -> Outcome:
        nonlocal batches
        while True:
            batches += 1
            progress(batches, 1_000_000)
            await progress.next_batch()

    status, _ = table.start(BulkRequest("delete"), work)
    await wait_until(lambda: batches >= 3, what="a few batches")
    await table.close("the service is stopping")
    ended = table.get(status.id)
    assert ended is not None and ended.state is JobState.FAILED
    assert ended.error == "stopped before the end: the service is stopping"
    with pytest.raises(JobStopped, match="the service is stopping"):
        table.start(BulkRequest("retry"), work)  # no new job once closing


async def test_the_table_keeps_every_running_job_and_the_newest_finished_ones() -> None:
    table = JobTable(keep=2)
    release = asyncio.Event()

    async def quick(progress: Progress) -> Outcome:
        return Outcome(0, "")

    async def slow(progress: Progress) -> Outcome:
        await release.wait()
        return Outcome(0, "")

    running, _ = table.start(BulkRequest("recategorize"), slow)
    finished = []
    for domain in ("a.test", "b.test", "c.test"):
        status, _ = table.start(BulkRequest("retry", domain=domain), quick)
        await table.wait(status.id, timeout=20)
        finished.append(status.id)
    assert [s.id for s in table.list()] == [finished[2], finished[1], running.id]  # newest first
    release.set()
    await table.wait(running.id, timeout=20)


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (BulkRequest("retry"), ""),
        (BulkRequest("retry", domain="remote.test"), ""),
        (BulkRequest("thaw", link="smarthost"), ""),
        (BulkRequest("delete", ndr=True), ""),
        (BulkRequest("bounce"), "unknown bulk operation"),
        (BulkRequest("retry", domain="a.test", link="smarthost"), "not both"),
        (BulkRequest("freeze", domain="a.test"), "use its link"),
        (BulkRequest("delete", link="smarthost"), "not a bulk operation"),
        (BulkRequest("freeze", ndr=True), "ndr goes with delete only"),
    ],
)
def test_which_bulk_requests_are_jobs(request_: BulkRequest, problem: str) -> None:
    found = request_.problem()
    if problem:
        assert problem in found
    else:
        assert found == ""


def test_a_job_survives_its_json_round_trip() -> None:
    status = JobStatus(
        "1a2b3c4d",
        BulkRequest("delete", ndr=True),
        JobState.DONE,
        3,
        3,
        10.0,
        12.5,
        Outcome(2, "two", left=1),
    )
    assert JobStatus.from_json(status.to_json()) == status
    assert status.to_json()["description"] == "delete of every message with an NDR to each sender"


def test_the_progress_bar_shows_the_part_done_the_counts_and_the_time() -> None:
    status = JobStatus("1a2b3c4d", BulkRequest("retry"), JobState.RUNNING, 500, 1000, 0.0)
    assert progress_line(status, 12.3, width=10) == "retry of every message [#####-----]  50%  500/1000  12s"
    unknown = JobStatus("1a2b3c4d", BulkRequest("retry", link="smarthost"), JobState.RUNNING, 0, None, 0.0)
    assert progress_line(unknown, 3.0) == "retry of link smarthost [working]  0 message(s)  3s"


class _SlowService(RemoteAdmin):
    """A running service whose admin API misses two polls, then says the job is done."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9", "")
        self.polls = 0

    async def job(self, job_id: str) -> JobStatus:
        self.polls += 1
        if self.polls <= 2:
            raise ServiceSilent("the running service's admin API did not answer within 10 s")
        return JobStatus(job_id, BulkRequest("retry"), JobState.DONE, 9, 9, 0.0, 1.0, Outcome(9, "9"))


async def test_a_poll_that_gets_no_answer_is_polled_again_never_reported_as_a_failure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = _SlowService()
    running = JobStatus("1a2b3c4d", BulkRequest("retry"), JobState.RUNNING, 0, 9, 0.0)
    ended = await asyncio.wait_for(_follow(service, running), timeout=20)
    assert ended.state is JobState.DONE and ended.result == Outcome(9, "9") and service.polls == 3
    assert "still waiting for the job" in capsys.readouterr().err


async def test_ctrl_c_while_following_a_service_job_says_it_goes_on_and_how_to_check_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Busy(_SlowService):
        async def job(self, job_id: str) -> JobStatus:
            self.polls += 1
            return JobStatus(job_id, BulkRequest("retry"), JobState.RUNNING, self.polls, 10**6, 0.0)

    service = Busy()
    running = JobStatus("1a2b3c4d", BulkRequest("retry"), JobState.RUNNING, 0, 10**6, 0.0)
    task = asyncio.create_task(_follow(service, running))
    await wait_until(lambda: service.polls >= 1, what="a first poll")
    task.cancel()  # what asyncio.run does to the command at Ctrl-C
    with pytest.raises(asyncio.CancelledError):
        await task
    err = capsys.readouterr().err
    assert "job 1a2b3c4d (retry of every message) goes on in the service" in err
    assert "smtpsvc queue jobs 1a2b3c4d" in err and "GET /api/jobs/1a2b3c4d" in err
