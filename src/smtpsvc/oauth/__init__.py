"""OAuth 2.0 access tokens for the `[oauth.NAME]` profiles: smtpsvc.tokens.TokenSource implemented.

`grants` is the pure part (forms, client assertion claims, reading answers, renewal timing); `broker` the
I/O (files, signing, HTTPS with httpx) and the cache shared by all connections. The composition root
builds one TokenBroker and hands it to the transports that log in with a token.
"""

from smtpsvc.oauth.broker import TokenBroker

__all__ = ["TokenBroker"]
