"""Every `smtpsvc queue` and `smtpsvc badmail` command against a RUNNING service: the CLI finds the spool
locked, goes through the admin API (address from <root>/admin.address, token from <root>/admin.token) and
says so. The same commands on a stopped service: tests/test_queue_cli.py."""

from __future__ import annotations

import json

from tests.admin.conftest import Admin
from tests.admin.test_api import deferred
from tests.conftest import wait_until
from tests.test_queue_cli import run
from tests.test_relay import send

VIA_API = "the running service (admin API http://127.0.0.1:"


async def test_list_summary_and_show_through_the_api(admin: Admin) -> None:
    queue_id = await deferred(admin)
    config = str(admin.service.config_path)
    code, out, err = await run("queue", "list", "-c", config)
    assert code == 0 and queue_id in out and "retry" in out and VIA_API in err
    assert "last: 450 4.3.2" in out
    code, out, _ = await run("queue", "list", "-c", config, "--json", "--link", "smarthost")
    listing = json.loads(out)  # the document GET /api/queue answers
    assert [m["id"] for m in listing["messages"]] == [queue_id] and listing["where"] == "the running service"
    code, out, _ = await run("queue", "summary", "-c", config)
    assert code == 0 and out.splitlines()[1].startswith("smarthost")
    code, out, _ = await run("queue", "show", "-c", config, queue_id, "--transcript")
    assert code == 0 and "sender:    <alice@local.test>" in out and "Subject: hello" in out
    assert "RCPT TO:<x@remote.test>" in out  # the transcript of the deferred attempt
    code, _, err = await run("queue", "show", "-c", config, "NOPE")
    assert code == 1 and "no message 'NOPE'" in err


async def test_freeze_thaw_retry_message_and_link(admin: Admin) -> None:
    queue_id = await deferred(admin)
    config = str(admin.service.config_path)
    code, out, _ = await run("queue", "freeze", "-c", config, queue_id)
    assert code == 0 and f"{queue_id}: freeze done on {VIA_API}" in out
    assert admin.service.queue.get(queue_id).frozen  # type: ignore[union-attr]
    code, _, err = await run("queue", "retry", "-c", config, queue_id)
    assert code == 1 and "thaw it first" in err
    assert (await run("queue", "thaw", "-c", config, queue_id))[0] == 0
    code, out, _ = await run("queue", "freeze", "-c", config, "--domain", "remote.test")
    assert code == 0 and out.startswith("link smarthost: freeze done (1 message(s) wait on it)")
    assert "smarthost" in admin.service.queue.frozen_links
    code, out, _ = await run("queue", "list", "-c", config, "--state", "frozen")
    assert queue_id in out
    assert (await run("queue", "thaw", "-c", config, "--link", "smarthost"))[0] == 0
    code, _, err = await run("queue", "thaw", "-c", config, "--link", "smarthost")
    assert code == 1 and "is not frozen" in err
    admin.sink.handler.defer_everything = False
    code, out, _ = await run("queue", "retry", "-c", config, "--link", "smarthost")
    assert code == 0 and out.startswith("1 message(s) due now")
    await wait_until(lambda: admin.sink.messages, what="delivery after retry --link")


async def test_retry_all_and_by_domain_and_recategorize(admin: Admin) -> None:
    queue_id = await deferred(admin)
    config = str(admin.service.config_path)
    code, out, _ = await run("queue", "recategorize", "-c", config, queue_id)
    assert code == 0 and out.startswith("1 message(s) re-categorized on the running service")
    code, out, _ = await run("queue", "recategorize", "-c", config, "--all")
    assert code == 0
    assert (await run("queue", "retry", "-c", config))[0] == 2  # no target: a usage error
    code, out, _ = await run("queue", "retry", "-c", config, "--domain", "nowhere.test")
    assert code == 0 and out.startswith("0 message(s) due now")
    admin.sink.handler.defer_everything = False
    code, out, _ = await run("queue", "retry", "-c", config, "--all")
    assert code == 0
    await wait_until(lambda: admin.sink.messages, what="delivery after retry --all")


async def test_delete_with_and_without_ndr(admin: Admin) -> None:
    first = await deferred(admin)
    await send(admin.service, "alice@local.test", ["z@remote.test"])
    [second] = await wait_until(
        lambda: [e.id for e in admin.service.queue.list() if e.id != first and e.recipients[0].attempts],
        what="the second deferral",
    )
    config = str(admin.service.config_path)
    code, out, _ = await run("queue", "delete", "-c", config, first)
    assert code == 0 and out.startswith(f"{first}: deleted on {VIA_API}")
    code, out, _ = await run("queue", "delete", "-c", config, second, "--ndr")
    assert code == 0 and "with an NDR to the sender" in out
    [ndr] = await wait_until(lambda: list(admin.service.folders["drop"].glob("*.eml")), what="the NDR")
    assert "Status: 4.3.2" in ndr.read_text() and "z@remote.test" in ndr.read_text()
    assert (await run("queue", "delete", "-c", config, first))[0] == 1


async def test_changes_without_the_token_are_refused_with_a_hint(admin: Admin) -> None:
    queue_id = await deferred(admin)
    (admin.service.root / "admin.token").write_text("not-the-token-the-service-has\n")
    code, _, err = await run("queue", "freeze", "-c", str(admin.service.config_path), queue_id)
    assert code == 1 and "token" in err
    code, out, _ = await run("queue", "list", "-c", str(admin.service.config_path))
    assert code == 0 and queue_id in out  # loopback may still read


async def test_badmail_commands_while_running(admin: Admin) -> None:
    bad = admin.service.folders["badmail"]
    (bad / "B1.bad").write_bytes(b"From: <postmaster@relay.test>\r\nSubject: lost\r\n\r\nx\r\n")
    (bad / "B1.bdr").write_text("Unable to deliver the report. 5.1.1\r\n")
    (bad / "B1.bdp").write_text(json.dumps({"sender": "", "recipients": [{"address": "bob@local.test"}]}))
    config = str(admin.service.config_path)
    code, out, _ = await run("badmail", "list", "-c", config)
    assert code == 0 and out.startswith("B1 ")
    code, out, _ = await run("badmail", "show", "-c", config, "B1")
    assert code == 0 and "Subject: lost" in out
    code, out, _ = await run("badmail", "replay", "-c", config, "--all", "--kind", "other")
    assert code == 0 and "B1: written to" in out
    [dropped] = await wait_until(lambda: list(admin.service.folders["drop"].glob("*.eml")), what="replay")
    assert b"X-Receiver: <bob@local.test>" in dropped.read_bytes()
