"""What delivery needs from OAuth 2.0: an access token for a named profile (`[oauth.NAME]`), and a way to say
that the one it used was refused.

The transports that log in with a token (SMTP XOAUTH2 and OAUTHBEARER, the Microsoft Graph transport) depend
on this interface only; `smtpsvc.oauth` implements it (token requests, the cache shared by all connections,
refresh before expiry) and the composition root hands it in. Keeping it here, below delivery and oauth, lets
either change without the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

CAUSE_TOKEN_FAILED = "oauth-token-failed"


@dataclass(frozen=True, slots=True)
class AccessToken:
    value: str = field(repr=False)  # a bearer secret: never in a repr, a log line or an event
    expires_at: float  # time.time() after which the provider refuses it


class TokenError(Exception):
    """No token could be had for a profile. The text names the profile, the endpoint and the provider's own
    error (an `AADSTS…` code, `invalid_client`, …) and what to do; never the secret. `permanent`: asking
    again will not help until the configuration changes (a wrong secret, an unknown client); the message
    still waits in the queue (a fixed secret delivers it), but the operator hears of it at once."""

    def __init__(self, text: str, *, cause: str = CAUSE_TOKEN_FAILED, permanent: bool = False) -> None:
        super().__init__(text)
        self.cause = cause
        self.permanent = permanent


class TokenSource(Protocol):
    async def token(self, profile: str, *, refused: AccessToken | None = None) -> AccessToken:
        """A current token for `profile`, from the cache while it is valid (callers at the same moment share
        one request). `refused`: the peer rejected this token (535 5.7.3, a SASL error, HTTP 401): it is
        dropped and a new one fetched, unless a newer one is already cached. Raises TokenError."""
        ...
