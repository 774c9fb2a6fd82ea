"""Small helpers shared by bench/idle.py, bench/bigmessage.py, bench/profiling.py and bench/suite.py.

/proc readers (RSS, peak RSS, open fds), the fd limit, the event loop the load generators run on, and the
machine facts every results file starts with. Linux only, like the rest of bench/.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * 1024 * 1024


def uvloop_version() -> str | None:
    """The uvloop version this interpreter can import (the server uses it when it can), else None."""
    if importlib.util.find_spec("uvloop") is None:
        return None
    try:
        return importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a load generator on a new event loop: uvloop when importable (cheaper client), else asyncio."""
    if uvloop_version() is not None:
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def proc_status(pid: int) -> dict[str, int]:
    """The numeric fields of /proc/<pid>/status that matter here, in KiB (Threads: a count).

    VmRSS: resident now; VmHWM: peak resident since start or since reset_peak(); RssAnon: the heap part.
    """
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                out[key] = int(value.split()[0])
    return out


def rss_kib(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/<pid>/clear_refs``, Linux >= 4.0; needs the right
    to write there: the same user or root). False when it could not."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LimitError(Exception):
    pass


def raise_nofile(need: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to at least `need` (children started afterwards
    inherit it). Root may also raise the hard limit, up to fs.nr_open. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    if hard != resource.RLIM_INFINITY and hard < need:
        with contextlib.suppress(ValueError, OSError):  # only root may raise the hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        raise LimitError(
            f"the open-files hard limit is {hard}, below the {need} needed; raise it (as root: "
            f"`ulimit -Hn {need}` in the shell that runs this, or `nofile` in /etc/security/limits.conf "
            f"or LimitNOFILE= for a systemd unit) or ask for fewer sessions"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else need, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def fmt_mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


def mem_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / MIB:.1f} GiB"
    return "?"


def filesystem(path: Path) -> str:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        return (
            subprocess.run(
                ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(path)],
                capture_output=True,
                text=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
            ).stdout.strip()
            or "?"
        )
    return "?"


def postfix_version() -> str:
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        res = subprocess.run(
            ["postconf", "-d", "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        return res.stdout.strip() or "?"
    return "not installed"


def smtpsvc_version() -> str:
    try:
        return importlib.metadata.version("smtpsvc")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_revision(repo: Path) -> str:
    """The commit, and whether the working tree had uncommitted changes (they are measured too)."""
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        ).stdout.strip()
        if head:
            return head + (" with uncommitted changes" if dirty else "")
    return "?"


def machine_facts(repo: Path) -> list[str]:
    uv = uvloop_version()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return [
        f"cores: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})",
        f"CPU: {cpu_model()}",
        f"memory: {mem_total()}",
        f"kernel: {platform.system()} {platform.release()}",
        f"python: {platform.python_version()} ({sys.executable})",
        f"uvloop: {'yes, ' + uv if uv else 'no (plain asyncio)'} (server and load generators)",
        f"smtpsvc: {smtpsvc_version()} at {git_revision(repo)}",
        f"postfix: {postfix_version()}",
        f"temp dir: {tempfile.gettempdir()} on {filesystem(Path(tempfile.gettempdir()))}",
        f"open files limit: soft {soft}, hard {hard}",
    ]


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def section(heading: str, command: str, lines: Sequence[str]) -> str:
    """A results section: its heading, the command that produced it, then `lines`."""
    return "\n".join([heading, "", "```", f"$ {command}", "```", "", *lines]) + "\n"


def table_section(heading: str, command: str, rows: Sequence[Sequence[str]]) -> str:
    """A section holding one two-column table of measures."""
    lines = [
        "| measure | value |",
        "|---|---|",
        *[f"| {name.strip()} | {value} |" for name, value in rows],
        "",
    ]
    return section(heading, command, lines)


def write_results(
    markdown: Path | None,
    no_write: bool,
    headings: tuple[str, str],
    command: str,
    facts: tuple[Sequence[str], Sequence[str]],
    body: Sequence[str],
) -> None:
    """With --markdown (inside the suite, whose header has the machine): the `##` section with the facts
    of this run only, into that file. Alone: a `#` section with every fact, appended to
    bench/results/<date>.md (several runs on one day are all kept). `headings` and `facts`: (suite, alone)."""
    if markdown is not None:
        markdown.write_text(section(headings[0], command, [*[f"- {f}" for f in facts[0]], *body]), "utf-8")
    elif not no_write:
        RESULTS_DIR.mkdir(exist_ok=True)
        out = RESULTS_DIR / f"{datetime.date.today().isoformat()}.md"
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(section(headings[1], command, [*[f"- {f}" for f in facts[1]], *body]))
        print(f"written to {out.relative_to(RESULTS_DIR.parent.parent)}")


SHIELDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Around a benchmark's cleanup: a second Ctrl-C (or SIGTERM/SIGHUP) must not skip stopping what it
    started. Afterwards the default handlers are back."""
    for sig in SHIELDED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in SHIELDED_SIGNALS[1:]:
            signal.signal(sig, signal.SIG_DFL)


def clean_up(stoppers: Sequence[tuple[str, Callable[[], object] | None]], tmp: Path, keep: bool) -> None:
    """A benchmark's end, also after an error or Ctrl-C: stop what it started, in order, each (what, stop;
    None: nothing to stop) whatever the others do, shielded from a second Ctrl-C; then remove `tmp` unless
    it is to be kept."""
    with shielded():
        for what, stop in stoppers:
            if stop is None:
                continue
            try:
                stop()
            except Exception as exc:  # keep stopping the others
                print(f"  while stopping {what}: {exc!r}", file=sys.stderr)
        if keep:
            print(f"  kept {tmp}")
        else:
            print(f"  removing {tmp}", flush=True)
            shutil.rmtree(tmp, ignore_errors=True)


def relay_config(hostname: str, root: Path, sink_port: int, server_extra: Sequence[str] = ()) -> list[str]:
    """The smtpsvc configuration every benchmark relays with: loopback, relay allowed from 127.0.0.0/8,
    the smart host = the smtp-sink, connections reused, no TLS, no admin API."""
    return [
        "[server]",
        f'hostname = "{hostname}"',
        f"root = {json.dumps(str(root))}",
        'listen = ["127.0.0.1:0"]',
        "max_connections = 2000",
        *server_extra,
        'max_message_size = "64MB"',
        "",
        "[relay]",
        'allow = ["127.0.0.0/8"]',
        "",
        "[delivery]",
        f'smart_host = "[127.0.0.1]:{sink_port}"',
        "max_messages_per_connection = 1000",
        'tls = "none"',
        "",
        "[admin]",
        'listen = ""',
        "",
    ]


def print_rows(rows: Sequence[Sequence[str]]) -> None:
    """A two-column table of measures on the terminal."""
    width = max(len(row[0]) for row in rows)
    print()
    for row in rows:
        print(f"{row[0].ljust(width)}  {row[1]}")
