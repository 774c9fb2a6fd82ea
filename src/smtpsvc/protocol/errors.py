"""The two error types of the protocol core (h11 style): we misused the API, or the peer misbehaved."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .replies import Reply


class ProtocolError(Exception):
    """Base of both; never raised itself."""


class LocalProtocolError(ProtocolError):
    """Our own code drove the core wrongly (e.g. next_event() while a reply is still owed): a bug to fix."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something we cannot make sense of (garbled reply, oversized line).

    `reply` is the reply a server would answer with, when there is one (h11's error_status_hint).
    """

    def __init__(self, message: str, reply: Reply | None = None) -> None:
        super().__init__(message)
        self.reply = reply
