"""AUTH to the default smart host (`delivery.smart_host_auth`, issue 15), PLAIN and LOGIN with a password
file, against a real peer: our own service with a trustme certificate and an account."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc.app import Service
from tests.conftest import StartService, events_of, smtp_port, wait_until
from tests.test_delivery_routes import Tls, users_file
from tests.test_relay import drop_files, send


@pytest.fixture
def tls(tmp_path: Path) -> Tls:
    return Tls(tmp_path)  # a certificate for the receiving service (TLS is opportunistic: not verified)


async def receiver(start_service: StartService, tls: Tls, tmp_path: Path, **auth: object) -> Service:
    return await start_service(
        domains={"local": ["remote.test"]},
        tls=tls.section,
        auth={"users_file": users_file(tmp_path, "relayuser", "pa55word"), **auth},
    )


def password_file(tmp_path: Path) -> str:
    secret = tmp_path / "smarthost.password"
    secret.write_text("pa55word\n")
    return str(secret)


def written(service: Service) -> str:
    service.events.flush()
    transcripts = [line for s in service.smtp_transport.idle_sessions() for line in s.transcript]
    return (service.folders["log"] / "events.jsonl").read_text() + "\n".join(transcripts)


async def test_auth_plain_to_the_default_smart_host(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    peer = await receiver(start_service, tls, tmp_path)
    relay = await start_service(
        delivery={
            "smart_host": f"[127.0.0.1]:{smtp_port(peer)}",
            "smart_host_auth": {"user": "relayuser", "password_file": password_file(tmp_path)},
        }
    )
    await send(relay, "alice@local.test", ["x@remote.test"])
    [file] = await wait_until(lambda: drop_files(peer), what="authenticated delivery through the smart host")
    data = file.read_bytes()
    assert b"(Authenticated sender: relayuser)" in data and b"with ESMTPSA" in data
    log = written(relay)
    assert "AUTH PLAIN <redacted>" in log
    assert "pa55word" not in log and "cGE1NXdvcmQ" not in log  # the password, and in base64


async def test_mechanism_login_is_used_even_where_plain_is_offered(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    peer = await receiver(start_service, tls, tmp_path)
    auth = {"user": "relayuser", "password_file": password_file(tmp_path), "mechanism": "login"}
    relay = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{smtp_port(peer)}", "smart_host_auth": auth}
    )
    await send(relay, "alice@local.test", ["x@remote.test"])
    await wait_until(lambda: drop_files(peer), what="delivery after AUTH LOGIN")
    log = written(relay)
    assert "> AUTH LOGIN" in log and "> AUTH PLAIN" not in log and "pa55word" not in log


async def test_a_mechanism_the_smart_host_does_not_offer_defers_and_says_what_it_offers(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    peer = await receiver(start_service, tls, tmp_path, mechanisms=["PLAIN"])
    auth = {"user": "relayuser", "password_file": password_file(tmp_path), "mechanism": "login"}
    relay = await start_service(
        delivery={"smart_host": f"[127.0.0.1]:{smtp_port(peer)}", "smart_host_auth": auth, "retry": ["1h"]}
    )
    await send(relay, "alice@local.test", ["x@remote.test"])
    [event] = await wait_until(lambda: events_of(relay, 4000), what="the deferral")
    assert "does not offer AUTH LOGIN (it offers AUTH PLAIN)" in event["text"]
    assert not drop_files(peer)
