"""A Microsoft 365-like smart host for the outbound AUTH tests, and an in-test OAuth token source.

`Authority` stands for the identity provider: it issues tokens with a lifetime and says whether one is
current. `Tokens` is a real `smtpsvc.tokens.TokenSource`: it caches the token per profile while it is valid,
asks the authority for a new one only when it has none, the cached one has expired, or the caller says it
was refused; it counts those requests (what a real token endpoint would see). `OAuthPeer` is an SMTP server on
127.0.0.1 with STARTTLS (a trustme certificate) that offers AUTH only inside TLS, as smtp.office365.com does:
XOAUTH2 and OAUTHBEARER succeed only with a current token for its mailbox; an expired or unknown one gets
the base64 JSON error challenge, then `535 5.7.3`; PLAIN and LOGIN get `550 5.7.30` (basic auth disabled).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import secrets
import ssl
import time
from dataclasses import dataclass, field

import trustme

from smtpsvc.tokens import AccessToken, TokenError
from tests.peers import LoopbackPeer

BASIC_DISABLED = b"550 5.7.30 Basic authentication is not supported for Client Submission.\r\n"
TOKEN_REFUSED = b"535 5.7.3 Authentication unsuccessful [AM0PR01CA0001.eurprd01.prod.exchangelabs.com]\r\n"
SCOPE = "https://outlook.office365.com/.default"


class Authority:
    """The identity provider's view: which tokens it issued and until when each is valid."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.lifetime = lifetime
        self.issued: dict[str, float] = {}  # token -> expires_at (time.time())
        self._serial = itertools.count(1)

    def issue(self) -> AccessToken:
        value = f"eyJ0eXAiOiJKV1QiLCJub25jZSI6I{next(self._serial)}.{secrets.token_urlsafe(48)}"
        token = AccessToken(value, time.time() + self.lifetime)
        self.issued[value] = token.expires_at
        return token

    def current(self, value: str) -> bool:
        return self.issued.get(value, 0.0) > time.time()

    def end_every_lifetime(self) -> None:
        """Every token issued so far stops being accepted now (a revocation, or the provider's clock ahead of
        the token source's): a token source that still holds one does not know yet."""
        for value in self.issued:
            self.issued[value] = 0.0


class Tokens:
    """A `TokenSource` with a cache, honest about expiry; `requests` counts the tokens it had to ask for."""

    def __init__(self, authority: Authority, *, failure: str = "") -> None:
        self.authority = authority
        self.failure = failure  # when set: every request fails with this text (a wrong secret)
        self.cache: dict[str, AccessToken] = {}
        self.calls = 0
        self.requests = 0
        self.refused: list[AccessToken] = []

    async def token(self, profile: str, *, refused: AccessToken | None = None) -> AccessToken:
        self.calls += 1
        cached = self.cache.get(profile)
        if refused is not None:
            self.refused.append(refused)
            if cached is not None and cached.value == refused.value:
                cached = None  # the peer rejected it: drop it (a newer one in the cache would be kept)
        if cached is not None and cached.expires_at > time.time() + 60:
            return cached
        self.requests += 1
        if self.failure:
            raise TokenError(self.failure, permanent=True)
        self.cache[profile] = fresh = self.authority.issue()
        return fresh


@dataclass
class AuthSeen:
    mechanism: str
    user: str
    ok: bool
    fields: dict[str, str] = field(default_factory=dict)  # OAUTHBEARER's host and port
    error_answer: str | None = None  # what the client sent after the error challenge


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("smtp.contoso.test", "127.0.0.1").configure_cert(context)
    return context


class OAuthPeer(LoopbackPeer):
    def __init__(self, authority: Authority, mailbox: str, ca: trustme.CA) -> None:
        super().__init__()
        self.authority = authority
        self.mailbox = mailbox
        self.context = server_context(ca)
        self.mechanisms = "LOGIN PLAIN XOAUTH2 OAUTHBEARER"
        self.basic_reply = BASIC_DISABLED
        self.token_reply = TOKEN_REFUSED  # the final reply to a refused token
        self.send_as: set[str] = {mailbox}  # envelope senders the login may use (others: 5.7.60)
        self.close_after_refusal = False  # a peer that does not allow a second AUTH on the connection
        self.connections = 0
        self.auths: list[AuthSeen] = []
        self.senders: list[str] = []

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        state: dict[str, object] = {"tls": False, "user": "", "mail": False}
        writer.write(b"220 smtp.contoso.test Microsoft ESMTP MAIL Service ready\r\n")
        try:
            while line := await reader.readline():
                text = line.decode("ascii", "replace").rstrip("\r\n")
                verb, _, arg = text.partition(" ")
                verb = verb.upper()
                self.commands.append(verb)
                if verb == "EHLO":
                    offered = f"250-AUTH {self.mechanisms}\r\n" if state["tls"] else "250-STARTTLS\r\n"
                    writer.write(
                        f"250-smtp.contoso.test Hello\r\n250-PIPELINING\r\n{offered}250 8BITMIME\r\n".encode()
                    )
                elif verb == "STARTTLS":
                    writer.write(b"220 2.0.0 SMTP server ready\r\n")
                    await writer.drain()
                    await writer.start_tls(self.context)
                    state["tls"] = True
                elif verb == "AUTH":
                    if not await self._auth(arg, reader, writer, state):
                        await writer.drain()
                        break
                elif verb == "MAIL":
                    sender = arg.split(":", 1)[1].strip().split(" ")[0].strip("<>")
                    self.senders.append(sender)
                    state["mail"] = False
                    if not state["user"]:
                        writer.write(b"530 5.7.57 Client not authenticated to send mail\r\n")
                    elif sender not in self.send_as:
                        writer.write(
                            b"550 5.7.60 SMTP; Client does not have permissions to send as this sender\r\n"
                        )
                    else:
                        state["mail"] = True
                        writer.write(b"250 2.1.0 Sender OK\r\n")
                elif verb in ("RCPT", "DATA") and not state["mail"]:
                    writer.write(b"503 5.5.1 Bad sequence of commands\r\n")
                elif verb == "DATA":
                    writer.write(b"354 Start mail input; end with <CRLF>.<CRLF>\r\n")
                    await writer.drain()
                    self.messages.append(await reader.readuntil(b"\r\n.\r\n"))
                    writer.write(b"250 2.0.0 OK <queued@smtp.contoso.test>\r\n")
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 Service closing transmission channel\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        writer.close()

    async def _auth(
        self, arg: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, object]
    ) -> bool:
        """One AUTH command; False when the connection is to be closed."""
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism in ("PLAIN", "LOGIN"):
            self.auths.append(AuthSeen(mechanism, "", ok=False))
            writer.write(self.basic_reply)
            return True
        raw = base64.b64decode(initial).decode()
        if mechanism == "XOAUTH2":
            parts = dict(p.split("=", 1) for p in raw.split("\x01") if p)
            user, auth = parts.get("user", ""), parts.get("auth", "")
            fields: dict[str, str] = {}
        else:  # OAUTHBEARER: "n,a=user," then key=value pairs separated by ^A
            header, _, rest = raw.partition("\x01")
            user = header.split(",")[1].removeprefix("a=")
            fields = dict(p.split("=", 1) for p in rest.split("\x01") if p)
            auth = fields.pop("auth", "")
        token = auth.removeprefix("Bearer ")
        seen = AuthSeen(
            mechanism, user, ok=user == self.mailbox and self.authority.current(token), fields=fields
        )
        self.auths.append(seen)
        if seen.ok:
            state["user"] = user
            writer.write(b"235 2.7.0 Authentication successful\r\n")
            return True
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": SCOPE}).encode()
        writer.write(b"334 " + base64.b64encode(error) + b"\r\n")
        await writer.drain()
        seen.error_answer = (await reader.readline()).decode().rstrip("\r\n")
        writer.write(self.token_reply)
        return not self.close_after_refusal
