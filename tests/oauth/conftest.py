"""Fixtures for the OAuth tests: a trustme CA, the HTTPS token endpoint, and a TokenBroker for a profile."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpsvc.config import Config, LiveConfig, load_config
from smtpsvc.oauth import TokenBroker
from tests.conftest import toml_value
from tests.oauth.tokenserver import TENANT, Client, TokenServer, write_ca

CLIENT_ID = "11111111-2222-3333-4444-555555555555"
SECRET = "s3cr3t~Value.of-the-app"  # what the tests search every output for


class Clock:
    """time.time() that a test moves forward: renewal timing without waiting for it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
async def endpoint(ca: trustme.CA) -> AsyncIterator[TokenServer]:
    server = TokenServer(ca, clients={CLIENT_ID: Client(secret=SECRET)})
    await server.start()
    try:
        yield server
    finally:
        server.gate.set()
        await server.stop()


def write_profile(tmp_path: Path, endpoint: TokenServer, ca: trustme.CA, **keys: Any) -> Config:
    """smtpsvc.toml with one profile [oauth.m365] for the test endpoint; `keys` add to or replace its keys
    (None removes one). A client_secret_file holding SECRET unless the test says otherwise."""
    secret = tmp_path / "m365.secret"
    if not secret.exists():
        secret.write_text(SECRET + "\n")
    profile: dict[str, Any] = {
        "provider": "microsoft",
        "tenant": TENANT,
        "client_id": CLIENT_ID,
        "client_secret_file": str(secret),
        "token_url": endpoint.token_url,
        "ca_file": str(write_ca(ca, tmp_path)),
    }
    profile.update(keys)
    lines = ["[oauth.m365]", *(f"{k} = {toml_value(v)}" for k, v in profile.items() if v is not None)]
    path = tmp_path / "smtpsvc.toml"
    path.write_text("\n".join(lines) + "\n")
    return load_config(path, {})


MakeBroker = Callable[..., Awaitable[TokenBroker]]


@pytest.fixture
def warnings() -> list[str]:
    return []


@pytest.fixture
async def make_broker(
    tmp_path: Path, endpoint: TokenServer, ca: trustme.CA, warnings: list[str]
) -> AsyncIterator[MakeBroker]:
    brokers: list[TokenBroker] = []

    async def make(clock: Callable[[], float] = time.time, timeout: float = 20.0, **keys: Any) -> TokenBroker:
        live = LiveConfig(write_profile(tmp_path, endpoint, ca, **keys))
        broker = TokenBroker(live, clock=clock, timeout=timeout, warn=warnings.append)
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        await broker.close()


@pytest.fixture
def clock() -> Iterator[Clock]:
    yield Clock()
