"""Self-healing (SPEC 2.9): what a next hop has shown it cannot cope with, remembered per host for a while,
so the next attempt avoids it instead of failing the same way until the message expires.

  peer-rejects-ehlo     EHLO answered 5xx, or the connection dropped right after it → HELO from now on
                        (KB818222 method 2, without the registry edit)
  peer-lacks-8bitmime   the connection dropped during 8-bit DATA → convert to 7-bit MIME (KB286673)
  xexch50-blocked       no reply, or a drop, after the XEXCH50 blob → no XEXCH50 to it (KB818222)

Facts expire (`ttl`, a day by default): a fixed peer gets the better protocol back on its own.
"""

from __future__ import annotations

PEER_REJECTS_EHLO = "peer-rejects-ehlo"
PEER_LACKS_8BITMIME = "peer-lacks-8bitmime"
XEXCH50_BLOCKED = "xexch50-blocked"

ACTIONS = {
    PEER_REJECTS_EHLO: "send HELO instead of EHLO",
    PEER_LACKS_8BITMIME: "convert 8-bit messages to 7-bit MIME",
    XEXCH50_BLOCKED: "stop sending the XEXCH50 blob",
}
# What the host choked on, for the event that names the drop.
CHOKED_ON = {
    PEER_REJECTS_EHLO: "EHLO",
    PEER_LACKS_8BITMIME: "8-bit data",
    XEXCH50_BLOCKED: "the XEXCH50 blob",
}


class PeerMemory:
    def __init__(self, ttl: float = 86400.0, max_hosts: int = 10_000) -> None:
        self.ttl = ttl
        self.max_hosts = max_hosts
        self._facts: dict[str, dict[str, float]] = {}

    def knows(self, host: str, cause: str, now: float) -> bool:
        until = self._facts.get(host, {}).get(cause)
        return until is not None and until > now

    def learn(self, host: str, cause: str, now: float) -> bool:
        """Remember `cause` for `host`; True when it was not known already (worth an event)."""
        known = self.knows(host, cause, now)
        if host not in self._facts and len(self._facts) >= self.max_hosts:
            self._facts.pop(next(iter(self._facts)))  # bounded: forget the oldest host
        self._facts.setdefault(host, {})[cause] = now + self.ttl
        return not known
