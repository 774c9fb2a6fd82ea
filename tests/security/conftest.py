"""Fixtures for the hostile-input suite: a trustme CA and server certificate, an accounts file."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from smtpsvc.auth.users import UserStore
from tests.security.helpers import PASSWORD, USER


@dataclass(frozen=True)
class Tls:
    ca: trustme.CA
    pem: Path  # key and certificate chain for relay.test
    ca_pem: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    @property
    def section(self) -> dict[str, str]:
        return {"cert": str(self.pem), "key": str(self.pem)}


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test")
    pem = folder / "relay.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
    ca_pem = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    return Tls(ca, pem, ca_pem)


@pytest.fixture(scope="session")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An accounts file with one account, USER / PASSWORD (scrypt: hashed once per test run)."""
    path = tmp_path_factory.mktemp("auth") / "users.toml"
    store = UserStore()
    store.add(USER, PASSWORD)
    store.save(path)
    return path


# Note for tests that use both `sink` and `start_service`: request `sink` first, so that it is torn down
# last. The service keeps idle outbound connections to the sink; stopped in the other order it waits for a
# QUIT reply from a sink that is already gone.
