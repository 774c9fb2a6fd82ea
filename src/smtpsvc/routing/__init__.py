"""Next-hop routing: MX and smart-host resolution."""
