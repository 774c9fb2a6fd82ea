"""`smtpsvc queue ...` on a stopped service's spool (the running service: tests/admin/test_cli_running.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from click.testing import CliRunner

from smtpsvc.app import Service
from smtpsvc.cli import main
from tests.conftest import StartService, events_of, wait_until
from tests.sink import Sink
from tests.test_relay import send


def run_sync(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={})
    return result.exit_code, result.stdout, result.stderr


async def run(*args: str) -> tuple[int, str, str]:
    """The CLI runs its own event loop (asyncio.run), so from an async test it runs in a thread."""
    return await asyncio.to_thread(run_sync, *args)


async def queued_then_stopped(start_service: StartService) -> tuple[Service, str]:
    """A service whose smart host never answers, one message queued, then stopped."""
    service = await start_service(delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]})
    await send(service, "alice@local.test", ["x@remote.test", "y@other.test"])
    [envelope] = await wait_until(
        lambda: [e for e in service.queue.list() if e.recipients[0].attempts], what="a failed first attempt"
    )
    await service.stop()
    return service, envelope.id


async def test_queue_list_shows_state_recipients_and_the_last_error(start_service: StartService) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    code, out, _ = await run("queue", "list", "-c", str(service.config_path))
    assert code == 0
    assert queue_id in out and "retry" in out and "from <alice@local.test>" in out
    assert "pending   x@remote.test" in out and "last: " in out
    code, out, _ = await run(
        "queue", "list", "-c", str(service.config_path), "--json", "--domain", "other.test"
    )
    listing = json.loads(out)
    assert listing["where"] == "the queue files (service stopped)" and listing["queued"] == 1
    [entry] = listing["messages"]
    assert entry["envelope"]["id"] == entry["id"] and entry["in_flight"] is False
    assert entry["id"] == queue_id and entry["recipients"][1]["address"] == "y@other.test"
    assert (
        json.loads(
            (await run("queue", "list", "-c", str(service.config_path), "--json", "--state", "frozen"))[1]
        )["messages"]
        == []
    )


async def test_queue_show_prints_envelope_history_headers_and_transcript(start_service: StartService) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    code, out, _ = await run("queue", "show", "-c", str(service.config_path), queue_id, "--transcript")
    assert code == 0
    assert "sender:    <alice@local.test>" in out
    assert "Subject: hello" in out  # the message headers
    assert "connect failed" in out  # the transcript of the attempt
    assert (await run("queue", "show", "-c", str(service.config_path), "NOPE"))[0] == 1


async def test_freeze_thaw_retry_and_delete_change_the_spool(start_service: StartService) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    config = str(service.config_path)
    env_file = Path(service.folders["queue"]) / f"{queue_id}.env"
    assert (await run("queue", "freeze", "-c", config, queue_id))[0] == 0
    assert json.loads(env_file.read_text())["frozen"] is True
    assert (await run("queue", "thaw", "-c", config, queue_id))[0] == 0
    assert json.loads(env_file.read_text())["frozen"] is False
    assert (await run("queue", "retry", "-c", config, queue_id))[0] == 0
    saved = json.loads(env_file.read_text())
    assert all(r["next_attempt"] <= saved["received_at"] + 3600 for r in saved["recipients"])
    code, out, _ = await run("queue", "delete", "-c", config, queue_id)
    assert code == 0 and "deleted on the queue files (service stopped)" in out
    assert not env_file.exists() and not env_file.with_suffix(".eml").exists()


async def test_delete_with_ndr_on_a_stopped_service_queues_the_report(start_service: StartService) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    config = str(service.config_path)
    code, out, _ = await run("queue", "delete", "-c", config, queue_id, "--ndr")
    assert code == 0 and "with an NDR to the sender" in out
    [report] = [json.loads(p.read_text()) for p in Path(service.folders["queue"]).glob("*.env")]
    assert report["source"] == "dsn" and report["recipients"][0]["address"] == "alice@local.test"
    assert not (Path(service.folders["queue"]) / f"{queue_id}.env").exists()
    events = [json.loads(line) for line in (service.folders["log"] / "events.jsonl").read_text().splitlines()]
    assert any(e["id"] == 3004 and e.get("status") == "4.3.2" for e in events)
    assert any(e["id"] == 9006 and "deleted with an NDR" in e["text"] for e in events)


async def test_queue_commands_on_a_running_service_without_admin_api_explain(
    start_service: StartService,
) -> None:
    service = await start_service()  # admin.listen = "" in the test config
    code, _, err = await run("queue", "list", "-c", str(service.config_path))
    assert code == 1
    assert "The service is running and its admin API is off" in err


async def test_badmail_list_show_and_replay_of_an_undeliverable_ndr(start_service: StartService) -> None:
    service = await start_service()
    bad = service.folders["badmail"]
    (bad / "Q1.bad").write_bytes(
        b"From: Mail Delivery System <postmaster@relay.test>\r\nSubject: ndr\r\n\r\nx\r\n"
    )
    (bad / "Q1.bdr").write_text(
        "This message is a delivery status notification that cannot be delivered. 5.1.1\r\n"
    )
    (bad / "Q1.bdp").write_text(json.dumps({"sender": "", "recipients": [{"address": "alice@local.test"}]}))
    config = str(service.config_path)
    code, out, _ = await run("badmail", "list", "-c", config)
    assert code == 0 and out.startswith("Q1 ") and "cannot be delivered" in out
    code, out, _ = await run("badmail", "show", "-c", config, "Q1")
    assert "Subject: ndr" in out and "alice@local.test" in out
    code, out, _ = await run("badmail", "replay", "-c", config, "Q1")  # works while the service runs
    assert code == 0
    [drop] = await wait_until(lambda: list(service.folders["drop"].glob("*.eml")), what="the replayed NDR")
    assert drop.read_bytes().startswith(b"X-Sender: <>\r\nX-Receiver: <alice@local.test>\r\n")
    assert not list(bad.iterdir())
    assert (await run("badmail", "replay", "-c", config, "Q1"))[0] == 1


async def test_reset_message_status_at_start_reroutes_queued_mail_at_once(
    start_service: StartService, sink: Sink
) -> None:
    service, queue_id = await queued_then_stopped(start_service)  # waiting an hour for a dead smart host
    again = await start_service(
        server={"root": str(service.root)},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}", "retry": ["1h"]},
        categorizer={"reset_message_status": True},
    )
    await wait_until(lambda: sink.messages, what="the re-categorized message delivered")
    assert any("ResetMessageStatus: 1" in str(e["text"]) for e in events_of(again, 9005))
    del queue_id


async def test_a_reload_reroutes_mail_whose_route_changed(start_service: StartService, sink: Sink) -> None:
    service = await start_service(
        domains={"local": ["local.test", "moved.test"]},
        delivery={"smart_host": "[127.0.0.1]:9", "retry": ["1h"]},
    )
    await send(service, "alice@local.test", ["x@remote.test"])
    await wait_until(
        lambda: [e for e in service.queue.list() if e.recipients[0].attempts], what="a failed try"
    )
    config = Path(str(service.config_path))
    config.write_text(config.read_text().replace('"[127.0.0.1]:9"', f'"[127.0.0.1]:{sink.port}"'))
    service.reload()  # what the SIGHUP handler calls, on the event loop
    await wait_until(lambda: sink.messages, what="delivery after the reload")
    assert any(e.get("cause") == "no-route" for e in events_of(service, 9005))


async def test_queue_recategorize_all_makes_messages_due_with_their_new_route(
    start_service: StartService,
) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    code, out, _ = await run("queue", "recategorize", "-c", str(service.config_path), "--all")
    assert code == 0 and out.startswith("1 message(s) re-categorized")
    saved = json.loads((Path(service.folders["queue"]) / f"{queue_id}.env").read_text())
    assert all(r["next_attempt"] < saved["received_at"] + 600 for r in saved["recipients"])
    assert (await run("queue", "recategorize", "-c", str(service.config_path)))[0] == 2


async def test_queue_recategorize_leaves_a_frozen_message_alone_and_says_to_thaw_it(
    start_service: StartService,
) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    config = str(service.config_path)
    assert (await run("queue", "freeze", "-c", config, queue_id))[0] == 0
    code, _, err = await run("queue", "recategorize", "-c", config, queue_id)
    assert code == 1 and "thaw it first" in err
    code, out, _ = await run("queue", "recategorize", "-c", config, "--all")
    assert code == 0 and out.startswith("0 message(s) re-categorized")


async def test_a_queue_command_on_a_stopped_service_reports_an_unreadable_envelope_as_event_9001(
    start_service: StartService,
) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    (service.folders["queue"] / f"{queue_id}.env").write_text("{not json")
    code, out, _ = await run("queue", "list", "-c", str(service.config_path))
    assert code == 0 and queue_id not in out
    [event] = [
        json.loads(line)
        for line in (service.folders["log"] / "events.jsonl").read_text().splitlines()
        if json.loads(line).get("cause") == "queue-file-corrupt"
    ]
    assert event["id"] == 9001
    assert event["text"].startswith(f"Queue file {queue_id} is unreadable and was moved to queue/corrupt: ")
    assert (service.folders["queue"] / "corrupt" / f"{queue_id}.env").exists()


async def test_queue_summary_groups_pending_recipients_by_link(start_service: StartService) -> None:
    service, _ = await queued_then_stopped(start_service)
    code, out, _ = await run("queue", "summary", "-c", str(service.config_path))
    assert code == 0
    [header, line] = out.strip().splitlines()
    assert header.startswith("link") and line.startswith("smarthost")
    assert line.split()[1:3] == ["1", "2"] and "retry" in line
    [entry] = json.loads((await run("queue", "summary", "-c", str(service.config_path), "--json"))[1])
    assert entry["link"] == "smarthost" and entry["recipients"] == 2 and entry["state"] == "retry"


async def test_link_and_domain_commands_on_a_stopped_service(start_service: StartService) -> None:
    service, queue_id = await queued_then_stopped(start_service)
    config = str(service.config_path)
    code, out, _ = await run("queue", "freeze", "-c", config, "--domain", "remote.test")
    assert code == 0
    assert out.startswith("link smarthost: freeze done (1 message(s) wait on it) on the queue files")
    links = json.loads((Path(service.folders["queue"]) / "links.json").read_text())
    assert links == {"frozen": ["smarthost"]}
    code, out, _ = await run("queue", "summary", "-c", config)
    assert "frozen" in out.splitlines()[1]
    code, _, err = await run("queue", "retry", "-c", config, "--link", "smarthost")
    assert code == 1 and "thaw it first" in err
    assert (await run("queue", "thaw", "-c", config, "--link", "smarthost"))[0] == 0
    code, out, _ = await run("queue", "retry", "-c", config, "--domain", "other.test")
    assert code == 0 and out.startswith("1 message(s) due now on the queue files")
    code, out, _ = await run("queue", "retry", "-c", config, "--all")
    assert code == 0 and out.startswith("1 message(s) due now")
    assert (await run("queue", "retry", "-c", config, queue_id, "--all"))[0] == 2  # one target only
    events = (service.folders["log"] / "events.jsonl").read_text()
    assert "Queue administration: link smarthost frozen" in events


async def test_badmail_commands_on_a_stopped_service(start_service: StartService) -> None:
    service = await start_service()
    await service.stop()
    bad = service.folders["badmail"]
    (bad / "S1.bad").write_bytes(
        b"From: <postmaster@relay.test>\r\nTo: bob@local.test\r\nSubject: stopped\r\n\r\nx\r\n"
    )
    (bad / "S1.bdr").write_text("Unable to deliver the report. 5.1.1\r\n")
    config = str(service.config_path)
    code, out, _ = await run("badmail", "list", "-c", config)
    assert code == 0 and out.startswith("S1 ") and "5.1.1" in out
    code, out, _ = await run("badmail", "show", "-c", config, "S1")
    assert code == 0 and "Subject: stopped" in out
    code, out, _ = await run("badmail", "replay", "-c", config, "S1")
    assert code == 0 and (service.folders["pickup"] / "replay-S1.eml").exists()
    again = await start_service(server={"root": str(service.root)})
    [dropped] = await wait_until(  # no .bdp: the envelope comes from the headers, as for any Pickup file
        lambda: list(again.folders["drop"].glob("*.eml")), what="the replayed file delivered through Pickup"
    )
    content = dropped.read_bytes()
    assert b"X-Receiver: <bob@local.test>" in content and b"Subject: stopped" in content
