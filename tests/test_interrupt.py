"""Ctrl-C outside a training run (which stops at its own safe point) ends any command with one line and exit
130, as a shell reports a program that SIGINT ended; no KeyboardInterrupt traceback, no output left in place."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _default_sigint():
    """The child starts with SIGINT's default disposition, as under a terminal: a suite started in the background
    by a shell without job control has SIGINT ignored, and a child inherits that (Python then keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigint_during_generate_is_one_line_and_exit_130(tiny_checkpoint, tmp_path):
    out = tmp_path / "images"
    proc = subprocess.Popen([sys.executable, "-m", "ear_dist", "generate", "--model", str(tiny_checkpoint),
                             "--prompt", "a church", "--images-per-prompt", "100000", "--out", str(out),
                             "--set", "model.device=cpu"], cwd=tmp_path, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
                            preexec_fn=_default_sigint)
    seen = ""
    while "generating" not in seen:  # tqdm's first bar (no newline after it): generation has begun
        char = proc.stderr.read(1)
        assert char, seen[-2000:]  # the command ended before it began generating
        seen += char
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    err = (seen + rest).replace("\r", "\n").strip().splitlines()
    assert proc.returncode == 130, err[-5:]
    assert re.match(r"ear-dist: interrupted \(SIGINT\) during `ear-dist generate`$", err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not out.exists() and not list(tmp_path.glob(".images*"))
