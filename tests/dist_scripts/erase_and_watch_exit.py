"""The ``ear-dist`` program (arguments as given) run by every rank of a launched job, watched from inside:

- an exit handler says on stderr when interpreter teardown runs (a rank that leaves through
  ``finish_job`` never gets there);
- FAIL_WITH=error or FAIL_WITH=bug: rank 1 fails once training has finished, with a project
  error or a bug.
"""

import atexit
import os
import sys

import ear_dist.train.trainer as trainer
from ear_dist.cli import run
from ear_dist.errors import RunFailure

trained = trainer.run_erase


def run_erase_then_fail(*args, **kwargs):
    summary = trained(*args, **kwargs)
    if os.environ["RANK"] == "1":
        if os.environ["FAIL_WITH"] == "bug":
            raise ZeroDivisionError("injected bug on rank 1 after the last step")
        raise RunFailure("injected failure on rank 1 after the last step")
    return summary


atexit.register(lambda: print(f"interpreter teardown ran on rank {os.environ.get('RANK')}", file=sys.stderr))
if os.environ.get("FAIL_WITH"):
    trainer.run_erase = run_erase_then_fail
sys.argv = ["ear-dist", *sys.argv[1:]]
run()
