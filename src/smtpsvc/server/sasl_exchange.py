"""One SMTP AUTH exchange (RFC 4954) on the server side: which mechanism, which LOGIN step, and the
credentials once complete. Pure: the session checks the credentials (a slow scrypt, off the loop) and the
rate limit. Credentials never appear in a repr.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpsvc.protocol import Reply, SaslError, replies
from smtpsvc.protocol.sasl import decode_login, decode_plain


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


class SaslExchange:
    def __init__(self) -> None:
        self._mechanism = ""
        self._username: str | None = None

    def start(self, mechanism: str, initial: str | None) -> Reply | Credentials:
        """AUTH <mechanism> [initial]: a challenge (334), an error, or complete credentials."""
        self._mechanism, self._username = mechanism, None
        if initial is None:
            return replies.AUTH_CHALLENGE("") if mechanism == "PLAIN" else replies.LOGIN_USERNAME
        return self.respond(initial)

    def respond(self, data: str) -> Reply | Credentials:
        """One client line of the exchange ("*" cancels)."""
        if data == "*":
            return replies.AUTH_CANCELLED
        try:
            if self._mechanism == "PLAIN":
                authzid, authcid, password = decode_plain(data)
                if authzid and authzid != authcid:
                    return replies.AUTH_FAILED  # acting for another identity is not offered
                return Credentials(authcid, password)
            if self._username is None:
                self._username = decode_login(data)
                return replies.LOGIN_PASSWORD
            return Credentials(self._username, decode_login(data))
        except SaslError:
            return replies.AUTH_BAD_RESPONSE
