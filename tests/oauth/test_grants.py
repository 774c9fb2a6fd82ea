"""The pure part of token acquisition (smtpsvc.oauth.grants), with tables: forms, the client assertion's
header and claims, renewal timing, and what each answer of a token endpoint means."""

from __future__ import annotations

import base64
import json

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from smtpsvc.config import OAuthProfile
from smtpsvc.oauth import grants
from smtpsvc.tokens import TokenError

TOKEN_URL = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"


def profile(**changes: str) -> OAuthProfile:
    values = {
        "name": "m365",
        "provider": "microsoft",
        "tenant": "contoso.onmicrosoft.com",
        "client_id": "app-id",
        "client_secret_file": "/etc/smtpsvc/m365.secret",
        "certificate_file": "",
        "key_file": "",
        "refresh_token_file": "",
        "scope": "https://outlook.office365.com/.default",
        "token_url": TOKEN_URL,
        "ca_file": "",
    }
    return OAuthProfile(**(values | changes))


SCOPE = "https://outlook.office365.com/.default"


@pytest.mark.parametrize(
    ("changes", "credentials", "form"),
    [
        (
            {},
            grants.Credentials(client_secret="pw"),
            {
                "grant_type": "client_credentials",
                "client_id": "app-id",
                "client_secret": "pw",
                "scope": SCOPE,
            },
        ),
        (
            {"client_secret_file": "", "certificate_file": "c.pem", "key_file": "k.pem"},
            grants.Credentials(assertion="jwt"),
            {
                "grant_type": "client_credentials",
                "client_id": "app-id",
                "scope": SCOPE,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": "jwt",
            },
        ),
        (
            {"refresh_token_file": "rt"},
            grants.Credentials(client_secret="pw", refresh_token="rt-1"),
            {
                "grant_type": "refresh_token",
                "client_id": "app-id",
                "client_secret": "pw",
                "refresh_token": "rt-1",
                "scope": SCOPE,
            },
        ),
        (
            {"client_secret_file": "", "refresh_token_file": "rt"},  # a public client: no client secret
            grants.Credentials(refresh_token="rt-1"),
            {"grant_type": "refresh_token", "client_id": "app-id", "refresh_token": "rt-1", "scope": SCOPE},
        ),
    ],
    ids=["client-secret", "client-assertion", "refresh-token", "refresh-token-public-client"],
)
def test_token_form(changes: dict[str, str], credentials: grants.Credentials, form: dict[str, str]) -> None:
    assert grants.token_form(profile(**changes), credentials) == form


def test_credentials_keep_their_secrets_out_of_the_repr() -> None:
    shown = repr(grants.Credentials(client_secret="pw-1", assertion="jwt-1", refresh_token="rt-1"))
    shown += repr(grants.Grant("at-1", 60.0, "rt-2"))
    assert not any(secret in shown for secret in ("pw-1", "jwt-1", "rt-1", "at-1", "rt-2"))


def test_assertion_header_names_the_certificate_by_its_thumbprints() -> None:
    cert = trustme.CA().issue_cert("app.test", key_type=trustme.KeyType.RSA).cert_chain_pems[0].bytes()
    certificate = x509.load_pem_x509_certificate(cert)
    der = certificate.public_bytes(serialization.Encoding.DER)
    header = grants.assertion_header(der)
    padded = header["x5t"] + "=" * (-len(header["x5t"]) % 4)
    assert base64.urlsafe_b64decode(padded) == certificate.fingerprint(hashes.SHA1())
    padded = header["x5t#S256"] + "=" * (-len(header["x5t#S256"]) % 4)
    assert base64.urlsafe_b64decode(padded) == certificate.fingerprint(hashes.SHA256())
    assert "=" not in header["x5t"] + header["x5t#S256"]
    assert header["alg"] == "RS256"


def test_assertion_claims() -> None:
    claims = grants.assertion_claims(profile(), 1_000_000.7, "jti-1")
    assert claims == {
        "aud": TOKEN_URL,
        "iss": "app-id",
        "sub": "app-id",
        "jti": "jti-1",
        "iat": 1_000_000,
        "nbf": 1_000_000,
        "exp": 1_000_300,
    }


@pytest.mark.parametrize(
    ("lifetime", "renew_after"),
    [
        (3600, 3240),  # an hour: at 90% (54 min), before "5 minutes before" (55 min)
        (86400, 77760),  # a day: at 90%
        (1800, 1500),  # 30 minutes: 5 minutes before (27 minutes would be later)
        (600, 300),  # 10 minutes: 5 minutes before = half
        (120, 60),  # shorter than the margin: half its lifetime, not at every call
        (0, 0),
    ],
)
def test_refresh_at(lifetime: float, renew_after: float) -> None:
    assert grants.refresh_at(1000.0, 1000.0 + lifetime) == pytest.approx(1000.0 + renew_after)


def entra(error: str, description: str) -> bytes:
    return json.dumps({"error": error, "error_description": description, "error_codes": [1]}).encode()


@pytest.mark.parametrize(
    ("status", "body", "permanent", "text"),
    [
        (
            401,
            entra("invalid_client", "AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"),
            True,
            "invalid_client: AADSTS7000215: Invalid client secret provided.; check client_secret_file",
        ),
        (
            401,
            entra("invalid_client", "AADSTS7000222: The provided client secret keys are expired."),
            True,
            "create a new one in the app registration",
        ),
        (400, entra("unauthorized_client", "AADSTS700016: Application not found"), True, "check client_id"),
        (400, entra("invalid_request", "AADSTS90002: Tenant 'x' not found."), True, "check tenant"),
        (400, entra("invalid_grant", "Token has been expired or revoked."), True, "refresh_token_file"),
        (400, entra("invalid_scope", "AADSTS70011: bad scope"), True, "check scope"),
        (400, entra("unsupported_grant_type", "no"), True, "check token_url and provider"),
        (
            503,
            entra("temporarily_unavailable", "AADSTS50196: busy"),
            False,
            "temporarily_unavailable: AADSTS50196",
        ),
        (500, b"<html>Internal error</html>", False, "HTTP 500 with no JSON answer"),
        (429, b"", False, "HTTP 429 with no JSON answer"),
        (404, b"<html>Not found</html>", True, "HTTP 404 with no JSON answer; check token_url"),
        (200, b'{"token_type": "Bearer"}', True, "the answer has no access_token"),
        (200, b"not json", True, "the answer is not JSON"),
    ],
)
def test_parse_answer_errors(status: int, body: bytes, permanent: bool, text: str) -> None:
    with pytest.raises(TokenError) as caught:
        grants.parse_answer(profile(), status, body)
    assert caught.value.permanent is permanent
    assert str(caught.value).startswith(
        'OAuth profile "m365": token request to login.microsoftonline.com failed: '
    )
    assert text in str(caught.value)
    assert "Trace ID" not in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "expires_in", "refresh"),
    [
        ({"access_token": "at", "expires_in": 3599}, 3599.0, ""),
        ({"access_token": "at", "expires_in": "3599"}, 3599.0, ""),  # Google once sent strings
        ({"access_token": "at"}, 3600.0, ""),  # RFC 6749 5.1: expires_in is optional
        ({"access_token": "at", "expires_in": 60, "refresh_token": "rt-2"}, 60.0, "rt-2"),
    ],
)
def test_parse_answer_tokens(answer: dict[str, object], expires_in: float, refresh: str) -> None:
    grant = grants.parse_answer(profile(), 200, json.dumps(answer).encode())
    assert (grant.access_token, grant.expires_in, grant.refresh_token) == ("at", expires_in, refresh)


def test_a_long_error_description_is_shortened() -> None:
    with pytest.raises(TokenError) as caught:
        grants.parse_answer(profile(), 400, entra("invalid_request", "x" * 1000))
    assert len(str(caught.value)) < 500
