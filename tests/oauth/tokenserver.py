"""A real HTTPS OAuth 2.0 token endpoint on 127.0.0.1 (port 0), shaped like Entra ID's v2.0 endpoint.

Its certificate comes from a trustme CA (tests give the CA to smtpsvc through `ca_file`). It checks each
request the way Entra does: the client-credentials form with the client secret, or the signed client
assertion (signature verified against the registered certificate, x5t / x5t#S256, aud, iss = sub, jti, a
lifetime of at most 10 minutes); the refresh-token grant with rotation. It answers `expires_in`, counts the
requests, can hold its answers (`gate`) and answers Entra's JSON errors (an `AADSTS…` code) to a wrong
secret. Anything a test did not expect lands in `problems`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

TENANT = "contoso.onmicrosoft.com"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
WRONG_SECRET = (
    "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client"
    " secret value, not the client secret ID, for a secret added to app '{client_id}'.\r\n"
    "Trace ID: 0a1b2c3d-0000-0000-0000-000000000000\r\n"
    "Correlation ID: 00000000-0000-0000-0000-000000000000\r\n"
    "Timestamp: 2026-12-04 23:00:00Z"
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Client:
    """An app registration: a client secret, or an uploaded certificate (PEM)."""

    secret: str = ""
    certificate_pem: bytes = b""


@dataclass
class TokenServer:
    ca: trustme.CA
    clients: dict[str, Client] = field(default_factory=dict)
    refresh_tokens: set[str] = field(default_factory=set)  # the currently valid ones
    rotate: bool = False  # answer a refresh-token grant with a new refresh token (and retire the old one)
    expires_in: int = 3600
    scope: str = "https://outlook.office365.com/.default"  # the scope every request must ask for
    status_override: tuple[int, dict[str, Any]] | None = None  # answer this instead (a 503, ...)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    requests: int = 0
    forms: list[dict[str, str]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _serial: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def path(self) -> str:
        return f"/{TENANT}/oauth2/v2.0/token"

    @property
    def token_url(self) -> str:
        return f"https://127.0.0.1:{self.port}{self.path}"

    async def start(self) -> None:
        self.gate.set()
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(context)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:] if h)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests += 1
            await self.gate.wait()
            status, answer = self._answer(method, target, headers, body)
            payload = json.dumps(answer).encode()
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _error(self, status: int, error: str, description: str) -> tuple[int, dict[str, Any]]:
        return status, {"error": error, "error_description": description, "error_codes": [0]}

    def _answer(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        if method != "POST" or target != self.path:
            self.problems.append(f"{method} {target}")
            return 404, {}
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            self.problems.append(f"content-type {headers.get('content-type')}")
        form = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
        self.forms.append(form)
        if self.status_override is not None:
            return self.status_override
        client = self.clients.get(form.get("client_id", ""))
        if client is None:
            return self._error(400, "unauthorized_client", "AADSTS700016: Application not found.")
        if form.get("scope") != self.scope:
            self.problems.append(f"scope {form.get('scope')!r}")
        if client.certificate_pem:
            failure = self._check_assertion(form, client)
        else:
            failure = None
            if form.get("client_secret") != client.secret:
                failure = WRONG_SECRET.format(client_id=form.get("client_id"))
        if failure is not None:
            return self._error(401, "invalid_client", failure)
        answer: dict[str, Any] = {"token_type": "Bearer", "expires_in": self.expires_in}
        if form.get("grant_type") == "refresh_token":
            old = form.get("refresh_token", "")
            if old not in self.refresh_tokens:
                return self._error(400, "invalid_grant", "AADSTS700082: The refresh token has expired.")
            if self.rotate:
                self.refresh_tokens.discard(old)
                new = f"rt-rotated-{next(self._serial)}"
                self.refresh_tokens.add(new)
                answer["refresh_token"] = new
        elif form.get("grant_type") != "client_credentials":
            return self._error(400, "unsupported_grant_type", f"grant_type {form.get('grant_type')}")
        token = f"at-{next(self._serial)}-{form['client_id']}"
        self.issued.append(token)
        answer["access_token"] = token
        return 200, answer

    def _check_assertion(self, form: dict[str, str], client: Client) -> str | None:
        """None when the client assertion is what Entra accepts, else Entra's complaint."""
        if form.get("client_assertion_type") != ASSERTION_TYPE or "client_secret" in form:
            self.problems.append("certificate client without a client assertion")
            return "AADSTS7000216: 'client_assertion' is required."
        certificate = x509.load_pem_x509_certificate(client.certificate_pem)
        der = certificate.public_bytes(serialization.Encoding.DER)
        assertion = form.get("client_assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                certificate.public_key(),  # type: ignore[arg-type]
                algorithms=["RS256"],
                audience=self.token_url,
                options={"require": ["aud", "iss", "sub", "jti", "nbf", "exp"]},
            )
        except jwt.PyJWTError as exc:
            self.problems.append(f"assertion: {exc}")
            return f"AADSTS700027: Client assertion failed signature validation. ({exc})"
        expected = {
            "x5t": b64url(hashlib.sha1(der).digest()),
            "x5t#S256": b64url(hashlib.sha256(der).digest()),
        }
        for name, value in expected.items():
            if header.get(name) != value:
                self.problems.append(f"header {name} {header.get(name)!r}, expected {value!r}")
        if claims["iss"] != form["client_id"] or claims["sub"] != form["client_id"]:
            self.problems.append(f"iss/sub {claims['iss']}/{claims['sub']}")
        if not 0 < claims["exp"] - claims["nbf"] <= 600:
            self.problems.append(f"assertion lifetime {claims['exp'] - claims['nbf']} s")
        return None


def write_ca(ca: trustme.CA, folder: Path) -> Path:
    path = folder / "token-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
