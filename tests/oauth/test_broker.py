"""TokenBroker against a real HTTPS token endpoint (tests/oauth/tokenserver.py, trustme CA via ca_file):
the grants as Entra checks them, one request for many callers, renewal before expiry, refused tokens,
the provider's errors, refresh-token rotation, and no secret in any output."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

import pytest
import trustme
from click.testing import CliRunner

from smtpsvc.cli import main
from smtpsvc.config import LiveConfig, render_effective
from smtpsvc.oauth import TokenBroker
from smtpsvc.tokens import CAUSE_TOKEN_FAILED, AccessToken, TokenError
from tests.conftest import wait_until
from tests.oauth.conftest import CLIENT_ID, SECRET, Clock, MakeBroker, write_profile
from tests.oauth.tokenserver import Client, TokenServer


async def test_client_secret_grant_sends_the_client_credentials_form(
    make_broker: MakeBroker, endpoint: TokenServer, clock: Clock
) -> None:
    broker = await make_broker(clock=clock)
    token = await broker.token("m365")
    assert token.value == endpoint.issued[0]
    assert token.expires_at == pytest.approx(clock.now + 3600, abs=1)
    assert endpoint.forms == [
        {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "scope": "https://outlook.office365.com/.default",
        }
    ]
    assert endpoint.problems == []


async def test_certificate_grant_sends_a_client_assertion_signed_with_the_certificate(
    make_broker: MakeBroker, endpoint: TokenServer, ca: trustme.CA, tmp_path: Path
) -> None:
    app = ca.issue_cert("relay-app.contoso.test", key_type=trustme.KeyType.RSA)
    certificate, key = tmp_path / "app.crt", tmp_path / "app.key"
    app.cert_chain_pems[0].write_to_path(str(certificate))
    app.private_key_pem.write_to_path(str(key))
    endpoint.clients[CLIENT_ID] = Client(certificate_pem=app.cert_chain_pems[0].bytes())
    broker = await make_broker(client_secret_file=None, certificate_file=str(certificate), key_file=str(key))
    token = await broker.token("m365")
    assert token.value == endpoint.issued[0]
    assert endpoint.problems == []  # signature, x5t, x5t#S256, aud, iss = sub, lifetime all checked
    form = endpoint.forms[0]
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    assert "client_secret" not in form


async def test_a_wrong_certificate_is_refused_permanently_with_entra_s_code(
    make_broker: MakeBroker, endpoint: TokenServer, ca: trustme.CA, tmp_path: Path
) -> None:
    registered = ca.issue_cert("registered.contoso.test", key_type=trustme.KeyType.RSA)
    other = ca.issue_cert("other.contoso.test", key_type=trustme.KeyType.RSA)
    certificate, key = tmp_path / "app.crt", tmp_path / "app.key"
    other.cert_chain_pems[0].write_to_path(str(certificate))
    other.private_key_pem.write_to_path(str(key))
    endpoint.clients[CLIENT_ID] = Client(certificate_pem=registered.cert_chain_pems[0].bytes())
    broker = await make_broker(client_secret_file=None, certificate_file=str(certificate), key_file=str(key))
    with pytest.raises(TokenError) as caught:
        await broker.token("m365")
    assert caught.value.permanent
    assert "AADSTS700027" in str(caught.value) and "certificate_file" in str(caught.value)


async def test_twenty_concurrent_callers_share_one_request(
    make_broker: MakeBroker, endpoint: TokenServer
) -> None:
    broker = await make_broker()
    endpoint.gate.clear()  # the endpoint holds its answer until all 20 are waiting for it
    callers = [asyncio.create_task(broker.token("m365")) for _ in range(20)]
    await wait_until(lambda: endpoint.requests == 1, what="the token request")
    assert not any(caller.done() for caller in callers)
    endpoint.gate.set()
    tokens = await asyncio.wait_for(asyncio.gather(*callers), 20)
    assert {t.value for t in tokens} == {endpoint.issued[0]}
    assert (await broker.token("m365")).value == endpoint.issued[0]  # and later callers get the cached one
    assert endpoint.requests == 1


async def test_a_token_near_expiry_is_renewed(
    make_broker: MakeBroker, endpoint: TokenServer, clock: Clock
) -> None:
    broker = await make_broker(clock=clock)
    first = await broker.token("m365")
    clock.now += 3000  # 50 minutes of 60: still the cached one
    assert await broker.token("m365") == first
    assert endpoint.requests == 1
    clock.now += 300  # 55 minutes: past 90% of the lifetime, renewed although not expired yet
    second = await broker.token("m365")
    assert endpoint.requests == 2
    assert second.value != first.value and second.expires_at == pytest.approx(clock.now + 3600, abs=1)


async def test_a_short_lived_token_is_used_for_half_its_lifetime(
    make_broker: MakeBroker, endpoint: TokenServer, clock: Clock
) -> None:
    endpoint.expires_in = 120  # shorter than the 5-minute margin: not renewed at every call
    broker = await make_broker(clock=clock)
    first = await broker.token("m365")
    clock.now += 50
    assert await broker.token("m365") == first
    clock.now += 20
    assert await broker.token("m365") != first
    assert endpoint.requests == 2


async def test_a_refused_token_is_replaced_once(make_broker: MakeBroker, endpoint: TokenServer) -> None:
    broker = await make_broker()
    first = await broker.token("m365")
    callers = [asyncio.create_task(broker.token("m365", refused=first)) for _ in range(5)]
    second = await callers[0]
    assert {(await c).value for c in callers} == {second.value}
    assert second.value != first.value
    assert endpoint.requests == 2  # five connections refused the same token: one new request
    assert await broker.token("m365", refused=first) == second  # a newer one is cached: no request
    assert endpoint.requests == 2


async def test_a_wrong_secret_is_a_permanent_error_naming_the_aadsts_code(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path
) -> None:
    (tmp_path / "wrong.secret").write_text("not-the-secret-value\n")
    broker = await make_broker(client_secret_file=str(tmp_path / "wrong.secret"))
    with pytest.raises(TokenError) as caught:
        await broker.token("m365")
    error = caught.value
    text = str(error)
    assert error.permanent and error.cause == CAUSE_TOKEN_FAILED
    assert text.startswith(
        'OAuth profile "m365": token request to 127.0.0.1 failed: invalid_client: AADSTS7000215'
    )
    assert "check client_secret_file" in text
    assert "Trace ID" not in text  # Entra's multi-line description: its first line only
    assert "not-the-secret-value" not in text and SECRET not in text


async def test_a_permanent_failure_is_not_asked_again_at_once(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path, clock: Clock
) -> None:
    (tmp_path / "wrong.secret").write_text("not-the-secret-value\n")
    broker = await make_broker(clock=clock, client_secret_file=str(tmp_path / "wrong.secret"))
    errors = []
    for _ in range(5):  # five messages one after the other: one token request
        with pytest.raises(TokenError) as caught:
            await broker.token("m365")
        errors.append(str(caught.value))
    assert endpoint.requests == 1 and len(set(errors)) == 1
    clock.now += 31  # then it is asked again
    with pytest.raises(TokenError):
        await broker.token("m365")
    assert endpoint.requests == 2


async def test_a_corrected_secret_file_works_at_the_next_call(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path
) -> None:
    secret = tmp_path / "fixed.secret"
    secret.write_text("wrong\n")
    broker = await make_broker(client_secret_file=str(secret))
    with pytest.raises(TokenError):
        await broker.token("m365")
    secret.write_text(SECRET + "\n")
    assert (await broker.token("m365")).value == endpoint.issued[0]


async def test_a_server_error_is_transient(make_broker: MakeBroker, endpoint: TokenServer) -> None:
    endpoint.status_override = (
        503,
        {"error": "temporarily_unavailable", "error_description": "AADSTS50196: The server is busy."},
    )
    broker = await make_broker()
    with pytest.raises(TokenError) as caught:
        await broker.token("m365")
    assert not caught.value.permanent
    assert "temporarily_unavailable: AADSTS50196" in str(caught.value)


async def test_an_unreachable_endpoint_is_transient_and_names_the_host(
    make_broker: MakeBroker, tmp_path: Path
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    broker = await make_broker(token_url=f"https://127.0.0.1:{port}/t/oauth2/v2.0/token")
    with pytest.raises(TokenError) as caught:
        await broker.token("m365")
    assert not caught.value.permanent
    assert "token request to 127.0.0.1 failed: cannot connect: Connection refused" in str(caught.value)
    assert f"HTTPS to it (port {port}) is allowed (firewall, proxy)" in str(caught.value)


async def test_an_endpoint_that_does_not_answer_times_out(
    make_broker: MakeBroker, endpoint: TokenServer
) -> None:
    endpoint.gate.clear()
    broker = await make_broker(timeout=0.5)
    with pytest.raises(TokenError) as caught:
        await asyncio.wait_for(broker.token("m365"), 20)
    assert not caught.value.permanent
    assert "no answer within 0.5 s" in str(caught.value)


async def test_an_untrusted_endpoint_certificate_points_at_ca_file(make_broker: MakeBroker) -> None:
    broker = await make_broker(ca_file=None)  # the system's CAs do not know the trustme CA
    with pytest.raises(TokenError) as caught:
        await broker.token("m365")
    assert "certificate is not trusted" in str(caught.value) and "ca_file" in str(caught.value)


async def test_refresh_token_rotation_replaces_the_file(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path
) -> None:
    refresh = tmp_path / "m365.refresh"
    refresh.write_text("rt-original\n")
    endpoint.refresh_tokens = {"rt-original"}
    endpoint.rotate = True
    broker = await make_broker(refresh_token_file=str(refresh))
    first = await broker.token("m365")
    assert endpoint.forms[0]["grant_type"] == "refresh_token"
    assert endpoint.forms[0]["refresh_token"] == "rt-original"
    rotated = refresh.read_text().strip()
    assert rotated.startswith("rt-rotated-") and rotated in endpoint.refresh_tokens
    assert stat.S_IMODE(refresh.stat().st_mode) == 0o600
    await broker.token("m365", refused=first)  # the old refresh token is retired: the new one is used
    assert endpoint.forms[1]["refresh_token"] == rotated
    assert endpoint.problems == []


async def test_an_expired_refresh_token_says_to_obtain_a_new_one(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path
) -> None:
    refresh = tmp_path / "m365.refresh"
    refresh.write_text("rt-revoked\n")
    broker = await make_broker(refresh_token_file=str(refresh))
    with pytest.raises(TokenError) as caught:
        await broker.token("m365")
    assert caught.value.permanent
    assert "invalid_grant: AADSTS700082" in str(caught.value) and "refresh_token_file" in str(caught.value)


async def test_a_failed_renewal_keeps_the_token_that_still_works(
    make_broker: MakeBroker, endpoint: TokenServer, clock: Clock, warnings: list[str]
) -> None:
    broker = await make_broker(clock=clock)
    first = await broker.token("m365")
    clock.now += 3300
    endpoint.status_override = (503, {"error": "temporarily_unavailable"})
    assert await broker.token("m365") == first
    assert endpoint.requests == 2
    assert len(warnings) == 1 and "the current token (valid for 300 s more) is used meanwhile" in warnings[0]


async def test_a_reloaded_profile_gets_its_own_token(
    tmp_path: Path, endpoint: TokenServer, ca: trustme.CA
) -> None:
    live = LiveConfig(write_profile(tmp_path, endpoint, ca))
    broker = TokenBroker(live)
    try:
        first = await broker.token("m365")
        (tmp_path / "other.secret").write_text(SECRET)
        live.current = write_profile(
            tmp_path, endpoint, ca, client_secret_file=str(tmp_path / "other.secret")
        )
        assert (await broker.token("m365")).value != first.value
        assert endpoint.requests == 2
    finally:
        await broker.close()


async def test_an_unknown_profile_is_a_permanent_error(make_broker: MakeBroker) -> None:
    broker = await make_broker()
    with pytest.raises(TokenError) as caught:
        await broker.token("google")
    assert caught.value.permanent
    assert str(caught.value) == 'no OAuth profile "google" is configured (known: m365): add [oauth.google]'


async def test_no_secret_appears_in_reprs_errors_warnings_or_config_show(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path, clock: Clock, warnings: list[str]
) -> None:
    refresh = tmp_path / "m365.refresh"
    refresh.write_text("rt-original-secret\n")
    endpoint.refresh_tokens = {"rt-original-secret"}
    endpoint.rotate = True
    broker = await make_broker(clock=clock, refresh_token_file=str(refresh))
    token = await broker.token("m365")
    clock.now += 3300
    endpoint.status_override = (503, {"error": "temporarily_unavailable"})
    await broker.token("m365")  # a warning
    endpoint.status_override = None
    (tmp_path / "m365.secret").write_text("a-wrong-secret")
    outputs = [repr(broker), repr(token), str(token), repr(broker._live.current), *warnings]
    with pytest.raises(TokenError) as caught:
        await broker.token("m365", refused=token)
    outputs += [str(caught.value), repr(caught.value), render_effective(broker._live.current)]
    shown = CliRunner().invoke(main, ["config", "show", "-c", str(tmp_path / "smtpsvc.toml")], env={})
    assert shown.exit_code == 0, shown.output
    assert str(tmp_path / "m365.secret") in shown.stdout  # the path, not the contents
    outputs.append(shown.output)
    secrets = [SECRET, "a-wrong-secret", "rt-original-secret", refresh.read_text().strip(), *endpoint.issued]
    secrets += [form["client_secret"] for form in endpoint.forms]
    for output in outputs:
        for secret in secrets:
            assert secret not in output, (secret, output)


async def test_a_token_is_not_shown_in_its_repr() -> None:
    assert "abc.def" not in repr(AccessToken("abc.def", 1.0))


async def test_a_google_profile_uses_the_refresh_token_grant_with_the_mail_scope(
    make_broker: MakeBroker, endpoint: TokenServer, tmp_path: Path
) -> None:
    refresh = tmp_path / "google.refresh"
    refresh.write_text("1//google-refresh\n")
    endpoint.refresh_tokens = {"1//google-refresh"}
    endpoint.scope = "https://mail.google.com/"
    broker = await make_broker(provider="google", tenant=None, refresh_token_file=str(refresh))
    assert (await broker.token("m365")).value == endpoint.issued[0]
    assert endpoint.forms == [
        {
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "refresh_token": "1//google-refresh",
            "scope": "https://mail.google.com/",
        }
    ]
    assert refresh.read_text() == "1//google-refresh\n"  # not rotated: the file is left alone
    assert endpoint.problems == []
