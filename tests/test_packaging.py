"""Packaging: the Dockerfile (checked statically: there is no Docker daemon in the test environment, and no
hadolint is needed: the rules that matter here are checked below) and the systemd unit (`systemd-analyze
verify`; in CI, CI=true, a missing systemd-analyze is a failure, not a skip)."""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from smtpsvc.cli import main
from smtpsvc.config import load_config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
UNIT = REPO / "packaging" / "smtpsvc.service"
VOLUME = "/var/lib/smtpsvc"


# --------------------------------------------------------------------------------------------- Dockerfile


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    result = []
    for entry in logical:
        word, _, rest = entry.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def final_stage(parsed: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (word, _) in enumerate(parsed) if word == "FROM"]
    return parsed[starts[-1] :]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV KEY=VALUE pairs (the form this Dockerfile uses), quotes removed as Docker does."""
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for key, value in re.findall(r"""([A-Za-z_][A-Za-z0-9_]*)=('[^']*'|"[^"]*"|\S+)""", args):
                env[key] = value[1:-1] if value[:1] in "'\"" else value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


def test_image_is_python_3_11_slim_and_installs_the_package_with_pip(
    dockerfile: list[tuple[str, str]],
) -> None:
    froms = [args.split()[0] for word, args in dockerfile if word == "FROM"]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    installs = [args for word, args in dockerfile if word == "RUN" and "pip install" in args]
    assert installs, "no pip install"
    for command in installs:
        assert "--no-cache-dir" in command  # hadolint DL3042: no pip cache in the image
        assert re.search(r"\s\.(\s|$)", command), "pip install . (the package from this checkout)"


def test_image_runs_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    users = [args for word, args in final_stage(dockerfile) if word == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # the USER comes before what runs: the ENTRYPOINT/CMD and the HEALTHCHECK
    words = [word for word, _ in final_stage(dockerfile)]
    assert words.index("USER") < words.index("ENTRYPOINT")


def test_mailroot_is_in_the_volume_and_smtp_listens_on_all_addresses_port_2525(
    dockerfile: list[tuple[str, str]],
) -> None:
    stage = final_stage(dockerfile)
    volumes = [args for word, args in stage if word == "VOLUME"]
    assert volumes == [VOLUME]
    assert [args for word, args in stage if word == "EXPOSE"] == ["2525"]  # not 8025: admin stays inside
    # The image's configuration is its ENV overrides: load it the way the service would, without a file.
    env = env_of(stage)
    config = load_config(None, env={k: v for k, v in env.items() if k.startswith("SMTPSVC")})
    assert str(config.server.root).startswith(VOLUME + "/")
    assert config.server.listen == (("0.0.0.0", 2525),)
    assert config.admin.listen is not None and config.admin.listen[0] == "127.0.0.1"
    workdirs = [args for word, args in stage if word == "WORKDIR"]
    assert workdirs[-1] == VOLUME  # relative paths (users.toml without a config file) land in the volume


def test_entrypoint_and_cmd_are_exec_form_and_run_serve(dockerfile: list[tuple[str, str]]) -> None:
    stage = final_stage(dockerfile)
    [entrypoint] = [json.loads(args) for word, args in stage if word == "ENTRYPOINT"]
    [cmd] = [json.loads(args) for word, args in stage if word == "CMD"]
    assert entrypoint == ["smtpsvc"]
    assert cmd[0] == "serve"
    # the arguments are valid for `smtpsvc serve` (parsed by the real CLI, not run)
    serve = main.commands["serve"]
    assert isinstance(serve, click.Command)
    serve.make_context("serve", cmd[1:])


def healthcheck_command(dockerfile: list[tuple[str, str]]) -> list[str]:
    [args] = [args for word, args in final_stage(dockerfile) if word == "HEALTHCHECK"]
    options, _, command = args.partition("CMD ")
    assert re.search(r"--interval=\d+s", options) and re.search(r"--timeout=\d+s", options)
    exec_form: list[str] = json.loads(command)  # exec form: no shell needed in the image
    return exec_form


def test_healthcheck_uses_python_stdlib_against_healthz_on_loopback(
    dockerfile: list[tuple[str, str]],
) -> None:
    command = healthcheck_command(dockerfile)
    assert command[0] == "python"
    assert not {"curl", "wget"} & set(" ".join(command).split())  # not in python:3.11-slim
    assert "127.0.0.1" in command[-1] and "8025" in command[-1] and "/healthz" in command[-1]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        body = b'{"status": "ok"}'
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


def run_healthcheck(dockerfile: list[tuple[str, str]], port: int) -> int:
    """The HEALTHCHECK command as the image runs it, pointed at `port` instead of 8025."""
    command = healthcheck_command(dockerfile)
    code = command[-1].replace("8025", str(port))
    return subprocess.run([sys.executable, *command[1:-1], code], capture_output=True, timeout=30).returncode


def test_healthcheck_passes_on_200_and_fails_otherwise(
    dockerfile: list[tuple[str, str]], health_server: http.server.HTTPServer
) -> None:
    port = health_server.server_address[1]
    _Health.paths = []
    _Health.status = 200
    assert run_healthcheck(dockerfile, port) == 0
    assert _Health.paths == ["/healthz"]
    _Health.status = 503
    assert run_healthcheck(dockerfile, port) != 0
    health_server.shutdown()
    health_server.server_close()  # nothing listens any more
    assert run_healthcheck(dockerfile, port) != 0


SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE", re.IGNORECASE)
SECRET_FILE = re.compile(r"\.(pem|key|crt|p12|token|password)\b|users\.toml|smtpsvc\.toml|id_rsa")


def test_no_secrets_in_the_image(dockerfile: list[tuple[str, str]]) -> None:
    for word, args in dockerfile:
        assert word != "ADD", "COPY, not ADD (hadolint DL3020): no remote URLs or archives"
        if word in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", args)
            assert not [n for n in names if SECRET_NAME.search(n)], f"{word} {args}"
        if word == "COPY" and "--from=" not in args:
            sources = args.split()[:-1]
            assert "." not in sources, "COPY . would take the whole context"
            assert not [s for s in sources if SECRET_FILE.search(s)], args
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [p for p in ignored if p and not p.startswith("#")]
    for name in (".git", ".venv", "mailroot", "users.toml", "smtpsvc.toml", "cert.pem", "cert.key"):
        assert dockerignored(name, patterns), f"{name} would be sent to the Docker build"
    assert not dockerignored("pyproject.toml", patterns)


def dockerignored(name: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for top-level names: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        if fnmatch.fnmatch(name, body.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_every_copied_source_exists_and_is_in_the_build_context(dockerfile: list[tuple[str, str]]) -> None:
    patterns = [
        p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    for word, args in dockerfile:
        if word == "COPY" and "--from=" not in args:
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignored(source.split("/")[0], patterns), f"COPY {source}: .dockerignore'd"


# --------------------------------------------------------------------------------------------- systemd


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing: CI must install the systemd package")
        pytest.skip("systemd-analyze is not installed (in CI this fails)")
    return tool


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = systemd_analyze()
    # verify checks that ExecStart's binary exists: point it at this environment's smtpsvc script.
    script = Path(sys.executable).with_name("smtpsvc")
    assert script.exists(), f"{script}: the package is not installed in this environment"
    text = UNIT.read_text(encoding="utf-8")
    [exec_start] = unit_settings(text)["ExecStart"]
    binary = exec_start.split()[0]
    unit = tmp_path / "smtpsvc.service"
    unit.write_text(text.replace(f"ExecStart={binary} ", f"ExecStart={script} "), encoding="utf-8")
    done = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    own = [line for line in (done.stdout + done.stderr).splitlines() if "smtpsvc.service" in line]
    assert done.returncode == 0 and not own, done.stdout + done.stderr


def test_systemd_unit_is_notify_hardened_and_binds_port_25_without_root() -> None:
    settings = unit_settings(UNIT.read_text(encoding="utf-8"))

    def one(key: str) -> str:
        [value] = settings[key]
        return value

    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert one("User") not in ("root", "0") and one("Group")
    assert one("AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    for key, value in {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectControlGroups": "true",
        "RestrictNamespaces": "true",
        "RestrictSUIDSGID": "true",
        "LockPersonality": "true",
        "MemoryDenyWriteExecute": "true",
        "SystemCallFilter": "@system-service",
    }.items():
        assert one(key) == value, key
    families = set(one("RestrictAddressFamilies").split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}  # AF_UNIX: the notify socket
    assert re.fullmatch(r"/bin/kill -HUP \$MAINPID", one("ExecReload"))  # SIGHUP reloads
    assert one("KillSignal") == "SIGTERM"
    assert "2" in one("RestartPreventExitStatus").split()  # a config error is not retried in a loop


def test_systemd_unit_runs_serve_with_the_mailroot_in_its_state_directory() -> None:
    settings = unit_settings(UNIT.read_text(encoding="utf-8"))
    [exec_start] = settings["ExecStart"]
    binary, *args = exec_start.split()
    assert binary.endswith("/smtpsvc") and args[0] == "serve"
    serve = main.commands["serve"]
    assert isinstance(serve, click.Command)
    params = serve.make_context("serve", args[1:]).params  # valid options for the real CLI
    [state] = settings["StateDirectory"]
    assert params["root"].startswith(f"/var/lib/{state}/")  # the only writable place (ProtectSystem=strict)
