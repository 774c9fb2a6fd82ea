"""The code paths smtpsvc takes on Windows, run here on Linux (docs/windows.md): no uvloop (asyncio's own
loop) and an event loop that takes no signal handlers (`add_signal_handler` raises NotImplementedError, as
the Proactor loop's does). Ctrl-C then reaches the service as asyncio.run cancelling its main task; it must
still stop in order: 421 to a waiting client, event 9003, exit 0, no traceback. A real process, real sockets.
"""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path

from tests.conftest import base_sections, write_config
from tests.process import _listening_port
from tests.test_signals import events_log
from tests.test_workers import wait_for

AS_ON_WINDOWS = """
import asyncio.unix_events, sys
sys.modules["uvloop"] = None  # not installed on Windows: `import uvloop` fails
def no_signal_handlers(self, sig, callback, *args):
    raise NotImplementedError  # as the Proactor event loop answers
asyncio.unix_events._UnixSelectorEventLoop.add_signal_handler = no_signal_handlers
sys.argv = ["smtpsvc", "serve", "-c", sys.argv[1]]
from smtpsvc.cli import main
main()
"""


def test_ctrl_c_without_loop_signal_handlers_stops_the_service_in_order(tmp_path: Path) -> None:
    root = tmp_path / "mailroot"
    config_file = write_config(tmp_path / "smtpsvc.toml", base_sections(root))
    stderr = tmp_path / "stderr"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", AS_ON_WINDOWS, str(config_file)], stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        port = wait_for(
            lambda: proc.poll() is None and _listening_port(root / "log" / "events.jsonl", 0), "listening"
        )
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            assert client.ehlo("client.test")[0] == 250
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in the console sends
            # The session open at the time is told the service is stopping (as SIGTERM does on Linux).
            code, text = client.getreply()
            assert code == 421, (code, text)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert any(e["id"] == 9003 and e["text"] == "smtpsvc stopped" for e in events_log(root))
    assert "Traceback" not in stderr.read_text()
