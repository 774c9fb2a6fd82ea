"""SIGHUP reload: a renewed certificate is used by the next STARTTLS; a broken one keeps the old, and so
does a reload refused for another file."""

from __future__ import annotations

import ssl
from pathlib import Path

from tests.conftest import StartService
from tests.security.conftest import Tls
from tests.security.helpers import greeted, upgrade
from tests.test_reload import workers_reloaded


async def test_reload_serves_the_renewed_certificate_to_the_next_handshake(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    live = tmp_path / "live.pem"
    live.write_bytes(tls.pem.read_bytes())
    service = await start_service(tls={"cert": str(live), "key": str(live)})
    first = await greeted(service)
    await upgrade(first, tls.client_context())
    der_before = first.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await first.close()

    renewed = tls.ca.issue_cert("relay.test")  # same name, new key and serial
    renewed.private_key_and_cert_chain_pem.write_to_path(str(live))
    service.reload()
    await workers_reloaded(service)  # the SMTP workers take it on SIGHUP, within milliseconds
    second = await greeted(service)
    await upgrade(second, tls.client_context())
    der_after = second.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert der_after != der_before
    assert der_after == ssl.PEM_cert_to_DER_cert(renewed.cert_chain_pems[0].bytes().decode())
    await second.close()


async def test_reload_with_a_broken_certificate_keeps_the_working_one(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    live = tmp_path / "live.pem"
    live.write_bytes(tls.pem.read_bytes())
    service = await start_service(tls={"cert": str(live), "key": str(live)})
    live.write_text("not a certificate")
    service.reload()
    client = await greeted(service)
    await upgrade(client, tls.client_context())  # still the old, valid certificate
    assert (await client.command("EHLO client.test")).startswith("250-")
    await client.close()
    service.events.flush()
    assert "Configuration reload failed" in (service.folders["log"] / "events.jsonl").read_text()


async def test_a_reload_refused_for_its_accounts_file_keeps_the_old_certificate_too(
    start_service: StartService, tls: Tls, tmp_path: Path
) -> None:
    live = tmp_path / "live.pem"
    live.write_bytes(tls.pem.read_bytes())
    users = tmp_path / "users.toml"
    service = await start_service(tls={"cert": str(live), "key": str(live)}, auth={"users_file": str(users)})
    first = await greeted(service)
    await upgrade(first, tls.client_context())
    der_before = first.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await first.close()

    tls.ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(str(live))  # renewed
    users.write_text("not an accounts file\n")  # but the reload is refused for this
    service.reload()
    second = await greeted(service)
    await upgrade(second, tls.client_context())
    assert second.writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == der_before
    await second.close()
