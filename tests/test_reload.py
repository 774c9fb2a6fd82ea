"""SIGHUP reload in the main process: every running part follows the new configuration, a failed reload
changes nothing, and the keys that wait for a restart are named (the workers: tests/test_workers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smtpsvc.app import Service
from smtpsvc.config import load_config
from tests.conftest import StartService, base_sections, events_of, wait_until, write_config
from tests.security.helpers import greeted
from tests.sink import Sink
from tests.test_relay import drop_files, send


def reconfigure(service: Service, **sections: dict[str, Any]) -> None:
    """Rewrite the service's configuration file: the test defaults with `sections` (then reload)."""
    write_config(Path(str(service.config_path)), base_sections(service.root, **sections))


def reload_events(service: Service, cause: str) -> list[dict[str, Any]]:
    return [e for e in events_of(service, 9002) if e.get("cause") == cause]


async def workers_reloaded(service: Service, reloads: int = 1) -> None:
    """Wait until every SMTP worker has taken the reload the main process passed on (SIGHUP: a signal,
    so a connection made at once may still meet the old configuration, as with any daemon's reload).
    `reloads`: how many reloads the test has made so far (each worker logs each one)."""
    if service.workers is not None:
        count = service.workers.count * reloads
        await wait_until(
            lambda: (
                len([e for e in reload_events(service, "config-reload") if "worker" in e["text"]]) >= count
            ),
            what="every SMTP worker's reload",
        )


async def rerouted(service: Service) -> None:
    """Wait for the re-routing a reload starts (queued mail whose route changed), so that a test sees
    only what the part under test decided."""
    await wait_until(lambda: not service._reroutes, what="the re-routing after the reload")


async def test_a_session_started_after_a_reload_has_the_new_recipient_limit(
    start_service: StartService,
) -> None:
    service = await start_service()
    reconfigure(service, server={"max_recipients": 1})
    service.reload()  # what the SIGHUP handler calls, on the event loop
    await workers_reloaded(service)
    client = await greeted(service)
    assert (await client.command("MAIL FROM:<alice@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("452 4.5.3")
    await client.close()


async def test_a_session_open_across_a_reload_keeps_the_configuration_it_started_with(
    start_service: StartService,
) -> None:
    service = await start_service()
    client = await greeted(service)
    reconfigure(service, server={"masquerade_domain": "masq.test"})
    service.reload()
    assert service.config.server.masquerade_domain == "masq.test"
    for line in ("MAIL FROM:<alice@local.test>", "RCPT TO:<bob@local.test>", "DATA"):
        assert (await client.command(line))[0] in "23"
    assert (await client.command("Subject: x\r\n\r\nbody\r\n.")).startswith("250 2.6.0")
    await client.close()
    [dropped] = await wait_until(lambda: drop_files(service), what="the delivery")
    assert dropped.read_bytes().startswith(b"X-Sender: <alice@local.test>\r\n")  # not masqueraded


async def test_after_a_reload_ingest_routes_new_mail_by_the_new_configuration(
    start_service: StartService,
) -> None:
    service = await start_service()
    for link in ("remote.test", "smarthost"):  # nothing is delivered: the route stays the one ingest chose
        await service.store.set_link_frozen(link, True)
    reconfigure(service, delivery={"smart_host": "[127.0.0.1]:9"})
    service.reload()
    await rerouted(service)
    await workers_reloaded(service)
    await send(service, "alice@local.test", ["someone@remote.test"])
    [queued] = service.queue.list()
    assert queued.recipients[0].route == "smarthost"


async def test_after_a_reload_a_failure_report_also_goes_to_the_new_send_ndr_copy_to(
    start_service: StartService, sink: Sink
) -> None:
    smart_host = {"smart_host": f"[127.0.0.1]:{sink.port}"}
    service = await start_service(delivery=smart_host)
    reconfigure(service, delivery={**smart_host, "send_ndr_copy_to": "postmaster@local.test"})
    service.reload()
    await send(service, "alice@local.test", ["reject-me@remote.test"])  # the sink answers 550
    [report] = await wait_until(lambda: drop_files(service), what="the NDR")
    lines = report.read_bytes().split(b"\r\n")
    assert lines[:3] == [
        b"X-Sender: <>",
        b"X-Receiver: <alice@local.test>",
        b"X-Receiver: <postmaster@local.test>",
    ]


async def test_after_a_reload_pickup_stamps_the_new_hostname(start_service: StartService) -> None:
    service = await start_service()
    reconfigure(service, server={"hostname": "renamed.test"})
    service.reload()
    (service.folders["pickup"] / "m.eml").write_bytes(
        b"X-Sender: <alice@local.test>\r\nX-Receiver: <bob@local.test>\r\nSubject: x\r\n\r\nbody\r\n"
    )
    [dropped] = await wait_until(lambda: drop_files(service), what="the Pickup file delivered")
    assert b"by renamed.test with Pickup" in dropped.read_bytes()


async def test_after_a_reload_the_admin_recategorizes_by_the_new_configuration(
    start_service: StartService,
) -> None:
    admin = {"listen": "127.0.0.1:0"}
    service = await start_service(admin=admin)
    for link in ("remote.test", "smarthost"):
        await service.store.set_link_frozen(link, True)
    await send(service, "alice@local.test", ["someone@remote.test"])
    [queued] = service.queue.list()
    reconfigure(service, delivery={"smart_host": "[127.0.0.1]:9"}, admin=admin)
    service.reload()
    await rerouted(service)  # re-routes it to the smart host already; the admin's run must agree
    assert service.admin_context is not None
    await service.admin_context.admin.recategorize(queued.id)
    assert service.queue.get(queued.id).recipients[0].route == "smarthost"


async def test_a_failed_reload_leaves_every_part_on_the_old_configuration(
    start_service: StartService, tmp_path: Path
) -> None:
    admin = {"listen": "127.0.0.1:0"}
    service = await start_service(admin=admin)
    before, certificate = service.config, service.smtp.context.certificate
    users = tmp_path / "users.toml"
    users.write_text("not an accounts file\n")  # the new configuration loads; its accounts file does not
    reconfigure(
        service,
        server={"max_recipients": 1, "hostname": "renamed.test"},
        auth={"users_file": str(users)},
        admin=admin,
    )
    service.reload()
    assert service.admin_context is not None
    configs = [
        service.config,
        service.ingest.config,
        service.scheduler.config,
        service.scheduler.reports.config,
        service.pickup.config,
        service.smtp.context.config,
        service.admin_context.admin.config,
    ]
    assert all(config is before for config in configs)
    assert service.smtp.context.certificate is certificate
    client = await greeted(service)  # still greets as relay.test
    assert (await client.command("MAIL FROM:<alice@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<b@local.test>")).startswith("250")
    await client.close()


async def test_a_failed_reload_is_logged_as_an_error(start_service: StartService) -> None:
    service = await start_service()
    Path(str(service.config_path)).write_text("[server]\nmax_recipients = 0\n")
    service.reload()
    [failed] = reload_events(service, "config-reload-failed")
    assert failed["level"] == "error"
    assert failed["text"].startswith("Configuration reload failed; keeping the old one: ")
    assert "server.max_recipients" in failed["text"]


async def test_a_reload_that_changes_restart_only_keys_warns_that_they_wait_for_a_restart(
    start_service: StartService,
) -> None:
    service = await start_service()
    reconfigure(service, delivery={"max_connections": 7}, resolver={"nameservers": ["127.0.0.1:5353"]})
    service.reload()
    assert reload_events(service, "config-reload")
    [warning] = reload_events(service, "config-restart-needed")
    assert warning["level"] == "warning"
    assert warning["text"] == (
        "resolver.nameservers, delivery.max_connections changed; restart the service for them to take effect"
    )


async def test_a_reload_that_changes_only_keys_in_effect_at_once_gives_no_restart_warning(
    start_service: StartService,
) -> None:
    service = await start_service()
    reconfigure(service, server={"max_recipients": 1}, delivery={"send_ndr_copy_to": "pm@local.test"})
    service.reload()
    assert reload_events(service, "config-reload")
    assert not reload_events(service, "config-restart-needed")


async def test_a_reload_keeps_the_listen_addresses_given_on_the_command_line(tmp_path: Path) -> None:
    sections = base_sections(tmp_path / "mailroot", server={"listen": ["127.0.0.1:1"]})
    path = write_config(tmp_path / "smtpsvc.toml", sections)
    config = load_config(str(path), env={}, listen_override=["127.0.0.1:0"])  # serve --listen 127.0.0.1:0
    service = Service(config, str(path), log_stream=None, pickup_interval=0.05)
    await service.start()
    try:
        service.reload()
        assert reload_events(service, "config-reload")
        assert service.config.server.listen == (("127.0.0.1", 0),)
        assert not reload_events(service, "config-restart-needed")
    finally:
        await service.stop()


KB286673_TYPO = {"inbound_command_support_options": 41943040}


async def test_kb286673s_typo_in_the_verb_mask_is_a_warning_event_at_the_start(
    start_service: StartService,
) -> None:
    service = await start_service(server=KB286673_TYPO)
    warnings = reload_events(service, "config-warning")
    assert [w["level"] for w in warnings] == ["warning"] * 3
    assert "did you mean 7697601 - 4194304 = 3503297" in warnings[-1]["text"]
    assert warnings[-1]["text"].startswith("Configuration: server.inbound_command_support_options = 41943040")


async def test_a_reload_to_kb286673s_typo_warns_about_the_verb_mask(start_service: StartService) -> None:
    service = await start_service()
    assert not reload_events(service, "config-warning")
    reconfigure(service, server=KB286673_TYPO)
    service.reload()
    assert reload_events(service, "config-reload")
    texts = [w["text"] for w in reload_events(service, "config-warning")]
    assert any("turns off 6 of the 6 verbs" in t for t in texts)
    assert any("KB286673's typo" in t for t in texts)
