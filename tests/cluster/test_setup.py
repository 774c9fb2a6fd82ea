"""Setting a cluster up: `smtpsvc db init|migrate`, and what a node does with a database it cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpsvc.app import MailrootError, Service
from smtpsvc.config import load_config
from smtpsvc.queue import pgschema
from tests.conftest import base_sections, write_config
from tests.pg import free_port
from tests.test_queue_cli import run_sync


def node_config(tmp_path: Path, dsn: str) -> Path:
    queue = {"backend": "postgres", "dsn": dsn, "node_id": "node-a"}
    return write_config(tmp_path / "smtpsvc.toml", base_sections(tmp_path / "mailroot", queue=queue))


def test_db_init_creates_the_schema_once_and_migrate_finds_nothing_to_do(tmp_path: Path, pg_dsn: str) -> None:
    config = str(node_config(tmp_path, pg_dsn))
    assert run_sync("db", "init", "-c", config)[:2] == (
        0,
        f"created the smtpsvc queue schema, version {pgschema.LATEST}\n",
    )
    code, out, _ = run_sync("db", "init", "-c", config)
    assert code == 0 and "nothing to do" in out
    code, out, _ = run_sync("db", "migrate", "-c", config)
    assert code == 0 and f"version {pgschema.LATEST}, the latest: nothing to do" in out


def test_db_init_against_a_server_that_is_down_exits_1_and_says_why(tmp_path: Path) -> None:
    dsn = f"postgresql://smtpsvc:pw@127.0.0.1:{free_port()}/smtpsvc"
    code, _, err = run_sync("db", "init", "-c", str(node_config(tmp_path, dsn)))
    assert code == 1 and "cannot reach PostgreSQL at 127.0.0.1" in err


def test_a_postgres_backend_without_a_dsn_is_a_configuration_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "smtpsvc.toml", {"queue": {"backend": "postgres"}})
    code, _, err = run_sync("config", "check", "-c", str(config))
    assert code == 2 and "queue.dsn" in err and "needs queue.dsn" in err


async def test_a_node_refuses_to_start_on_a_database_without_the_schema(tmp_path: Path, pg_dsn: str) -> None:
    config = load_config(str(node_config(tmp_path, pg_dsn)), env={})
    with pytest.raises(MailrootError, match="run `smtpsvc db init`"):
        await Service(config, log_stream=None).start()
    log = (tmp_path / "mailroot" / "log" / "events.jsonl").read_text()
    assert '"id":429' in log and "queue-unusable" in log


async def test_a_node_refuses_to_start_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    dsn = f"postgresql://smtpsvc:pw@127.0.0.1:{free_port()}/smtpsvc"
    config = load_config(str(node_config(tmp_path, dsn)), env={})
    with pytest.raises(MailrootError, match="cannot reach PostgreSQL"):
        await Service(config, log_stream=None).start()


def test_queue_commands_say_so_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    dsn = f"postgresql://smtpsvc:pw@127.0.0.1:{free_port()}/smtpsvc"
    code, _, err = run_sync("queue", "list", "-c", str(node_config(tmp_path, dsn)))
    assert code == 1 and "cannot reach PostgreSQL at 127.0.0.1" in err
