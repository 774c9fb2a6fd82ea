"""Delivery: the scheduler (what to try when), Drop (local domains) and outbound SMTP (remote domains)."""
