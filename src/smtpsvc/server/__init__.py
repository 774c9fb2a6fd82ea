"""The inbound SMTP service: listeners and sessions over the sans-I/O protocol core."""
