"""``ear-dist erase`` that SIGKILLs itself halfway through writing the checkpoint of step ``KILL_AT_STEP``.

The kill is real (no handler, no cleanup runs); only its moment is chosen: the
checkpoint's trainable tensors are half on disk when it lands.
"""

import os
import signal
import sys

import ear_dist.storage as storage
from ear_dist.cli import main

KILL_AT = f"step-{int(os.environ['KILL_AT_STEP']):08d}.tmp"
original = storage.save_safetensors


def save_then_die(path, tensors, metadata=None):
    if KILL_AT in str(path):
        with open(str(path) + ".tmp", "wb") as f:
            f.write(b"\0" * 4096)  # the first bytes of a write that never finishes
            f.flush()
        print(f"killing myself while writing {path}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, tensors, metadata)


storage.save_safetensors = save_then_die
sys.exit(main(["erase", *sys.argv[1:]]))
