"""The Microsoft Graph transport: a connector with `transport = "graph"` sends its mail with Graph `sendMail`
as its `mailbox` (or the envelope sender), for Microsoft 365 tenants that switched SMTP AUTH off altogether.

The message goes as Graph expects MIME: `POST {graph_url}/users/{mailbox}/sendMail`, `Content-Type:
text/plain`, the body the base64 of the queued message, `Authorization: Bearer` a token of the connector's
`[oauth.NAME]` profile (`smtpsvc.tokens.TokenSource`). One `httpx.AsyncClient` per CA bundle: connections to
Graph are reused across messages. At most 4 requests at once per mailbox (Graph's own limit): the others wait
their turn here rather than collect 429s.

Graph has no envelope: it sends to the To, Cc and Bcc of the MIME. So before sending, the recipients the
headers do not name are added as Bcc (Exchange keeps Bcc out of the copies it delivers), and a message whose
headers name an address that is no recipient of this message at all fails with 5.3.3: Graph would send a copy
to someone the client never asked us to deliver to (a forwarded message, a list expansion). An address of
this message on another route (a local domain's Drop, another connector) is named too and gets its copy
from Exchange Online as well: it was addressed, and a second copy is better than an NDR.

Graph's answers (docs/delivery.md "Microsoft Graph"): 202 delivered; 429/503/504 deferred, and while the
`Retry-After` runs no request goes for that mailbox (its messages wait without an attempt on their count,
cause `graph-throttled`); 401 gets one new token and one retry; 400/403/404/413 fail with Graph's error code
and message in the NDR (`graph-rejected`); anything else, and a network error, defers. Graph refuses a
request over 4 MB: a message whose base64 is larger fails at once with 5.3.4 (the draft-and-upload-session
path is not built). The token is never in a reply, a transcript or an event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import getaddresses, parsedate_to_datetime
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import httpx

from smtpsvc.config import ConnectorConfig, LiveConfig
from smtpsvc.delivery.transport import MessageSource, Outcome
from smtpsvc.model import DeliveryResult, Envelope, Recipient, rfc5322_date
from smtpsvc.queue.base import MessageSetAside, QueueError
from smtpsvc.routing.connectors import RouteChoice
from smtpsvc.tokens import CAUSE_TOKEN_FAILED, AccessToken, TokenError, TokenSource

CAUSE_THROTTLED = "graph-throttled"  # 429/503/504: Graph asks us to slow down
CAUSE_REJECTED = "graph-rejected"  # 400/403/404/413: Graph refuses this message or mailbox for good
CAUSE_FAILED = "graph-failed"  # another answer: deferred
CAUSE_UNREACHABLE = "graph-unreachable"  # no connection, or no answer in time
CAUSE_TOO_LARGE = "graph-too-large"  # over the request limit: 5.3.4
CAUSE_RECIPIENTS = "graph-recipients"  # the headers name someone who is no recipient: 5.3.3

REQUEST_LIMIT = 4 * 1024 * 1024  # Graph refuses a request body over 4 MB: ours is the base64 of the MIME
MAILBOX_CONCURRENCY = 4  # Graph's Outlook limit: 4 requests at once per app and mailbox
RETRY_AFTER_MAX = 24 * 3600.0  # a Retry-After beyond this is taken as this (a broken header parks no mail)
ERROR_TEXT_MAX = 300  # Graph's error message, as much as goes into an NDR line
BCC_LINE = 900  # a Bcc field we write is folded before this many characters (RFC 5322: 998 at most)
_THROTTLING = (429, 503, 504)
_PERMANENT = {  # HTTP status -> (reply code and enhanced status, what it means, what to do)
    400: ("554 5.6.0", "rejected the message", "the message is not one Graph accepts as MIME"),
    403: (
        "550 5.7.1",
        "refused to send as this mailbox",
        "grant the application Mail.Send (an application access policy may exclude the mailbox)",
    ),
    404: (
        "550 5.1.8",
        "does not know this mailbox",
        "check the connector's mailbox (or the sender) and graph_url",
    ),
    413: ("552 5.3.4", "found the message too large", "send it through an SMTP connector instead"),
}


# -- pure parts: Retry-After, Graph's error body, the recipients of a MIME message ---------------------------


def encoded_size(raw_size: int) -> int:
    """Bytes of the base64 (no line breaks) of `raw_size` bytes: what Graph counts against its limit."""
    return 4 * ((raw_size + 2) // 3)


def retry_after(value: str | None, now: float) -> float | None:
    """When a `Retry-After` (delta-seconds or an HTTP date, RFC 9110 §10.2.3) lets the next request go; None
    when there is none or it cannot be read (then the retry schedule alone decides)."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        delay = float(text)
    else:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": an HTTP date is GMT
            when = when.replace(tzinfo=UTC)
        delay = when.timestamp() - now
    return now + min(max(delay, 0.0), RETRY_AFTER_MAX)


@dataclass(frozen=True, slots=True)
class GraphError:
    """Graph's `{"error": {"code": ..., "message": ...}}`, as one bounded line each (it goes into an NDR)."""

    code: str
    message: str

    def __str__(self) -> str:
        return ": ".join(part for part in (self.code, self.message) if part)


def graph_error(body: bytes) -> GraphError:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return GraphError("", _one_line(body.decode("utf-8", "replace")))
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return GraphError("", "")
    return GraphError(_one_line(str(error.get("code", ""))), _one_line(str(error.get("message", ""))))


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= ERROR_TEXT_MAX else line[: ERROR_TEXT_MAX - 3] + "..."


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """(header block without its blank line, the rest from the blank line on); no blank line: all header."""
    match = re.search(rb"\r?\n\r?\n", message)
    if match is None:
        return message, b""
    end = match.start() + (2 if message[match.start()] == 13 else 1)  # after the last header line's end
    return message[:end], message[end:]


def header_fields(block: bytes) -> list[bytes]:
    """The fields of a header block, each with its continuation lines and line ends."""
    fields: list[bytes] = []
    for line in block.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _field_name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def _addresses(fields: Iterable[bytes]) -> list[str]:
    values = [f.split(b":", 1)[1].decode("utf-8", "replace") for f in fields if b":" in f]
    unfolded = [" ".join(value.split()) for value in values]
    return [address for _, address in getaddresses(unfolded) if "@" in address]


def named_recipients(block: bytes) -> set[str]:
    """The addresses in To, Cc and Bcc (whom Graph sends to), lower-cased."""
    fields = [f for f in header_fields(block) if _field_name(f) in ("to", "cc", "bcc")]
    return {address.lower() for address in _addresses(fields)}


@dataclass(frozen=True, slots=True)
class RecipientPlan:
    missing: tuple[str, ...]  # this group's recipients the headers do not name: added as Bcc
    strangers: tuple[str, ...]  # named in To/Cc/Bcc, no recipient of the message: Graph would send to them


def plan_recipients(block: bytes, group: Sequence[str], message_recipients: Iterable[str]) -> RecipientPlan:
    named = named_recipients(block)
    everyone = {address.lower() for address in message_recipients} | {a.lower() for a in group}
    return RecipientPlan(
        missing=tuple(address for address in group if address.lower() not in named),
        strangers=tuple(sorted(named - everyone)),
    )


def with_bcc(message: bytes, addresses: Sequence[str]) -> bytes:
    """The message with one Bcc field naming `addresses` and those of its own Bcc field(s) (RFC 5322 allows
    one), first in the header; the rest byte for byte."""
    block, rest = split_header(message)
    fields = header_fields(block)
    own = _addresses(f for f in fields if _field_name(f) == "bcc")
    kept = b"".join(f for f in fields if _field_name(f) != "bcc")
    lines: list[str] = []
    line = "Bcc:"
    for address in [*own, *addresses]:
        if len(line) + len(address) + 2 > BCC_LINE and line != "Bcc:":
            lines.append(line + ",")
            line = ""
        line += (" " if line in ("Bcc:", "") else ", ") + address
    lines.append(line)
    bcc = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return bcc + kept + rest


# -- the transport ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Gate:
    semaphore: asyncio.Semaphore
    users: int = 0  # holding or waiting


@dataclass(frozen=True, slots=True)
class _Prepared:
    body: bytes = b""  # the request body (base64), when the message can go
    failure: str = ""  # else the reply that fails it for good
    cause: str = ""


class GraphTransport:
    """`Transport` (delivery/transport.py) for routes of kind "graph"; reads its connector from the config in
    force at each attempt. `tokens` is None when no [oauth.NAME] profile is configured: its mail waits."""

    def __init__(
        self, live: LiveConfig, tokens: TokenSource | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.live = live
        self.tokens = tokens
        self.clock = clock
        self._clients: dict[str, httpx.AsyncClient] = {}  # by ca_file: one connection pool each
        self._throttled: dict[tuple[str, str], float] = {}  # (connector, mailbox) -> no request before
        self._gates: dict[tuple[str, str], _Gate] = {}  # (connector, mailbox) -> its requests under way

    async def deliver(
        self, route: RouteChoice, envelope: Envelope, recipients: Sequence[Recipient], message: MessageSource
    ) -> Outcome:
        addresses = [r.address for r in recipients]
        connector = next((c for c in self.live.current.connectors if c.name == route.connector), None)
        if connector is None or connector.transport != "graph":  # a reload changed it: routed again next time
            return _all(
                addresses, f"451 4.4.0 Connector {route.connector} is no Graph connector any more", ""
            )
        remote = urlsplit(connector.graph_url).hostname or connector.graph_url
        mailbox = connector.mailbox or envelope.sender
        if not mailbox:
            reply = (
                f"550 5.7.1 Connector {connector.name} sends through Microsoft Graph as the sender's mailbox "
                '(this message, a report, has none): set mailbox = "relay@contoso.com" on the connector'
            )
            return _all(addresses, reply, remote, cause=CAUSE_REJECTED)
        key = (connector.name, mailbox.lower())
        now = self.clock()
        until = self._throttled.get(key, 0.0)
        if until > now:
            return Outcome(postponed_until=until)  # Graph said when: no request before that
        self._throttled.pop(key, None)
        if self.tokens is None:
            reply = (
                f"451 4.7.0 Connector {connector.name} needs the OAuth 2.0 profile [oauth.{connector.oauth}] "
                "to log in to Microsoft Graph, and no [oauth.NAME] profile is configured"
            )
            return _all(addresses, reply, remote, cause=CAUSE_TOKEN_FAILED)
        try:
            prepared = await self._prepare(envelope, addresses, message)
        except MessageSetAside:
            raise  # not a deferral: the message is no longer queued (queue/corrupt/, event 9001)
        except (OSError, QueueError) as exc:
            return _all(addresses, f"451 4.3.0 Cannot read the message from the queue: {exc}", remote)
        if prepared.failure:
            return _all(addresses, prepared.failure, remote, cause=prepared.cause)
        return await self._send(connector, mailbox, key, prepared.body, addresses, remote)

    async def _prepare(self, envelope: Envelope, addresses: list[str], message: MessageSource) -> _Prepared:
        handle = await message.open()
        try:
            return await asyncio.to_thread(_prepare, handle, envelope, addresses)
        finally:
            handle.close()

    async def _send(
        self,
        connector: ConnectorConfig,
        mailbox: str,
        key: tuple[str, str],
        body: bytes,
        addresses: list[str],
        remote: str,
    ) -> Outcome:
        url = f"{connector.graph_url}/users/{quote(mailbox, safe='@')}/sendMail"
        transcript = [f"POST {url} (the message as MIME: {len(body)} bytes of base64)"]
        try:
            client = self._client(connector.ca_file)
        except (OSError, ssl.SSLError) as exc:  # ca_file cannot be read
            reply = f"451 4.4.0 Cannot use ca_file {connector.ca_file!r} of connector {connector.name}: {exc}"
            return _all(addresses, reply, remote, cause=CAUSE_UNREACHABLE, transcript=transcript)
        async with self._slot(key):
            until = self._throttled.get(key, 0.0)
            if until > self.clock():  # throttled while this one waited for its turn
                return Outcome(postponed_until=until)
            return await self._exchange(
                connector, mailbox, key, client, url, body, addresses, remote, transcript
            )

    async def _exchange(
        self,
        connector: ConnectorConfig,
        mailbox: str,
        key: tuple[str, str],
        client: httpx.AsyncClient,
        url: str,
        body: bytes,
        addresses: list[str],
        remote: str,
        transcript: list[str],
    ) -> Outcome:
        """The request (and its one retry with a new token after a 401), and what the answer means."""
        assert self.tokens is not None
        try:
            token = await self.tokens.token(connector.oauth)
            response = await self._post(client, url, body, token, transcript)
            if response.status_code == 401:  # the token was refused: one new token, one retry
                token = await self.tokens.token(connector.oauth, refused=token)
                response = await self._post(client, url, body, token, transcript)
        except TokenError as exc:
            transcript.append(f"no token: {exc}")
            return _all(addresses, f"451 4.7.0 {exc}", remote, cause=exc.cause, transcript=transcript)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            why = _one_line(str(exc)) or type(exc).__name__
            transcript.append(f"cannot connect: {why}")
            reply = f"451 4.4.1 Cannot connect to Microsoft Graph at {remote}: {why}"
            outcome = _all(addresses, reply, remote, cause=CAUSE_UNREACHABLE, transcript=transcript)
            outcome.unreachable = True  # the connector's next cost, if any, takes the mail
            return outcome
        except httpx.HTTPError as exc:  # sent, but no (complete) answer: it may have gone; sent again later
            transcript.append(f"no answer: {type(exc).__name__} {_one_line(str(exc))}")
            reply = (
                f"451 4.4.2 Microsoft Graph at {remote} gave no answer ({type(exc).__name__}); the message "
                "is sent again later (a recipient may get it twice)"
            )
            return _all(addresses, reply, remote, cause=CAUSE_UNREACHABLE, transcript=transcript)
        return self._answered(connector, mailbox, key, response, addresses, remote, transcript)

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, token: AccessToken, transcript: list[str]
    ) -> httpx.Response:
        delivery = self.live.current.delivery
        timeout = httpx.Timeout(
            delivery.final_timeout, connect=delivery.connect_timeout, pool=delivery.connect_timeout
        )
        response = await client.post(
            url,
            content=body,
            headers={"Content-Type": "text/plain", "Authorization": f"Bearer {token.value}"},
            timeout=timeout,
        )
        retry = response.headers.get("Retry-After")
        error = str(graph_error(response.content)) if response.status_code >= 300 else ""
        said = ", ".join(p for p in (error, f"Retry-After: {retry}" if retry else "") if p)
        transcript.append(
            f"HTTP {response.status_code} {response.reason_phrase}" + (f" ({said})" if said else "")
        )
        return response

    def _answered(
        self,
        connector: ConnectorConfig,
        mailbox: str,
        key: tuple[str, str],
        response: httpx.Response,
        addresses: list[str],
        remote: str,
        transcript: list[str],
    ) -> Outcome:
        status = response.status_code
        if 200 <= status < 300:
            reply = f"250 2.0.0 Accepted by Microsoft Graph for sending as {mailbox} (HTTP {status})"
            return _all(addresses, reply, remote, transcript=transcript, ok=True)
        error = graph_error(response.content)
        said = f"HTTP {status}" + (f" {error}" if str(error) else "")
        if status in _THROTTLING:
            now = self.clock()
            until = retry_after(response.headers.get("Retry-After"), now)
            when = ""
            if until is not None:
                self._throttled[key] = until
                when = f"; no request for this mailbox before {rfc5322_date(until)}"
            busy = "is throttling" if status == 429 else "is busy for"
            reply = f"451 4.3.2 Microsoft Graph {busy} mailbox {mailbox} ({said}){when}"
            outcome = _all(addresses, reply, remote, cause=CAUSE_THROTTLED, transcript=transcript)
            if until is not None:
                outcome.retry_at = until  # Graph says when: not the 15-minute retry schedule, and not sooner
            return outcome
        if status == 401:
            reply = (
                f"451 4.7.0 Microsoft Graph refused a fresh token of [oauth.{connector.oauth}] too ({said}): "
                "give the application the Mail.Send application permission (admin consent) and use the scope "
                "https://graph.microsoft.com/.default"
            )
            return _all(addresses, reply, remote, cause=CAUSE_TOKEN_FAILED, transcript=transcript)
        if status in _PERMANENT:
            code, meaning, todo = _PERMANENT[status]
            reply = f"{code} Microsoft Graph {meaning} (mailbox {mailbox}, {said}): {todo}"
            return _all(addresses, reply, remote, cause=CAUSE_REJECTED, transcript=transcript)
        reply = f"451 4.3.0 Microsoft Graph could not send the message now ({said})"
        return _all(addresses, reply, remote, cause=CAUSE_FAILED, transcript=transcript)

    @contextlib.asynccontextmanager
    async def _slot(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """At most MAILBOX_CONCURRENCY requests at once per mailbox: Graph's own limit, so the rest wait here
        instead of in 429s. The gate is dropped when nobody uses it (one per sender would add up)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(asyncio.Semaphore(MAILBOX_CONCURRENCY))
        gate.users += 1
        try:
            async with gate.semaphore:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]

    def _client(self, ca_file: str) -> httpx.AsyncClient:
        client = self._clients.get(ca_file)
        if client is None:
            # The system's CAs (and SSL_CERT_FILE), as for SMTP; ca_file instead of them when set. Proxy
            # settings (HTTPS_PROXY) are honoured: many sites reach Microsoft 365 only through one.
            context = ssl.create_default_context(cafile=ca_file or None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            client = httpx.AsyncClient(
                verify=context, follow_redirects=False, headers={"User-Agent": "smtpsvc"}
            )
            self._clients[ca_file] = client
        return client

    def revive(self, links: set[str] | frozenset[str] | None) -> None:
        """The operator forced a retry: forget what Graph's Retry-After asked of these connectors."""
        for key in list(self._throttled):
            if links is None or key[0] in links:
                del self._throttled[key]

    async def close(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _prepare(handle: BinaryIO, envelope: Envelope, addresses: list[str]) -> _Prepared:
    """Read the message (in a worker thread), check its size and recipients, add the Bcc, encode it."""
    size = handle.seek(0, 2)
    if encoded_size(size) > REQUEST_LIMIT:
        return _too_large(size)
    handle.seek(0)
    data = handle.read()
    block, _ = split_header(data)
    plan = plan_recipients(block, addresses, (r.address for r in envelope.recipients))
    if plan.strangers:
        shown = ", ".join(plan.strangers[:3]) + (" and others" if len(plan.strangers) > 3 else "")
        failure = (
            f"554 5.3.3 Microsoft Graph sends to every address in To, Cc and Bcc, and this message names "
            f"{shown}, who is no recipient of it: send such messages (forwarded, list mail) through an SMTP "
            "connector, which keeps the envelope"
        )
        return _Prepared(failure=failure, cause=CAUSE_RECIPIENTS)
    if plan.missing:
        data = with_bcc(data, plan.missing)
        if encoded_size(len(data)) > REQUEST_LIMIT:
            return _too_large(len(data))
    return _Prepared(body=base64.b64encode(data))


def _too_large(size: int) -> _Prepared:
    failure = (
        f"552 5.3.4 The message ({size:,} bytes) is too large for Microsoft Graph, which takes at most "
        f"{REQUEST_LIMIT:,} bytes of base64 (about {REQUEST_LIMIT * 3 // 4:,} bytes of message): send large "
        "messages through an SMTP connector (smtp.office365.com with XOAUTH2)"
    )
    return _Prepared(failure=failure, cause=CAUSE_TOO_LARGE)


def _all(
    addresses: Sequence[str],
    reply: str,
    remote: str,
    *,
    cause: str = "",
    transcript: list[str] | None = None,
    ok: bool = False,
) -> Outcome:
    """One result for every recipient (Graph takes or refuses the message as a whole)."""
    status = reply.split(" ", 2)[1]
    permanent = not ok and reply.startswith("5")
    results = [
        DeliveryResult(a, ok=ok, permanent=permanent, reply=reply, status=status, remote_mta=remote)
        for a in addresses
    ]
    return Outcome(results, transcript=transcript or [], reason="" if ok else reply, cause=cause)
