"""ear-dist: distributed concept erasure for autoregressive text-to-image models."""

import os

__version__ = "0.1.0"

# OpenMP threads that wait for work sleep instead of spinning, so a multi-threaded CPU phase
# (world pretraining on world.threads) does not fight another process for a shared core: with
# the default spinning, two threads beside one busy process on a 2-core machine trained many
# times slower (results/cpu-benchmarks.md). The runtime reads this once, when torch loads,
# so it applies wherever ear_dist is imported first (the CLI, python -m ear_dist, the test
# suite's world builds); a value the user set wins. It changes no arithmetic.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
