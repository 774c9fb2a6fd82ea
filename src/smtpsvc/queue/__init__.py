"""The durable queue: the interface (base) and the local file spool (local)."""
