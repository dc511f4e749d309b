"""Run as every rank of a 2-rank ``ear-dist erase`` (the program, arguments as given): rank 1 fails once
training has finished, with a project error (FAIL_WITH=error) or a bug (FAIL_WITH=bug)."""

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


trainer.run_erase = run_erase_then_fail
sys.argv = ["ear-dist", *sys.argv[1:]]
run()
