"""The pure half of OAuth 2.0 token acquisition: what to send and what an answer means, without I/O.

The token request's form for each grant (client credentials with a client secret or a signed client
assertion, refresh token), the header and claims of the client assertion Entra accepts, the reading of the
token endpoint's answer (a token, or the provider's error turned into a TokenError that says what to do),
and when a cached token is due for renewal. smtpsvc.oauth.broker does the file reads, the signing and the
HTTPS around it; everything here is tested with tables.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from smtpsvc.config import OAuthProfile
from smtpsvc.tokens import TokenError

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300.0  # seconds; Entra accepts up to 10 minutes, a short one is less worth stealing
REFRESH_MARGIN = 300.0  # renew 5 minutes before expiry, or at 90% of the lifetime when that comes first
DEFAULT_LIFETIME = 3600.0  # an answer without expires_in (RFC 6749 5.1 makes it optional): the usual hour
MAX_DETAIL = 300  # characters of the provider's error_description kept in a TokenError

# The provider's `error` codes that asking again cannot fix: the configuration (or the app registration, or
# the refresh token) has to change first.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_grant",
        "invalid_scope",
        "invalid_request",
        "unsupported_grant_type",
    }
)

# What to do, by Entra error code (the AADSTS number) first, then by the OAuth 2.0 `error`.
_AADSTS_HINTS = {
    "7000215": "check client_secret_file: it must hold the secret's Value (not its Secret ID) of this app",
    "7000222": "the client secret has expired: create a new one in the app registration and put it into"
    " client_secret_file",
    "700016": "check client_id and tenant: no such application in this directory",
    "90002": "check tenant: no such directory",
    "900023": "check tenant: it must be the directory ID or a verified domain",
    "700027": "check certificate_file and key_file: the certificate must be uploaded to the app registration"
    " and the key must belong to it",
    "7000112": "the application is disabled in Entra ID",
    "50126": "check the credentials",
    "70011": "check scope: for SMTP use https://outlook.office365.com/.default",
    "700082": "the refresh token has expired: obtain a new one and put it into refresh_token_file",
    "65001": "an administrator has not consented to the application's permissions: grant admin consent",
}
_ERROR_HINTS = {
    "invalid_client": "check client_id and client_secret_file (or certificate_file and key_file)",
    "unauthorized_client": "the application may not use this grant: check its registration and permissions",
    "invalid_grant": "the refresh token is expired or revoked: obtain a new one and put it into"
    " refresh_token_file",
    "invalid_scope": "check scope",
    "invalid_request": "check tenant, client_id and scope",
    "unsupported_grant_type": "the endpoint does not offer this grant: check token_url and provider",
}


@dataclass(frozen=True, slots=True)
class Credentials:
    """The secrets of one token request, read from the profile's files just before it. Never in a repr."""

    client_secret: str = field(default="", repr=False)
    assertion: str = field(default="", repr=False)  # a signed JWT (certificate profiles)
    refresh_token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Grant:
    """A successful answer: the access token, its lifetime, and a new refresh token when one was sent."""

    access_token: str = field(repr=False)
    expires_in: float
    refresh_token: str = field(default="", repr=False)


def endpoint_host(profile: OAuthProfile) -> str:
    return urlsplit(profile.token_url).hostname or profile.token_url


def token_form(profile: OAuthProfile, credentials: Credentials) -> dict[str, str]:
    """The form POSTed to the token endpoint (application/x-www-form-urlencoded)."""
    form = {"client_id": profile.client_id, "scope": profile.scope}
    if profile.refresh_token_file:
        form |= {"grant_type": "refresh_token", "refresh_token": credentials.refresh_token}
    else:
        form["grant_type"] = "client_credentials"
    if credentials.assertion:
        form |= {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": credentials.assertion}
    elif credentials.client_secret:
        form["client_secret"] = credentials.client_secret
    return form


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def assertion_header(certificate_der: bytes) -> dict[str, str]:
    """The JOSE header of a client assertion: Entra finds the uploaded certificate by its thumbprints."""
    return {
        "alg": "RS256",
        "typ": "JWT",
        "x5t": _b64url(hashlib.sha1(certificate_der).digest()),  # a name for the cert, not a MAC
        "x5t#S256": _b64url(hashlib.sha256(certificate_der).digest()),
    }


def assertion_claims(profile: OAuthProfile, now: float, jti: str) -> dict[str, str | int]:
    """The claims of a client assertion (RFC 7523 3, as Entra wants them): for this endpoint, from this
    client, unique, valid from now for ASSERTION_LIFETIME."""
    return {
        "aud": profile.token_url,
        "iss": profile.client_id,
        "sub": profile.client_id,
        "jti": jti,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + ASSERTION_LIFETIME),
    }


def refresh_at(obtained: float, expires_at: float) -> float:
    """When a token obtained at `obtained` is renewed: REFRESH_MARGIN before it expires or at 90% of its
    lifetime, whichever comes first, but not before half of it (a short-lived token is still used)."""
    lifetime = max(0.0, expires_at - obtained)
    return obtained + max(0.5 * lifetime, min(0.9 * lifetime, lifetime - REFRESH_MARGIN))


def failure(profile: OAuthProfile, problem: str, hint: str, *, permanent: bool) -> TokenError:
    text = f'OAuth profile "{profile.name}": token request to {endpoint_host(profile)} failed: {problem}'
    return TokenError(f"{text}; {hint}" if hint else text, permanent=permanent)


def _hint(error: str, description: str) -> str:
    if description.startswith("AADSTS"):
        code = description[6:].split(":", 1)[0].strip()
        if code in _AADSTS_HINTS:
            return _AADSTS_HINTS[code]
    return _ERROR_HINTS.get(error, "")


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."


def parse_answer(profile: OAuthProfile, status: int, body: bytes) -> Grant:
    """The token endpoint's answer read: a Grant, or a TokenError naming the provider's error (Entra's
    `AADSTS…` code kept), saying what to do, permanent when only a configuration change helps."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        transient = status >= 500 or status in (408, 429)
        what = f"HTTP {status} with no JSON answer" if status != 200 else "the answer is not JSON"
        hint = "" if transient else "check token_url"
        raise failure(profile, what, hint, permanent=not transient)
    if status == 200 and isinstance(answer.get("access_token"), str) and answer["access_token"]:
        lifetime = answer.get("expires_in", DEFAULT_LIFETIME)
        try:
            seconds = float(lifetime)
        except (TypeError, ValueError):
            seconds = DEFAULT_LIFETIME
        refresh = answer.get("refresh_token")
        return Grant(answer["access_token"], max(0.0, seconds), refresh if isinstance(refresh, str) else "")
    error = str(answer.get("error") or "")
    description = _first_line(str(answer.get("error_description") or ""))
    if status == 200 and not error:
        raise failure(profile, "the answer has no access_token", "check token_url", permanent=True)
    problem = ": ".join(p for p in (error or f"HTTP {status}", description) if p)
    transient = status >= 500 or status in (408, 429) or error == "temporarily_unavailable"
    permanent = not transient and (error in PERMANENT_ERRORS or 400 <= status < 500)
    raise failure(profile, problem, _hint(error, description) if permanent else "", permanent=permanent)
