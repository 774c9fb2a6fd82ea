"""Outbound AUTH with OAuth 2.0 tokens (issue 15): the real service relays to a Microsoft 365-like smart host
on loopback (STARTTLS, XOAUTH2/OAUTHBEARER only with a current token, 535 5.7.3 after a JSON error challenge
for an expired one, 550 5.7.30 to PLAIN), with an in-test TokenSource that counts its token requests.
The service's default delivery settings, but for the test fixture's short retry where a test says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpsvc.app import Service
from smtpsvc.delivery.transport import Outcome
from smtpsvc.protocol.sasl import encode_oauthbearer, encode_xoauth2
from tests.conftest import StartService, events_of, wait_until
from tests.delivery.oauthpeer import Authority, OAuthPeer, Tokens
from tests.test_relay import drop_files, send

MAILBOX = "relay@contoso.test"
PROFILE = "m365"


@pytest.fixture
async def peer() -> AsyncIterator[OAuthPeer]:
    server = OAuthPeer(Authority(), MAILBOX, trustme.CA())
    await server.start()
    yield server
    await server.stop()


async def relay(
    start_service: StartService,
    peer: OAuthPeer,
    tokens: Tokens,
    auth: dict[str, str] | None = None,
    **delivery: Any,
) -> Service:
    """The service with the peer as its smart host, logging in as MAILBOX with `auth`, tokens from `tokens`;
    every attempt's transcript recorded in TRANSCRIPTS (a delivered message's is not kept by the service)."""
    table = auth or {"mechanism": "xoauth2", "user": MAILBOX, "oauth": PROFILE}
    # The profile the auth table names (the cross-check refuses a name without one); its token endpoint is
    # never asked: the test's TokenSource stands in for the broker (tests/test_m365.py runs the real one).
    profile = f'[oauth.{PROFILE}]\nprovider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
    profile += 'client_id = "11111111-1111-1111-1111-111111111111"\nclient_secret_file = "unused.secret"\n'
    service = await start_service(
        profile, delivery={"smart_host": f"[127.0.0.1]:{peer.port}", "smart_host_auth": table, **delivery}
    )
    service.smtp_transport.tokens = tokens  # in place of the composition root's broker
    transport, seen = service.smtp_transport, TRANSCRIPTS.setdefault(id(service), [])
    deliver = transport.deliver

    async def recording(*args: Any) -> Outcome:
        outcome = await deliver(*args)
        seen.append(outcome.transcript)
        return outcome

    transport.deliver = recording  # type: ignore[method-assign]
    return service


TRANSCRIPTS: dict[int, list[list[str]]] = {}


def pending(service: Service) -> list[Any]:
    return [r for envelope in service.queue.list() for r in envelope.recipients if r.pending]


def everything_written(service: Service) -> str:
    """The event log, every attempt's transcript and the queue's envelopes (with their saved transcripts)."""
    service.events.flush()
    parts = [(service.folders["log"] / "events.jsonl").read_text()]
    parts += ["\n".join(t) for t in TRANSCRIPTS[id(service)]]
    parts += ["\n".join(s.transcript) for s in service.smtp_transport.idle_sessions()]
    parts += [p.read_text() for p in service.folders["queue"].glob("*.env")]
    return "\n".join(parts)


def assert_no_secrets(service: Service, peer: OAuthPeer, *extra: str) -> None:
    written = everything_written(service)
    assert "<redacted>" in written or "AUTH" not in written
    for token in peer.authority.issued:
        for secret in (
            token,
            encode_xoauth2(MAILBOX, token),
            encode_oauthbearer(MAILBOX, token, "127.0.0.1", peer.port),
        ):
            assert secret not in written
    for secret in extra:
        assert secret not in written


async def test_20_messages_go_over_xoauth2_with_one_token_request(
    start_service: StartService, peer: OAuthPeer
) -> None:
    tokens = Tokens(peer.authority)
    service = await relay(start_service, peer, tokens)
    for n in range(20):
        await send(service, MAILBOX, [f"user{n}@fabrikam.test"])
    await wait_until(lambda: len(peer.messages) == 20, timeout=60, what="20 deliveries")
    assert tokens.requests == 1
    assert tokens.calls <= peer.connections  # one per new connection at most, none per message
    assert peer.auths and all(a.mechanism == "XOAUTH2" and a.ok for a in peer.auths)
    assert_no_secrets(service, peer)
    transcripts = "\n".join("\n".join(t) for t in TRANSCRIPTS[id(service)])
    assert "AUTH XOAUTH2 <redacted>" in transcripts


async def test_an_expired_token_is_refreshed_once_and_the_message_delivered(
    start_service: StartService, peer: OAuthPeer
) -> None:
    tokens = Tokens(peer.authority)
    stale = await tokens.token(PROFILE)  # the source holds a token the provider no longer accepts
    peer.authority.end_every_lifetime()
    service = await relay(start_service, peer, tokens, retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    await wait_until(lambda: peer.messages, what="delivery with the refreshed token")
    assert tokens.refused == [stale] and tokens.requests == 2
    assert [a.ok for a in peer.auths] == [False, True]
    assert peer.auths[0].error_answer == ""  # XOAUTH2: an empty line answers the error challenge
    assert peer.connections == 1  # the second AUTH went on the same connection
    assert_no_secrets(service, peer)


async def test_a_peer_that_closes_after_refusing_gets_the_fresh_token_on_a_new_connection(
    start_service: StartService, peer: OAuthPeer
) -> None:
    peer.close_after_refusal = True
    tokens = Tokens(peer.authority)
    await tokens.token(PROFILE)
    peer.authority.end_every_lifetime()
    service = await relay(start_service, peer, tokens, retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    await wait_until(lambda: peer.messages, what="delivery over a second connection")
    assert tokens.requests == 2 and [a.ok for a in peer.auths] == [False, True]
    assert peer.connections == 2
    assert not events_of(service, 4000)  # delivered in the same attempt


async def test_a_fresh_token_refused_too_defers_with_cause_oauth_token_refused(
    start_service: StartService, peer: OAuthPeer
) -> None:
    peer.mailbox = "someone-else@contoso.test"  # no token of ours is ever good enough
    tokens = Tokens(peer.authority)
    service = await relay(start_service, peer, tokens, retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the deferral")
    assert event["cause"] == "oauth-token-refused"
    assert tokens.requests == 2 and len(peer.auths) == 2  # one refresh, one retry, no more
    assert [e["cause"] for e in events_of(service, 4006)] == ["oauth-token-refused"]
    [rcpt] = pending(service)
    assert "535 5.7.3" in rcpt.last_reply and "SMTP.SendAsApp" in rcpt.last_reply
    assert_no_secrets(service, peer)


async def test_plain_to_the_peer_gives_basic_auth_disabled_and_points_at_oauth(
    start_service: StartService, peer: OAuthPeer, tmp_path: Path
) -> None:
    password = tmp_path / "relay.password"
    password.write_text("Winter2026!\n")
    auth = {"user": MAILBOX, "password_file": str(password)}
    service = await relay(start_service, peer, Tokens(peer.authority), auth, retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the deferral")
    assert event["cause"] == "basic-auth-disabled"
    assert "configure an [oauth.NAME] profile" in event["text"] and 'mechanism = "xoauth2"' in event["text"]
    [host_event] = events_of(service, 4006)
    assert host_event["cause"] == "basic-auth-disabled"
    [rcpt] = pending(service)  # kept: a fixed configuration delivers it
    assert rcpt.last_reply.startswith("550 5.7.30 Basic authentication is not supported")
    assert "[basic-auth-disabled: Microsoft 365 no longer accepts a password" in rcpt.last_reply
    assert [a.mechanism for a in peer.auths] == ["PLAIN"]
    assert_no_secrets(service, peer, "Winter2026!", "V2ludGVyMjAyNiE")  # the password, and in base64


async def test_smtp_auth_disabled_for_the_mailbox_is_named_and_not_retried_with_a_new_token(
    start_service: StartService, peer: OAuthPeer
) -> None:
    peer.token_reply = (
        b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.\r\n"
    )
    peer.mailbox = "other@contoso.test"
    tokens = Tokens(peer.authority)
    service = await relay(start_service, peer, tokens, retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the deferral")
    assert event["cause"] == "smtp-auth-disabled-for-mailbox"
    assert "Set-CASMailbox" in event["text"] and "-SmtpClientAuthenticationDisabled $false" in event["text"]
    assert tokens.requests == 1  # not a token problem: no refresh


async def test_a_sender_the_login_may_not_send_as_bounces_with_sendas_denied_and_what_to_do(
    start_service: StartService, peer: OAuthPeer
) -> None:
    service = await relay(start_service, peer, Tokens(peer.authority))
    await send(service, "alice@local.test", ["bob@fabrikam.test"])
    [ndr] = await wait_until(lambda: drop_files(service), what="the NDR to alice@local.test")
    text = ndr.read_text()
    assert "5.7.60" in text and "Add-RecipientPermission" in text
    [rejected] = events_of(service, 7004)
    assert rejected["cause"] == "sendas-denied"
    assert any("[sendas-denied: " in e["text"] for e in events_of(service, 3004))  # the failure, with advice


async def test_oauthbearer_logs_in_with_host_and_port(start_service: StartService, peer: OAuthPeer) -> None:
    tokens = Tokens(peer.authority)
    auth = {"mechanism": "oauthbearer", "user": MAILBOX, "oauth": PROFILE}
    service = await relay(start_service, peer, tokens, auth)
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    await wait_until(lambda: peer.messages, what="delivery after OAUTHBEARER")
    [seen] = peer.auths
    assert (seen.mechanism, seen.user, seen.ok) == ("OAUTHBEARER", MAILBOX, True)
    assert seen.fields == {"host": "127.0.0.1", "port": str(peer.port)}
    assert_no_secrets(service, peer)


async def test_an_expired_oauthbearer_token_answers_the_error_challenge_with_control_a(
    start_service: StartService, peer: OAuthPeer
) -> None:
    tokens = Tokens(peer.authority)
    await tokens.token(PROFILE)
    peer.authority.end_every_lifetime()
    auth = {"mechanism": "oauthbearer", "user": MAILBOX, "oauth": PROFILE}
    service = await relay(start_service, peer, tokens, auth, retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    await wait_until(lambda: peer.messages, what="delivery with the refreshed token")
    assert peer.auths[0].error_answer == "AQ=="  # base64 of ^A (RFC 7628 section 3.2.3)
    assert [a.ok for a in peer.auths] == [False, True]


async def test_a_token_that_cannot_be_had_defers_with_oauth_token_failed_without_connecting(
    start_service: StartService, peer: OAuthPeer
) -> None:
    failure = (
        "[oauth.m365]: login.microsoftonline.com refused the client credentials: invalid_client "
        "(AADSTS7000215: Invalid client secret provided.); check client_secret_file"
    )
    service = await relay(start_service, peer, Tokens(peer.authority, failure=failure), retry=["1h"])
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the deferral")
    assert event["cause"] == "oauth-token-failed" and "AADSTS7000215" in event["text"]
    [rcpt] = pending(service)
    assert rcpt.last_reply == f"451 4.7.0 {failure}"
    assert peer.connections == 0


async def test_without_a_token_source_a_bearer_login_defers_and_says_which_profile(
    start_service: StartService, peer: OAuthPeer
) -> None:
    service = await relay(start_service, peer, Tokens(peer.authority), retry=["1h"])
    service.smtp_transport.tokens = None
    await send(service, MAILBOX, ["bob@fabrikam.test"])
    [event] = await wait_until(lambda: events_of(service, 4000), what="the deferral")
    assert event["cause"] == "oauth-token-failed"
    assert "delivery.smart_host_auth" in event["text"] and "[oauth.m365]" in event["text"]
    assert peer.connections == 0
