"""Run `smtpsvc serve` as a real child process (for crash and memory tests); stopped by PID, always."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path


class ServiceProcess:
    def __init__(self, config_file: Path, root: Path, prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: a command that runs the service, e.g. setpriv to run it as another user."""
        self.config_file = config_file
        self.root = root
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        events = self.root / "log" / "events.jsonl"
        seen = _count_lines(events)
        self.stderr = open(self.root.parent / f"service-{time.monotonic_ns()}.stderr", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "smtpsvc", "serve", "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"smtpsvc exited with {self.proc.returncode}")
            port = _listening_port(events, seen)
            if port:
                self.port = port
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("smtpsvc did not report that it is listening")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the crash we must survive."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def stderr_text(self) -> str:
        self.stderr.flush()
        return Path(self.stderr.name).read_text(errors="replace")

    def peak_rss_kib(self) -> int:
        return _status_kib(self.pid, "VmHWM")

    def rss_kib(self) -> int:
        return _status_kib(self.pid, "VmRSS")


def _count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for _ in fh)


def _listening_port(events: Path, skip: int) -> int:
    if not events.exists():
        return 0
    with open(events, "rb") as fh:
        for index, line in enumerate(fh):
            if index < skip:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", record.get("text", ""))
            if record.get("id") == 9002 and match:
                return int(match.group(1))
    return 0


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)
