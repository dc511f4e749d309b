"""The test runner's background world-build process ends with its parent, however the parent ends (kill -9 too):
a killed pytest run or scripts/run_tests.sh leaves no build running (tests/world_builds.py: die_with_parent)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARENT = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import os, time; from tests.world_builds import die_with_parent; "
                          "die_with_parent(int(os.environ['EAR_DIST_BUILDS_PARENT'])); time.sleep(600)"],
                         env=dict(os.environ, EAR_DIST_BUILDS_PARENT=str(os.getpid())))
print(child.pid, flush=True)
child.wait()
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_killed_parent_takes_its_background_build_with_it():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    child = int(parent.stdout.readline())
    time.sleep(1)
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(100):  # the child's end is what is checked; the wait is bounded, not measured
        if not _alive(child):
            break
        time.sleep(0.2)
    assert not _alive(child)
