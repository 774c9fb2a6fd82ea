"""The Microsoft Graph transport: a connector with transport = "graph" posts the queued MIME message to
`/users/{mailbox}/sendMail`. The stand-in for Graph is a real HTTPS endpoint on 127.0.0.1 (starlette under
uvicorn, a trustme certificate given through the connector's ca_file); the tokens come from a small
TokenSource that counts what it is asked."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from smtpsvc.app import Service
from smtpsvc.config import ConfigError, LiveConfig, load_config
from smtpsvc.delivery.graph import (
    REQUEST_LIMIT,
    GraphTransport,
    plan_recipients,
    retry_after,
    split_header,
    with_bcc,
)
from smtpsvc.model import Envelope, Recipient
from smtpsvc.routing.categorizer import choices_for
from smtpsvc.tokens import AccessToken, TokenError
from tests.conftest import base_sections, events_of, wait_until, write_config
from tests.test_relay import drop_files, queue_is_empty, send

MAILBOX = "relay@contoso.test"
MESSAGE = (
    b"From: Alice <alice@local.test>\r\nTo: Bob <bob@contoso.test>\r\nSubject: via Graph\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nfirst line\r\n.leading dot\r\n\r\nlast line \xc3\xa9\r\n"
)


# -- the stand-ins ---------------------------------------------------------------------------------------


@dataclass
class Received:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def mime(self) -> bytes:
        return base64.b64decode(self.body, validate=True)


@dataclass
class Answer:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    error: tuple[str, str] | None = None  # Graph's error code and message


class GraphStandIn:
    """HTTPS on 127.0.0.1:0 answering `POST /v1.0/users/{mailbox}/sendMail`: the scripted answers in turn,
    then 202. Records every request with the time it arrived."""

    def __init__(self, tmp_path: Path) -> None:
        ca = trustme.CA()
        self.ca_file = tmp_path / "graph-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        pem = tmp_path / "graph.pem"
        ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
        self.requests: list[Received] = []
        self.script: list[Answer] = []
        self.hold = 0.0  # seconds each request is held before its answer (to see requests overlap)
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        app = Starlette(routes=[HttpRoute("/v1.0/users/{mailbox}/sendMail", self._send, methods=["POST"])])
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            ssl_certfile=str(pem),
            ssl_keyfile=str(pem),
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="graph-stand-in", daemon=True)
        self.port = 0

    async def _send(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            self.requests.append(Received(time.time(), request.url.path, dict(request.headers), body))
            answer = self.script.pop(0) if self.script else Answer(202)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.hold:
            await asyncio.sleep(self.hold)
        with self._lock:
            self.in_flight -= 1
        if answer.error is None:
            return Response(status_code=answer.status, headers=answer.headers)
        code, message = answer.error
        content = {"error": {"code": code, "message": message}}
        return JSONResponse(content, status_code=answer.status, headers=answer.headers)

    def start(self) -> GraphStandIn:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AssertionError("the Graph stand-in did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1.0"


class Tokens:
    """A TokenSource as the broker behaves: one token per profile until it is refused, then a new one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []  # (profile, the refused token's value)
        self.issued: list[str] = []
        self.error: TokenError | None = None
        self._current: AccessToken | None = None

    async def token(self, profile: str, *, refused: AccessToken | None = None) -> AccessToken:
        self.calls.append((profile, refused.value if refused else None))
        if self.error is not None:
            raise self.error
        if self._current is None or (refused is not None and refused.value == self._current.value):
            value = f"graph-test-token-{len(self.issued) + 1}-s3cr3t"
            self.issued.append(value)
            self._current = AccessToken(value, time.time() + 3600)
        return self._current


@pytest.fixture
def graph(tmp_path: Path) -> Iterator[GraphStandIn]:
    stand_in = GraphStandIn(tmp_path).start()
    yield stand_in
    stand_in.stop()


def graph_profile(name: str, scope: str = "https://127.0.0.1/.default") -> str:
    """The [oauth.NAME] table a graph connector names (its token endpoint is never asked here: the tests'
    TokenSource stands in for the broker); its scope is for Graph's host, as the cross-check wants."""
    return (
        f'\n[oauth.{name}]\nprovider = "microsoft"\ntenant = "contoso.onmicrosoft.com"\n'
        f'client_id = "22222222-2222-2222-2222-222222222222"\nclient_secret_file = "unused.secret"\n'
        f'scope = "{scope}"\n'
    )


def graph_connector(stand_in: GraphStandIn, mailbox: str = MAILBOX, spaces: str = '["contoso.test"]') -> str:
    return (
        f'[[connector]]\nname = "m365"\naddress_spaces = {spaces}\ntransport = "graph"\noauth = "m365"\n'
        f'mailbox = "{mailbox}"\ngraph_url = "{stand_in.url}"\nca_file = "{stand_in.ca_file}"\n'
    ) + graph_profile("m365")


@pytest.fixture
async def graph_service(tmp_path: Path, graph: GraphStandIn) -> AsyncIterator[Any]:
    """Start the service with a graph connector and a test TokenSource (the broker's place in Service).
    Stopped before the stand-in (it depends on `graph`), so no connection of ours holds the stand-in open."""
    started: list[Service] = []

    async def start(stand_in: GraphStandIn, tokens: Tokens, **overrides: dict[str, Any]) -> Service:
        path = write_config(tmp_path / "smtpsvc.toml", base_sections(tmp_path / "mailroot", **overrides))
        path.write_text(path.read_text() + "\n" + graph_connector(stand_in))
        service = Service(load_config(str(path), env={}), str(path), log_stream=None, pickup_interval=0.05)
        service.tokens = tokens
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


class Message:
    """A MessageSource of given bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def open(self) -> BinaryIO:
        return io.BytesIO(self.data)

    async def xexch50(self) -> bytes | None:
        return None


def transport_for(tmp_path: Path, stand_in: GraphStandIn, tokens: Tokens) -> GraphTransport:
    path = write_config(tmp_path / "unit.toml", base_sections(tmp_path / "mailroot"))
    path.write_text(path.read_text() + "\n" + graph_connector(stand_in))
    return GraphTransport(LiveConfig(load_config(str(path), env={})), tokens)


def envelope(*recipients: str, sender: str = "alice@local.test") -> Envelope:
    return Envelope(
        id="GRAPHTEST1", sender=sender, recipients=[Recipient(address=a) for a in recipients], received_at=0.0
    )


def message_to(address: str) -> bytes:
    return MESSAGE.replace(b"bob@contoso.test", address.encode())


async def deliver(transport: GraphTransport, env: Envelope, data: bytes) -> Any:
    choice = choices_for(env.recipients[0].address, transport.live.current)[0]
    return await transport.deliver(choice, env, env.recipients, Message(data))


# -- what Graph receives ---------------------------------------------------------------------------------


async def test_graph_receives_the_mime_message_byte_exact_with_the_bearer_token(
    tmp_path: Path, graph: GraphStandIn
) -> None:
    tokens = Tokens()
    transport = transport_for(tmp_path, graph, tokens)
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), MESSAGE)
    finally:
        await transport.close()
    [request] = graph.requests
    assert request.path == f"/v1.0/users/{MAILBOX}/sendMail"
    assert request.headers["content-type"] == "text/plain"
    assert request.headers["authorization"] == f"Bearer {tokens.issued[0]}"
    assert request.mime == MESSAGE
    [result] = outcome.results
    assert result.ok and result.status == "2.0.0" and result.remote_mta == "127.0.0.1"
    assert tokens.calls == [("m365", None)]
    assert not any(tokens.issued[0] in line for line in outcome.transcript)


async def test_through_the_service_graph_gets_the_queued_message_and_drop_the_same_bytes(
    graph_service: Any, graph: GraphStandIn
) -> None:
    tokens = Tokens()
    service = await graph_service(graph, tokens)
    message = MESSAGE.replace(b"To: Bob <bob@contoso.test>", b"To: Bob <bob@contoso.test>, carol@local.test")
    await send(service, "alice@local.test", ["bob@contoso.test", "carol@local.test"], message)
    await wait_until(lambda: graph.requests and drop_files(service), what="Graph and Drop deliveries")
    await wait_until(lambda: queue_is_empty(service), what="the message done")
    dropped = drop_files(service)[0].read_bytes()
    queued = dropped.split(b"\r\n", 2)[2]  # after X-Sender and the one X-Receiver: the queued message
    assert graph.requests[0].mime == queued
    assert queued.startswith(b"Received: ") and queued.endswith(message)
    [delivered] = [e for e in events_of(service, 3002) if e.get("domain") == "contoso.test"]
    assert "Microsoft Graph" in delivered["track"]


async def test_recipients_missing_from_the_headers_go_as_bcc(tmp_path: Path, graph: GraphStandIn) -> None:
    transport = transport_for(tmp_path, graph, Tokens())
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test", "hidden@contoso.test"), MESSAGE)
    finally:
        await transport.close()
    assert all(r.ok for r in outcome.results)
    assert graph.requests[0].mime == b"Bcc: hidden@contoso.test\r\n" + MESSAGE


async def test_a_header_recipient_the_envelope_does_not_have_fails_with_5_3_3_and_nothing_is_sent(
    tmp_path: Path, graph: GraphStandIn
) -> None:
    forwarded = MESSAGE.replace(b"To: Bob <bob@contoso.test>", b"To: original@elsewhere.test")
    transport = transport_for(tmp_path, graph, Tokens())
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), forwarded)
    finally:
        await transport.close()
    [result] = outcome.results
    assert result.permanent and result.status == "5.3.3"
    assert "original@elsewhere.test" in result.reply and "SMTP connector" in result.reply
    assert graph.requests == []


# -- Graph's answers -------------------------------------------------------------------------------------


async def test_throttled_429_defers_and_the_message_goes_after_retry_after_not_before(
    graph_service: Any, graph: GraphStandIn
) -> None:
    graph.script.append(Answer(429, {"Retry-After": "2"}, ("ApplicationThrottled", "Too many requests")))
    tokens = Tokens()
    # The service's own retry schedule (15 minutes first): Retry-After, not the schedule, says when.
    service = await graph_service(graph, tokens, delivery={"retry": ["15m", "30m", "60m", "240m"]})
    await send(service, "alice@local.test", ["bob@contoso.test"], MESSAGE)
    await wait_until(lambda: len(graph.requests) >= 2, timeout=30, what="the retry after Retry-After")
    await wait_until(lambda: queue_is_empty(service), what="the message delivered")
    first, second = graph.requests
    assert second.at - first.at >= 2.0
    [deferred] = events_of(service, 4000)
    assert deferred["cause"] == "graph-throttled"
    assert "ApplicationThrottled" in deferred["text"] and "4.3.2" in deferred["text"]
    assert events_of(service, 3002)
    logs = "".join(p.read_text(errors="replace") for p in service.folders["log"].rglob("*") if p.is_file())
    assert tokens.issued and not any(token in logs for token in tokens.issued)


@pytest.mark.parametrize(
    ("status", "code", "text", "enhanced"),
    [
        (400, "ErrorMimeContentInvalid", "The MIME content is not valid.", "5.6.0"),
        (403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.", "5.7.1"),
        (404, "ErrorInvalidUser", "The requested user 'relay@contoso.test' is invalid.", "5.1.8"),
    ],
)
async def test_a_graph_refusal_fails_at_once_with_its_code_and_message_in_the_ndr(
    graph_service: Any, graph: GraphStandIn, status: int, code: str, text: str, enhanced: str
) -> None:
    graph.script.append(Answer(status, error=(code, text)))
    service = await graph_service(graph, Tokens())
    await send(service, "alice@local.test", ["bob@contoso.test"], MESSAGE)
    ndr = await wait_until(lambda: drop_files(service), what="the NDR in Drop")
    report = " ".join(ndr[0].read_bytes().decode("utf-8", "replace").split())  # unfolded
    assert f"Status: {enhanced}" in report and f"HTTP {status} {code}: {text}" in report
    assert len(graph.requests) == 1
    [bounced] = [e for e in events_of(service, 3004) if e.get("domain") == "contoso.test"]
    assert f"HTTP {status}" in bounced["text"]


async def test_401_gets_one_new_token_and_one_retry(tmp_path: Path, graph: GraphStandIn) -> None:
    graph.script.append(Answer(401, error=("InvalidAuthenticationToken", "Access token has expired.")))
    tokens = Tokens()
    transport = transport_for(tmp_path, graph, tokens)
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), MESSAGE)
    finally:
        await transport.close()
    assert [r.headers["authorization"] for r in graph.requests] == [f"Bearer {t}" for t in tokens.issued]
    assert tokens.calls == [("m365", None), ("m365", tokens.issued[0])]
    assert outcome.results[0].ok


async def test_a_second_401_defers_with_cause_oauth_token_failed(tmp_path: Path, graph: GraphStandIn) -> None:
    refused = Answer(401, error=("InvalidAuthenticationToken", "Access token validation failure."))
    graph.script += [refused, refused]
    tokens = Tokens()
    transport = transport_for(tmp_path, graph, tokens)
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), MESSAGE)
    finally:
        await transport.close()
    assert len(graph.requests) == 2 and len(tokens.calls) == 2
    [result] = outcome.results
    assert not result.ok and not result.permanent and "Mail.Send" in result.reply
    assert outcome.cause == "oauth-token-failed"


async def test_no_token_defers_with_the_token_error(tmp_path: Path, graph: GraphStandIn) -> None:
    tokens = Tokens()
    tokens.error = TokenError(
        "[oauth.m365]: the token endpoint answered AADSTS7000215: Invalid client secret"
    )
    transport = transport_for(tmp_path, graph, tokens)
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), MESSAGE)
    finally:
        await transport.close()
    [result] = outcome.results
    assert not result.ok and not result.permanent and "AADSTS7000215" in result.reply
    assert outcome.cause == "oauth-token-failed" and graph.requests == []


async def test_a_message_over_the_graph_limit_fails_with_5_3_4_and_nothing_is_sent(
    tmp_path: Path, graph: GraphStandIn
) -> None:
    big = MESSAGE + b"x" * (REQUEST_LIMIT * 3 // 4)
    transport = transport_for(tmp_path, graph, Tokens())
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), big)
    finally:
        await transport.close()
    [result] = outcome.results
    assert result.permanent and result.status == "5.3.4"
    assert "too large for Microsoft Graph" in result.reply and "SMTP connector" in result.reply
    assert graph.requests == []


async def test_while_retry_after_runs_no_request_goes_for_that_mailbox_until_an_operator_retry(
    tmp_path: Path, graph: GraphStandIn
) -> None:
    later = format_datetime(datetime.fromtimestamp(time.time() + 600, UTC), usegmt=True)  # an HTTP date
    graph.script.append(Answer(503, {"Retry-After": later}, ("ServiceUnavailable", "Try again later")))
    transport = transport_for(tmp_path, graph, Tokens())
    try:
        first = await deliver(transport, envelope("bob@contoso.test"), MESSAGE)
        second = await deliver(transport, envelope("carol@contoso.test"), message_to("carol@contoso.test"))
        transport.revive({"m365"})  # `queue retry`, ETRN: the operator asks for it now
        third = await deliver(transport, envelope("carol@contoso.test"), message_to("carol@contoso.test"))
    finally:
        await transport.close()
    assert first.cause == "graph-throttled" and first.results[0].status == "4.3.2"
    assert "ServiceUnavailable" in first.results[0].reply and not first.results[0].permanent
    assert second.results == [] and second.postponed_until >= time.time() + 500  # no attempt counted
    assert third.results[0].ok and len(graph.requests) == 2


async def test_at_most_four_requests_at_once_per_mailbox(tmp_path: Path, graph: GraphStandIn) -> None:
    graph.hold = 0.5
    transport = transport_for(tmp_path, graph, Tokens())
    try:
        outcomes = await asyncio.gather(
            *(
                deliver(transport, envelope(f"u{i}@contoso.test"), message_to(f"u{i}@contoso.test"))
                for i in range(10)
            )
        )
    finally:
        await transport.close()
    assert all(o.results[0].ok for o in outcomes) and len(graph.requests) == 10
    assert 2 <= graph.most_in_flight <= 4
    assert transport._gates == {}  # nothing kept for a mailbox with no request under way


async def test_graph_unreachable_defers_and_marks_the_route_unreachable(
    tmp_path: Path, graph: GraphStandIn
) -> None:
    transport = transport_for(tmp_path, graph, Tokens())
    graph.stop()  # nothing listens there any more
    try:
        outcome = await deliver(transport, envelope("bob@contoso.test"), MESSAGE)
    finally:
        await transport.close()
    [result] = outcome.results
    assert not result.ok and not result.permanent and result.status == "4.4.1"
    assert outcome.unreachable


# -- pure parts ------------------------------------------------------------------------------------------


def test_retry_after_takes_seconds_or_an_http_date() -> None:
    now = 1_800_000_000.0
    assert retry_after("2", now) == now + 2
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert retry_after(date, now) == now + 30
    assert retry_after("", now) is None and retry_after("soon", now) is None
    assert retry_after("999999999", now) == now + 24 * 3600  # a broken header parks no mail for ever


def test_recipient_plan_and_bcc_rewrite() -> None:
    body = b"\r\nbody\r\nTo: z@x.test\r\n"  # a To: in the body is no header
    message = b"To: a@x.test\r\nCc: B <b@x.test>\r\nBcc: c@x.test\r\nSubject: s\r\n" + body
    block, _ = split_header(message)
    plan = plan_recipients(block, ["a@x.test", "d@x.test"], ["a@x.test", "b@x.test", "c@x.test", "d@x.test"])
    assert plan.missing == ("d@x.test",) and plan.strangers == ()
    assert plan_recipients(block, ["a@x.test"], ["a@x.test"]).strangers == ("b@x.test", "c@x.test")
    rewritten = with_bcc(message, ["d@x.test"])
    assert (
        rewritten == b"Bcc: c@x.test, d@x.test\r\nTo: a@x.test\r\nCc: B <b@x.test>\r\nSubject: s\r\n" + body
    )


def test_bcc_of_many_recipients_is_folded() -> None:
    addresses = [f"user{i:04d}@contoso.test" for i in range(200)]
    rewritten = with_bcc(b"Subject: s\r\n\r\nbody\r\n", addresses)
    block, _ = split_header(rewritten)
    assert max(len(line) for line in block.split(b"\r\n")) <= 998
    assert plan_recipients(block, addresses, addresses).missing == ()


# -- configuration and routing ---------------------------------------------------------------------------


def _load(tmp_path: Path, connector: str) -> Any:
    path = write_config(tmp_path / "c.toml", base_sections(tmp_path / "mailroot"))
    path.write_text(
        path.read_text() + "\n" + connector + graph_profile("p", "https://graph.microsoft.com/.default")
    )
    return load_config(str(path), env={})


def test_a_graph_connector_routes_its_address_spaces_to_the_graph_transport(tmp_path: Path) -> None:
    config = _load(
        tmp_path, '[[connector]]\nname = "m365"\naddress_spaces = ["*"]\ntransport = "graph"\noauth = "p"\n'
    )
    [connector] = config.connectors
    assert connector.graph_url == "https://graph.microsoft.com/v1.0" and connector.mailbox == ""
    [choice] = choices_for("someone@anywhere.test", config)
    assert choice.route.kind == "graph" and choice.route.link == "m365" and choice.connector == "m365"
    assert choices_for("x@local.test", config)[0].route.kind == "drop"


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ('transport = "graph"', "needs oauth"),
        ('transport = "graph"\noauth = "p"\nsmart_hosts = ["mx.test"]', "remove smart_hosts"),
        ('transport = "graph"\noauth = "p"\nmailbox = "not an address"', "not a mailbox address"),
        ('transport = "graph"\noauth = "p"\ngraph_url = "http://graph.test/v1.0"', "not an https:// URL"),
        ('transport = "graph"\noauth = "p"\nauth = { user = "u", password_file = "f" }', "remove auth"),
        ('oauth = "p"', 'transport = "graph" only'),
        ('transport = "exchange"', "graph"),
    ],
)
def test_graph_connector_keys_are_checked(tmp_path: Path, keys: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, f'[[connector]]\nname = "m365"\naddress_spaces = ["*"]\n{keys}\n')
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("profile", "problem"),
    [
        ("", 'oauth = "m" names no [oauth.m] profile; known: p'),
        (graph_profile("m", "https://outlook.office365.com/.default"), 'give the profile scope = "https://graph.microsoft.com/.default"'),
    ],
)  # fmt: skip
def test_a_graph_connector_needs_a_profile_whose_token_is_for_graph(
    tmp_path: Path, profile: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(
            tmp_path,
            '[[connector]]\nname = "g"\naddress_spaces = ["*"]\ntransport = "graph"\noauth = "m"\n' + profile,
        )
    assert problem in str(caught.value)


def test_an_smtp_connector_is_unchanged_by_the_graph_keys(tmp_path: Path) -> None:
    config = _load(
        tmp_path, '[[connector]]\nname = "p"\naddress_spaces = ["p.test"]\nsmart_hosts = ["mx.p.test"]\n'
    )
    [choice] = choices_for("a@p.test", config)
    assert choice.route.kind == "smtp" and config.connectors[0].transport == "smtp"


def test_the_effective_config_shows_the_graph_keys(tmp_path: Path) -> None:
    from smtpsvc.config import render_effective

    text = render_effective(
        _load(
            tmp_path, '[[connector]]\nname = "m"\naddress_spaces = ["*"]\ntransport = "graph"\noauth = "p"\n'
        )
    )
    assert 'transport = "graph"' in text and 'graph_url = "https://graph.microsoft.com/v1.0"' in text
    assert json.dumps("p") in text
