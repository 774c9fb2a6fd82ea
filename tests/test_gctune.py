"""The collector settings a started service process runs with (in a child process: they are global)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc
from smtpsvc import gctune
gctune.after_start()
assert gc.get_threshold()[0] == gctune.YOUNG_THRESHOLD, gc.get_threshold()
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()  # the modules' objects: never walked again
cycle = []
cycle.append(cycle)
del cycle
assert gc.collect() >= 1  # cycles are still collected
"""


def test_after_start_freezes_start_up_objects_and_keeps_collecting_cycles() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
