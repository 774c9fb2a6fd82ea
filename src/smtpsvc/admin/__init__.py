"""Operator tools: one admin service layer that the CLI (and later the HTTP API) call."""
