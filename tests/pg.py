"""A throwaway PostgreSQL cluster for the queue tests: initdb into a temporary folder, run on 127.0.0.1.

The cluster is real (the Debian/Ubuntu server binaries under /usr/lib/postgresql/<n>/bin), so the tests see
what production sees: row locks, SKIP LOCKED, LISTEN/NOTIFY, a server that goes away and comes back. TCP
connections need the password (scram-sha-256) so that an authentication failure can be tested; the Unix
socket, inside the temporary folder, is trusted. Every step has a deadline; the server is stopped with
`pg_ctl stop` and, failing that, by the PID in its postmaster.pid, never by name.

initdb refuses to run as root: when the tests run as root, the cluster belongs to the `postgres` system
user (the package creates it) and every server command runs as that user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

PASSWORD = "queue-test-secret"
SUPERUSER = "postgres"
START_TIMEOUT = 60.0


def find_bindir() -> Path | None:
    """The newest PostgreSQL server binaries installed (initdb, pg_ctl, postgres), or None."""
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        with contextlib.suppress(ValueError):
            candidates.append((float(initdb.parent.parent.name), initdb.parent))
    on_path = shutil.which("initdb")
    if not candidates and on_path is not None:  # other layouts (RPM, Homebrew) put them on PATH
        return Path(on_path).parent
    return max(candidates)[1] if candidates else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    """One cluster: `start()` (initdb the first time), `stop()`, `start()` again, `destroy()`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="smtpsvc-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = 0
        self._owner = _server_user()
        if self._owner is not None:  # the server user must own the folder it writes into
            os.chown(self.root, self._owner.pw_uid, self._owner.pw_gid)
        os.chmod(self.root, 0o700)

    def dsn(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.port}/{database}"

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        if self.port == 0:
            self.port = free_port()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c max_connections=200"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
            "-t", str(int(START_TIMEOUT)), "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown. `immediate`: the server dies without a checkpoint (like a crash), and
        the next start replays its WAL."""
        if self.pid() is None:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        except (subprocess.SubprocessError, OSError):
            self._kill()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def pid(self) -> int | None:
        """The postmaster's PID from postmaster.pid, when the server is running."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    # -- internals -----------------------------------------------------------------------------------
    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._owner is not None:
            os.chown(pwfile, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync",
        )  # fmt: skip
        pwfile.unlink()

    def _run(self, program: str, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no stray PGHOST, PGDATA...
        env["LC_ALL"] = "C"
        kwargs: dict[str, object] = {}
        if self._owner is not None:
            kwargs = {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}
        done = subprocess.run(
            [str(self.bindir / program), *args],
            cwd=self.root,
            env=env,
            capture_output=True,
            timeout=START_TIMEOUT + 30,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{program} failed ({done.returncode}): {done.stderr.decode(errors='replace')}\n{log}"
            )

    def _kill(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT)  # the postmaster's "immediate shutdown"
        deadline = time.monotonic() + 30
        while self.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)


def _server_user() -> Any:
    """None when we are not root (the cluster is ours); else the `postgres` account (a pwd entry)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd  # POSIX only, and only needed as root

    try:
        return pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError(
            "running as root, and there is no `postgres` user to own the test cluster (initdb refuses root)"
        ) from exc
