"""Relaying to Microsoft 365 end to end (issue 15): the real service, its real OAuth broker, a real HTTPS
token endpoint shaped like Entra's (trustme CA given through `ca_file`) and a Microsoft 365-like smart host
with STARTTLS that accepts `AUTH XOAUTH2` only with a token that endpoint issued and has not revoked.

Nothing stands in for smtpsvc's own parts here: the tests in tests/oauth and tests/delivery check each part
with the other one replaced; these check the wiring (the composition root hands the broker to the transport)
and the promises that only hold for the whole: one token for many messages, one refresh after a refusal, a
clear cause for a wrong secret, and no secret anywhere an operator can look.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from smtpsvc.app import Service
from smtpsvc.config import render_effective
from tests.conftest import StartService, events_of, wait_until
from tests.delivery.oauthpeer import Authority, OAuthPeer
from tests.oauth.tokenserver import Client, TokenServer, write_ca
from tests.test_relay import send

MAILBOX = "relay@contoso.test"
CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SECRET = "Xq8~client-secret-value-for-the-test.Tz"


class IssuedByTheServer(Authority):
    """The peer's view of tokens: current when the token endpoint issued it and it was not revoked since."""

    def __init__(self, server: TokenServer) -> None:
        super().__init__()
        self.server = server
        self.revoked: set[str] = set()

    def current(self, value: str) -> bool:
        return value in self.server.issued and value not in self.revoked


@pytest.fixture
async def entra(tmp_path: Path) -> AsyncIterator[TokenServer]:
    server = TokenServer(trustme.CA(), clients={CLIENT_ID: Client(secret=SECRET)})
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def office365(entra: TokenServer) -> AsyncIterator[OAuthPeer]:
    peer = OAuthPeer(IssuedByTheServer(entra), MAILBOX, trustme.CA())
    await peer.start()
    yield peer
    await peer.stop()


async def relay(
    start_service: StartService, tmp_path: Path, entra: TokenServer, peer: OAuthPeer, secret: str = SECRET
) -> Service:
    """The service as docs/microsoft365.md configures it (route A), its token endpoint and smart host ours."""
    secret_file = tmp_path / "m365.secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    profile = (
        '[oauth.m365]\nprovider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
        f'client_id = "{CLIENT_ID}"\n'
        f'client_secret_file = "{secret_file}"\ntoken_url = "{entra.token_url}"\n'
        f'ca_file = "{write_ca(entra.ca, tmp_path)}"\n'
    )
    return await start_service(
        profile,
        delivery={
            "smart_host": f"[127.0.0.1]:{peer.port}",
            "smart_host_auth": {"mechanism": "xoauth2", "user": MAILBOX, "oauth": "m365"},
        },
        admin={"listen": "127.0.0.1:0"},
    )


async def everything_an_operator_sees(service: Service) -> str:
    """Events, queue files (with their transcripts), `config show`, and the admin API's queue views."""
    service.events.flush()
    parts = [(service.folders["log"] / "events.jsonl").read_text()]
    parts += [p.read_text(errors="replace") for p in service.folders["queue"].glob("*.env")]
    parts.append(render_effective(service.config))
    assert service.admin is not None and service.admin_context is not None
    host, port = service.admin.address
    headers = {"Authorization": f"Bearer {service.admin_context.token}"}
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", headers=headers, timeout=30) as http:
        listing = await http.get("/api/queue")
        parts.append(listing.text)
        for message in listing.json()["messages"]:
            parts.append((await http.get(f"/api/queue/{message['id']}")).text)
        parts.append((await http.get("/api/events")).text)
    return "\n".join(parts)


async def assert_no_secret(service: Service, entra: TokenServer) -> None:
    seen = await everything_an_operator_sees(service)
    assert SECRET not in seen
    for token in entra.issued:
        assert token not in seen


async def test_20_messages_go_over_xoauth2_with_one_token_request(
    start_service: StartService, tmp_path: Path, entra: TokenServer, office365: OAuthPeer
) -> None:
    service = await relay(start_service, tmp_path, entra, office365)
    for n in range(20):
        await send(service, MAILBOX, [f"user{n}@fabrikam.test"])
    await wait_until(lambda: len(office365.messages) == 20, timeout=60, what="20 deliveries")
    assert entra.requests == 1 and entra.problems == []
    assert entra.forms[0]["grant_type"] == "client_credentials"
    assert entra.forms[0]["scope"] == "https://outlook.office365.com/.default"
    assert office365.auths and all(a.mechanism == "XOAUTH2" and a.ok for a in office365.auths)
    await assert_no_secret(service, entra)


async def test_a_refused_token_is_renewed_once_and_the_message_delivered(
    start_service: StartService, tmp_path: Path, entra: TokenServer, office365: OAuthPeer
) -> None:
    service = await relay(start_service, tmp_path, entra, office365)
    assert service.tokens is not None
    held = await service.tokens.token("m365")  # the broker holds a token, as after earlier deliveries
    authority = office365.authority
    assert isinstance(authority, IssuedByTheServer)
    authority.revoked.add(held.value)  # the provider no longer takes it; the broker does not know yet
    await send(service, MAILBOX, ["someone@fabrikam.test"])
    await wait_until(lambda: len(office365.messages) == 1, timeout=30, what="the delivery")
    assert entra.requests == 2  # one renewal, not one per try
    assert [a.ok for a in office365.auths] == [False, True]
    assert not events_of(service, 4000)  # delivered in the same attempt
    await assert_no_secret(service, entra)


async def test_a_wrong_secret_keeps_the_message_queued_with_the_endpoints_error(
    start_service: StartService, tmp_path: Path, entra: TokenServer, office365: OAuthPeer
) -> None:
    service = await relay(start_service, tmp_path, entra, office365, secret="not-the-secret")
    await send(service, MAILBOX, ["someone@fabrikam.test"])

    def deferred() -> list[dict[str, Any]]:
        return [e for e in events_of(service, 4000) if e.get("cause") == "oauth-token-failed"]

    [event, *_] = await wait_until(deferred, timeout=30, what="the deferral for the token")
    assert "AADSTS7000215" in event["text"] and 'OAuth profile "m365"' in event["text"]
    assert office365.messages == []
    [envelope] = service.queue.list()
    assert all(r.pending for r in envelope.recipients)
    assert "AADSTS7000215" in envelope.recipients[0].last_reply
    seen = await everything_an_operator_sees(service)
    assert "not-the-secret" not in seen and SECRET not in seen


async def probe_auth(
    tmp_path: Path, entra: TokenServer, peer: OAuthPeer, secret: str = SECRET
) -> tuple[int, str]:
    """`smtpsvc probe 127.0.0.1:PORT --auth m365` as an administrator runs it (another process; the token
    endpoint and the peer keep serving in this event loop meanwhile)."""
    secret_file = tmp_path / "probe.secret"
    secret_file.write_text(secret)
    config = tmp_path / "probe.toml"
    config.write_text(
        '[delivery]\nsmart_host_auth = { mechanism = "xoauth2", user = "relay@contoso.test", '
        'oauth = "m365" }\n\n'
        '[oauth.m365]\nprovider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
        f'client_id = "{CLIENT_ID}"\nclient_secret_file = "{secret_file}"\ntoken_url = "{entra.token_url}"\n'
        f'ca_file = "{write_ca(entra.ca, tmp_path)}"\n'
    )
    argv = [
        sys.executable,
        "-m",
        "smtpsvc",
        "probe",
        "-c",
        str(config),
        f"127.0.0.1:{peer.port}",
        "--auth",
        "m365",
    ]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout + done.stderr


async def test_probe_auth_fetches_the_token_and_logs_in_step_by_step(
    tmp_path: Path, entra: TokenServer, office365: OAuthPeer
) -> None:
    code, output = await probe_auth(tmp_path, entra, office365)
    assert code == 0, output
    assert "token:    [oauth.m365]: a token valid for 59 more minute(s)" in output
    assert "AUTH:     XOAUTH2 as relay@contoso.test: accepted (235" in output
    assert entra.requests == 1 and office365.auths[-1].ok
    assert SECRET not in output and not any(token in output for token in entra.issued)


async def test_probe_auth_with_a_wrong_secret_names_the_endpoints_error(
    tmp_path: Path, entra: TokenServer, office365: OAuthPeer
) -> None:
    code, output = await probe_auth(tmp_path, entra, office365, secret="not-the-secret")
    assert code == 0, output  # the probe ran; what it found is in its problems
    assert "problem:  no token for [oauth.m365] (cause oauth-token-failed)" in output
    assert "AADSTS7000215" in output and "not-the-secret" not in output
    assert office365.auths == []  # no login attempted without a token
