"""SMTP AUTH under attack: password guessing is slowed and then cut per client address, credentials are never
accepted (or even offered) in plaintext unless configured, never logged, and a successful AUTH is what lets
a client outside relay.allow relay (ESMTPSA in the Received header)."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path

import pytest

from smtpsvc.app import Service
from smtpsvc.auth.limiter import AuthLimiter
from tests.conftest import StartService, base_sections, wait_events, wait_until, write_config
from tests.process import ServiceProcess
from tests.rawclient import RawClient
from tests.security.conftest import Tls
from tests.security.helpers import (
    PASSWORD,
    USER,
    b64,
    greeted,
    greeted_tls,
    keywords,
    plain,
)
from tests.sink import Sink

WRONG = "Tr0ub4dor&3-wrong"


def plaintext_auth(users_file: Path) -> dict[str, object]:
    """AUTH in plaintext for a loopback client (auth.require_tls = false)."""
    return {"auth": {"users_file": str(users_file), "require_tls": False}}


def fast_limiter(service: Service) -> None:
    """Same policy (5 failures per 15 minutes), shorter pauses, so the cut-off can be reached quickly."""
    service.smtp.context.limiter = AuthLimiter(base_delay=0.05, max_delay=0.2)


async def timed(client: RawClient, line: str) -> tuple[str, float]:
    start = time.monotonic()
    reply = await client.command(line, timeout=30)
    return reply, time.monotonic() - start


async def test_wrong_passwords_get_535_and_each_answer_comes_slower(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**plaintext_auth(users_file))
    client = await greeted(service)
    first, t1 = await timed(client, f"AUTH PLAIN {plain(password=WRONG)}")
    second, _ = await timed(client, f"AUTH PLAIN {plain(password=WRONG)}")
    third, t3 = await timed(client, f"AUTH PLAIN {plain(password=WRONG)}")
    assert [first, second, third] == ["535 5.7.8 Authentication credentials invalid"] * 3
    assert t3 >= 1.5  # the limiter's pause before the third answer is 2 s
    assert t3 > t1 + 1.0
    assert [e["cause"] for e in await wait_events(service, 7010, 3)] == ["auth-failed"] * 3
    await client.close()


async def test_the_fifth_wrong_password_gets_421_and_the_connection_is_closed(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**plaintext_auth(users_file))
    fast_limiter(service)
    client = await greeted(service)
    for _ in range(4):
        assert (await client.command(f"AUTH PLAIN {plain(password=WRONG)}")).startswith("535 5.7.8")
    assert (await client.command(f"AUTH PLAIN {plain(password=WRONG)}")).startswith("421 4.7.0")
    assert await client.closed()
    assert (await wait_events(service, 7010, 5))[-1]["cause"] == "auth-rate-limited"


async def test_a_correct_password_works_before_the_cut_off(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**plaintext_auth(users_file))
    fast_limiter(service)
    client = await greeted(service)
    for _ in range(4):
        assert (await client.command(f"AUTH PLAIN {plain(password=WRONG)}")).startswith("535 5.7.8")
    assert (await client.command(f"AUTH PLAIN {plain()}")) == "235 2.7.0 Authentication successful"
    await client.close()


async def test_after_the_cut_off_even_the_right_password_is_refused_on_a_new_connection(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**plaintext_auth(users_file))
    fast_limiter(service)
    for _ in range(5):  # one guess per connection: reconnecting does not reset the count
        client = await greeted(service)
        reply = await client.command(f"AUTH LOGIN {b64(USER)}")
        assert reply == "334 UGFzc3dvcmQ6"
        await client.command(b64(WRONG))
        await client.close()
    client = await greeted(service)
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("421 4.7.0")
    assert await client.closed()


@pytest.mark.parametrize("with_cert", [True, False], ids=["cert", "no-cert"])
async def test_auth_is_neither_offered_nor_accepted_in_plaintext_when_it_requires_tls(
    start_service: StartService, users_file: Path, tls: Tls, with_cert: bool
) -> None:
    sections: dict[str, dict[str, object]] = {"auth": {"users_file": str(users_file), "require_tls": True}}
    if with_cert:
        sections["tls"] = dict(tls.section)
    service = await start_service(**sections)
    client = await greeted(service)
    assert not any(k.startswith("AUTH") for k in keywords(await client.command("EHLO client.test")))
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("538 5.7.11")
    assert (await client.command("AUTH LOGIN")).startswith("538 5.7.11")
    await client.close()


async def test_auth_is_not_offered_without_accounts(start_service: StartService, tls: Tls) -> None:
    service = await start_service(tls=tls.section, auth={"require_tls": False})
    client = await greeted(service)
    assert not any(k.startswith("AUTH") for k in keywords(await client.command("EHLO client.test")))
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("502 5.5.1")
    await client.close()


async def login(client: RawClient, mechanism: str) -> str:
    if mechanism == "PLAIN":
        return await client.command(f"AUTH PLAIN {plain()}")
    assert await client.command("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert await client.command(b64(USER)) == "334 UGFzc3dvcmQ6"
    return await client.command(b64(PASSWORD))


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_authenticated_client_may_relay_and_is_named_in_an_esmtpsa_received_header(
    sink: Sink, start_service: StartService, users_file: Path, tls: Tls, mechanism: str
) -> None:
    service = await start_service(
        tls=tls.section,
        auth={"users_file": str(users_file)},
        relay={"allow": [], "allow_authenticated": True},
        delivery={"smart_host": f"[127.0.0.1]:{sink.port}"},
    )
    client = await greeted_tls(service, tls.client_context())
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")  # not yet
    assert (await client.command("RSET")).startswith("250")  # AUTH is not allowed inside a transaction
    assert await login(client, mechanism) == "235 2.7.0 Authentication successful"
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("250 2.1.5")
    assert (await client.command("DATA")).startswith("354")
    await client.send(b"Subject: relayed\r\n\r\nhello\r\n.\r\n")
    assert (await client.reply()).startswith("250 2.6.0")
    await wait_until(lambda: sink.messages, what="relay to the sink")
    [message] = sink.messages
    received = message.content.split(b"\r\n\r\n", 1)[0].split(b"\r\nReceived:")[0]
    unfolded = received.replace(b"\r\n\t", b" ")
    assert b"with ESMTPSA" in unfolded
    assert f"Authenticated sender: {USER}".encode() in unfolded
    await client.close()


async def test_authenticated_client_may_not_relay_when_allow_authenticated_is_off(
    start_service: StartService, users_file: Path, tls: Tls
) -> None:
    service = await start_service(
        tls=tls.section,
        auth={"users_file": str(users_file)},
        relay={"allow": [], "allow_authenticated": False},
    )
    client = await greeted_tls(service, tls.client_context())
    assert await login(client, "PLAIN") == "235 2.7.0 Authentication successful"
    assert (await client.command("MAIL FROM:<a@local.test>")).startswith("250")
    assert (await client.command("RCPT TO:<x@remote.test>")).startswith("550 5.7.1")
    await client.close()


async def test_passwords_never_appear_in_the_event_log_or_on_stderr(tmp_path: Path, users_file: Path) -> None:
    root = tmp_path / "mailroot"
    config = write_config(
        tmp_path / "smtpsvc.toml",
        base_sections(root, auth={"users_file": str(users_file), "require_tls": False}),
    )
    proc = ServiceProcess(config, root)
    try:
        await asyncio.to_thread(proc.start)
        client = await RawClient.connect(proc.port)
        await client.reply()
        await client.command("EHLO client.test")
        assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
        await client.command("QUIT")
        await client.close()
        client = await RawClient.connect(proc.port)
        await client.reply()
        await client.command("EHLO client.test")
        assert (await client.command(f"AUTH PLAIN {plain(password=WRONG)}")).startswith("535")
        assert await client.command(f"AUTH LOGIN {b64(USER)}") == "334 UGFzc3dvcmQ6"
        assert (await client.command(b64(WRONG), timeout=30)).startswith("535")
        assert (await client.command(f"AUTH PLAIN {WRONG}")).startswith("501")  # a secret sent raw
        assert (await client.command("AUTH LOGIN")).startswith("334")
        assert (await client.command(f"{WRONG} {PASSWORD}")).startswith("501")  # not base64 either
        await client.command("QUIT")
        await client.close()
        assert await asyncio.to_thread(proc.terminate) == 0
    finally:
        proc.kill()
    logs = {"stderr": proc.stderr_text(), "events.jsonl": (root / "log" / "events.jsonl").read_text()}
    assert "auth-failed" in logs["events.jsonl"]  # the failures were logged, without the secrets
    secrets = [PASSWORD, WRONG, b64(PASSWORD), b64(WRONG), plain(), plain(password=WRONG)]
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} found in {name}"


async def test_an_over_long_auth_response_gets_500_and_the_session_goes_on(
    start_service: StartService, users_file: Path
) -> None:
    service = await start_service(**plaintext_auth(users_file))
    client = await greeted(service)
    assert (await client.command("AUTH PLAIN")).rstrip() == "334"
    assert (await client.command("A" * 20_000)).startswith("500 5.5.6")
    assert await client.command("NOOP") == "250 2.0.0 OK"
    assert (await client.command(f"AUTH PLAIN {plain()}")).startswith("235")
    await client.close()


async def test_an_authorization_identity_other_than_the_user_is_refused(
    start_service: StartService, users_file: Path
) -> None:
    # PLAIN's authzid would let a valid account act as another identity: not offered.
    service = await start_service(**plaintext_auth(users_file))
    client = await greeted(service)
    forged = base64.b64encode(f"postmaster\0{USER}\0{PASSWORD}".encode()).decode()
    assert (await client.command(f"AUTH PLAIN {forged}")).startswith("535 5.7.8")
    await client.close()
