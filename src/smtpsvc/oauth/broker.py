"""The token broker: OAuth 2.0 access tokens for the `[oauth.NAME]` profiles, shared by every connection.

One cached token per profile (a changed profile, after a reload, is a new key and gets its own), renewed
before it expires (grants.refresh_at); callers that ask at the same moment share one request (single-flight);
a token the peer refused is dropped unless a newer one is already cached. The secrets are read from their
files just before each request, so a corrected file helps at the next attempt without a reload; a rotated
refresh token replaces its file atomically (safeio). Nothing here logs a secret: TokenError texts come from
grants.failure, and the optional `warn` callback gets operator sentences only.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from smtpsvc import safeio
from smtpsvc.config import LiveConfig, OAuthProfile
from smtpsvc.oauth import grants
from smtpsvc.tokens import AccessToken, TokenError

REQUEST_TIMEOUT = 30.0  # seconds for the whole token request (connect, TLS, answer)
MAX_ANSWER = 64 * 1024  # a token answer is a few KB; more is not a token endpoint
STALE_GRACE = 30.0  # a renewal that fails transiently: keep using the old token while it has this much left
# A permanent failure (a wrong secret) is answered from memory this long, unless a credential file changed:
# one message after another must not become one token request after another (Entra throttles repeats).
FAILURE_HOLD = 30.0

E = TypeVar("E", bound=BaseException)


@dataclass(frozen=True, slots=True)
class _Cached:
    token: AccessToken
    renew_at: float


@dataclass(frozen=True, slots=True)
class _Failed:
    error: TokenError
    until: float
    files: tuple[tuple[int, int] | None, ...]  # the credential files as they were (_file_marks)


class TokenBroker:
    """Implements smtpsvc.tokens.TokenSource for the profiles in `live.current.oauth` (read at each call,
    so a reload takes effect). `clock` is time.time unless a test moves time; `warn` hears of a renewal that
    failed while the old token still works and of a rotated refresh token that could not be saved."""

    def __init__(
        self,
        live: LiveConfig,
        *,
        clock: Callable[[], float] = time.time,
        timeout: float = REQUEST_TIMEOUT,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self._live = live
        self._clock = clock
        self._timeout = timeout
        self._warn = warn or (lambda _text: None)
        self._cache: dict[OAuthProfile, _Cached] = {}
        self._flights: dict[OAuthProfile, asyncio.Future[AccessToken]] = {}
        self._failed: dict[OAuthProfile, _Failed] = {}
        self._clients: dict[str, httpx.AsyncClient] = {}

    def __repr__(self) -> str:
        return f"<TokenBroker profiles={sorted(self._live.current.oauth)} cached={len(self._cache)}>"

    async def token(self, profile: str, *, refused: AccessToken | None = None) -> AccessToken:
        config = self._live.current.oauth.get(profile)
        if config is None:
            known = ", ".join(sorted(self._live.current.oauth)) or "none"
            raise TokenError(
                f'no OAuth profile "{profile}" is configured (known: {known}): add [oauth.{profile}]',
                permanent=True,
            )
        cached = self._cache.get(config)
        if cached is not None and refused is not None and cached.token.value == refused.value:
            del self._cache[config]  # refused: a newer cached token would have a different value
            cached = None
        if cached is not None and self._clock() < cached.renew_at:
            return cached.token
        failed = self._failed.get(config)
        if failed is not None and self._clock() < failed.until and failed.files == _file_marks(config):
            raise failed.error
        flight = self._flights.get(config)
        if flight is None:
            flight = asyncio.ensure_future(self._renew(config, cached))
            self._flights[config] = flight
            flight.add_done_callback(lambda done: self._landed(config, done))
        # shield: a caller that gives up (its delivery timed out) does not cancel the others' request
        return await asyncio.shield(flight)

    def _landed(self, config: OAuthProfile, flight: asyncio.Future[AccessToken]) -> None:
        if self._flights.get(config) is flight:
            del self._flights[config]
        if not flight.cancelled():
            flight.exception()  # retrieved: nobody may be left waiting for it

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.cancel()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
        self._cache.clear()
        self._failed.clear()

    async def _renew(self, config: OAuthProfile, stale: _Cached | None) -> AccessToken:
        try:
            token = await self._request(config)
        except TokenError as exc:
            if exc.permanent:
                self._failed[config] = _Failed(exc, self._clock() + FAILURE_HOLD, _file_marks(config))
            left = stale.token.expires_at - self._clock() if stale is not None else 0.0
            if stale is None or exc.permanent or left < STALE_GRACE:
                raise
            self._warn(f"{exc}; the current token (valid for {round(left)} s more) is used meanwhile")
            return stale.token
        self._failed.pop(config, None)
        current = set(self._live.current.oauth.values())
        for old in [p for p in self._cache if p not in current]:  # profiles a reload changed or removed
            del self._cache[old]
        return token

    async def _request(self, config: OAuthProfile) -> AccessToken:
        credentials = self._credentials(config)
        client = self._client(config)
        started = self._clock()
        try:
            async with asyncio.timeout(self._timeout):
                status, body = await self._post(client, config, grants.token_form(config, credentials))
        except TimeoutError:
            problem = f"no answer within {self._timeout:g} s"
            raise grants.failure(config, problem, "", permanent=False) from None
        except httpx.InvalidURL as exc:
            raise grants.failure(config, f"bad URL: {exc}", "check token_url", permanent=True) from None
        except httpx.HTTPError as exc:
            hint = _network_hint(config, exc)
            raise grants.failure(config, _network_problem(exc), hint, permanent=False) from None
        grant = grants.parse_answer(config, status, body)
        if grant.refresh_token and grant.refresh_token != credentials.refresh_token:
            self._save_refresh_token(config, grant.refresh_token)
        token = AccessToken(grant.access_token, started + grant.expires_in)
        self._cache[config] = _Cached(token, grants.refresh_at(started, token.expires_at))
        return token

    async def _post(
        self, client: httpx.AsyncClient, config: OAuthProfile, form: dict[str, str]
    ) -> tuple[int, bytes]:
        headers = {"Accept": "application/json"}
        async with client.stream("POST", config.token_url, data=form, headers=headers) as response:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_ANSWER:
                    problem = f"the answer is larger than {MAX_ANSWER // 1024} KB"
                    raise grants.failure(config, problem, "check token_url", permanent=True)
            return response.status_code, bytes(body)

    def _client(self, config: OAuthProfile) -> httpx.AsyncClient:
        client = self._clients.get(config.ca_file)
        if client is None:
            try:
                verify = ssl.create_default_context(cafile=config.ca_file or None)
            except (OSError, ssl.SSLError) as exc:
                problem = f"cannot read ca_file {config.ca_file}: {_reason(exc)}"
                raise grants.failure(
                    config, problem, "check ca_file (PEM certificates)", permanent=True
                ) from None
            # trust_env (httpx's default): an HTTPS_PROXY in the service's environment is honoured
            client = httpx.AsyncClient(verify=verify, timeout=self._timeout, follow_redirects=False)
            self._clients[config.ca_file] = client
        return client

    def _credentials(self, config: OAuthProfile) -> grants.Credentials:
        secret = _read_secret(config, "client_secret_file") if config.client_secret_file else ""
        refresh = _read_secret(config, "refresh_token_file") if config.refresh_token_file else ""
        assertion = self._assertion(config) if config.certificate_file else ""
        return grants.Credentials(client_secret=secret, assertion=assertion, refresh_token=refresh)

    def _assertion(self, config: OAuthProfile) -> str:
        try:
            certificate = x509.load_pem_x509_certificate(Path(config.certificate_file).read_bytes())
            key = serialization.load_pem_private_key(Path(config.key_file).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            problem = f"cannot use certificate_file {config.certificate_file} with key_file {config.key_file}"
            hint = "both must be PEM files, the key unencrypted"
            raise grants.failure(config, f"{problem}: {_reason(exc)}", hint, permanent=True) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            problem = f"key_file {config.key_file} is not an RSA key"
            raise grants.failure(config, problem, "Entra signs assertions with RS256", permanent=True)
        der = certificate.public_bytes(serialization.Encoding.DER)
        claims = grants.assertion_claims(config, self._clock(), str(uuid.uuid4()))
        return jwt.encode(claims, key, algorithm="RS256", headers=grants.assertion_header(der))

    def _save_refresh_token(self, config: OAuthProfile, value: str) -> None:
        try:
            safeio.replace_file(config.refresh_token_file, value.encode() + b"\n", mode=safeio.PRIVATE)
        except OSError as exc:
            self._warn(
                f'OAuth profile "{config.name}": the provider rotated the refresh token but'
                f" refresh_token_file {config.refresh_token_file} cannot be replaced ({_reason(exc)}):"
                " the token in use works until it expires; fix the file's folder permissions"
            )


def _file_marks(config: OAuthProfile) -> tuple[tuple[int, int] | None, ...]:
    """(modification time, size) of each credential file and the CA file, None when missing: a changed file
    may be the fix."""
    marks: list[tuple[int, int] | None] = []
    files = (config.client_secret_file, config.certificate_file, config.key_file, config.refresh_token_file)
    for path in (*files, config.ca_file):
        try:
            info = os.stat(path) if path else None
        except OSError:
            info = None
        marks.append((info.st_mtime_ns, info.st_size) if info is not None else None)
    return tuple(marks)


def _read_secret(config: OAuthProfile, key: str) -> str:
    path = str(getattr(config, key))
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise grants.failure(
            config, f"cannot read {key} {path}: {_reason(exc)}", f"check {key}", permanent=True
        ) from None
    if not value:
        raise grants.failure(config, f"{key} {path} is empty", f"check {key}", permanent=True)
    return value


def _reason(exc: BaseException) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", text) or type(exc).__name__  # OpenSSL's source line: noise


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The first exception of `kind` in the chain under `exc` (httpx wraps the socket's and ssl's errors)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _network_problem(exc: httpx.HTTPError) -> str:
    tls = _cause(exc, ssl.SSLError)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return f"its certificate is not trusted ({tls.verify_message})"
    if tls is not None:
        return f"TLS failed ({tls.reason or _reason(tls)})"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {_socket_reason(exc)}"
    return _reason(exc)


def _socket_reason(exc: BaseException) -> str:
    """What the socket said, from the bottom of httpx's chain: "Connection refused", a resolver error."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return f"the name does not resolve ({seen.strerror})"
        if isinstance(seen, OSError) and seen.errno is not None:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    return _reason(exc)


def _network_hint(config: OAuthProfile, exc: httpx.HTTPError) -> str:
    if isinstance(_cause(exc, ssl.SSLError), ssl.SSLCertVerificationError):
        return "for a private CA set ca_file; else check for a TLS-inspecting proxy"
    port = urlsplit(config.token_url).port or 443
    return f"check DNS and that HTTPS to it (port {port}) is allowed (firewall, proxy)"
