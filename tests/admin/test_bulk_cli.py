"""`smtpsvc queue` bulk commands (retry/freeze/thaw/delete --all, recategorize --all, link changes) as jobs:
against a running service they start the job through the admin API and poll it to its end; on a stopped
one they run it in the command itself. Either way they print the result line and never a time-out."""

from __future__ import annotations

import json

import pytest

from smtpsvc.app import Service
from smtpsvc.queue.base import QueueError
from tests.admin.conftest import Admin, queue_many
from tests.conftest import StartService, wait_until
from tests.test_queue_cli import run

MANY = 300
VIA_API = "on the running service (admin API http://127.0.0.1:"
OFFLINE = "on the queue files (service stopped)"


async def stopped_with(start_service: StartService, count: int) -> Service:
    """A service whose smart host never answers, `count` messages queued, then stopped."""
    service = await start_service(delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]})
    await queue_many(service, count)
    await service.stop()
    return service


def saved(service: Service) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in service.folders["queue"].glob("*.env")]


async def test_queue_retry_all_prints_the_count_and_no_time_out(admin: Admin) -> None:
    await queue_many(admin.service, MANY)
    code, out, err = await run("queue", "retry", "-c", str(admin.service.config_path), "--all")
    assert code == 0 and out.startswith(f"{MANY} message(s) due now {VIA_API}")
    assert "timed out" not in err and "does not answer" not in err
    await wait_until(lambda: len(admin.sink.messages) == MANY, what="every message delivered")


async def test_queue_freeze_all_freezes_every_message(admin: Admin) -> None:
    ids = await queue_many(admin.service, 3)
    code, out, _ = await run("queue", "freeze", "-c", str(admin.service.config_path), "--all")
    assert code == 0 and out.startswith(f"3 message(s) frozen {VIA_API}")
    assert all(admin.service.queue.get(i).frozen for i in ids)  # type: ignore[union-attr]


async def test_queue_thaw_all_thaws_every_frozen_message(admin: Admin) -> None:
    ids = await queue_many(admin.service, 3)
    config = str(admin.service.config_path)
    assert (await run("queue", "freeze", "-c", config, ids[0]))[0] == 0
    code, out, _ = await run("queue", "thaw", "-c", config, "--all")
    assert code == 0 and out.startswith(f"1 message(s) thawed {VIA_API}")
    assert not any(admin.service.queue.get(i).frozen for i in ids)  # type: ignore[union-attr]


async def test_queue_delete_all_refuses_without_yes_and_deletes_nothing(admin: Admin) -> None:
    ids = await queue_many(admin.service, 2)
    code, out, err = await run("queue", "delete", "-c", str(admin.service.config_path), "--all")
    assert code == 2 and out == ""
    assert "delete --all destroys every queued message" in err and "Add --yes to confirm" in err
    assert all(admin.service.queue.get(i) is not None for i in ids)


async def test_queue_delete_all_yes_deletes_every_message(admin: Admin) -> None:
    await queue_many(admin.service, 3)
    code, out, _ = await run("queue", "delete", "-c", str(admin.service.config_path), "--all", "--yes")
    assert code == 0 and out.startswith(f"3 message(s) deleted {VIA_API}")
    assert admin.service.queue.list() == []


async def test_queue_delete_all_ndr_returns_each_message_to_its_sender(admin: Admin) -> None:
    ids = await queue_many(admin.service, 3)
    config = str(admin.service.config_path)
    code, out, _ = await run("queue", "delete", "-c", config, "--all", "--ndr", "--yes")
    assert code == 0 and out.startswith(f"3 message(s) deleted with an NDR to each sender {VIA_API}")
    drop = admin.service.folders["drop"]
    await wait_until(lambda: len(list(drop.glob("*.eml"))) == 3, what="three NDRs in Drop")
    texts = [path.read_text() for path in drop.glob("*.eml")]
    assert all("X-Receiver: <alice@local.test>" in t and "Status: 4.3.2" in t for t in texts)
    assert all(admin.service.queue.get(i) is None for i in ids)


async def test_the_cli_exits_1_with_the_error_of_a_failed_job(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    await queue_many(admin.service, 3)

    async def disk_full(queue_id: str, frozen: bool) -> None:
        raise QueueError(f"cannot update {queue_id}: [Errno 28] No space left on device")

    # The service's own queue fails (a broken queue/tmp/ would also stop the CLI finding the service).
    monkeypatch.setattr(admin.service.store, "set_frozen", disk_full)
    code, out, err = await run("queue", "freeze", "-c", str(admin.service.config_path), "--all")
    assert code == 1 and out == ""
    assert "(freeze of every message) failed after 3 of 3 message(s): cannot update " in err
    assert "No space left on device" in err


async def test_queue_jobs_lists_the_service_jobs_and_shows_one(admin: Admin) -> None:
    await queue_many(admin.service, 2)
    config = str(admin.service.config_path)
    assert (await run("queue", "freeze", "-c", config, "--all"))[0] == 0
    code, out, _ = await run("queue", "jobs", "-c", config)
    [line] = out.splitlines()
    job_id = line.split()[0]
    assert code == 0 and "  done " in line and "2/2" in line
    assert line.endswith("freeze of every message: every queued message frozen: 2 message(s)")
    code, out, _ = await run("queue", "jobs", "-c", config, job_id)
    assert code == 0 and f"job:       {job_id}\nwhat:      freeze of every message\nstate:     done\n" in out
    [listed] = json.loads((await run("queue", "jobs", "-c", config, "--json"))[1])
    assert listed["id"] == job_id and listed["result"]["count"] == 2
    code, _, err = await run("queue", "jobs", "-c", config, "nope")
    assert code == 1 and "no job 'nope'" in err


async def test_recategorize_all_is_a_job_with_the_same_result_line(admin: Admin) -> None:
    await queue_many(admin.service, 3)
    code, out, _ = await run("queue", "recategorize", "-c", str(admin.service.config_path), "--all")
    assert code == 0 and out.startswith(f"3 message(s) re-categorized {VIA_API}")


async def test_bulk_commands_on_a_stopped_service_run_within_the_command(start_service: StartService) -> None:
    service = await stopped_with(start_service, MANY)
    config = str(service.config_path)
    code, out, _ = await run("queue", "freeze", "-c", config, "--all")
    assert code == 0 and out == f"{MANY} message(s) frozen {OFFLINE}\n"
    assert all(env["frozen"] for env in saved(service))
    code, out, _ = await run("queue", "thaw", "-c", config, "--all")
    assert code == 0 and out == f"{MANY} message(s) thawed {OFFLINE}\n"
    code, out, err = await run("queue", "retry", "-c", config, "--all")
    assert code == 0 and out == f"{MANY} message(s) due now {OFFLINE}\n" and "timed out" not in err
    code, out, _ = await run("queue", "delete", "-c", config, "--all", "--yes")
    assert code == 0 and out == f"{MANY} message(s) deleted {OFFLINE}\n" and saved(service) == []
    events = (service.folders["log"] / "events.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["id"] == 9006 for line in events) == 4  # one per job


async def test_queue_jobs_on_a_stopped_service_says_where_jobs_live(start_service: StartService) -> None:
    service = await stopped_with(start_service, 1)
    code, out, _ = await run("queue", "jobs", "-c", str(service.config_path))
    assert code == 0 and out.startswith(f"no jobs {OFFLINE} (here a bulk command runs within the command")
    code, _, err = await run("queue", "jobs", "-c", str(service.config_path), "1a2b3c4d")
    assert code == 1 and "no job '1a2b3c4d' here" in err
