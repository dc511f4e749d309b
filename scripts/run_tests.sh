#!/usr/bin/env bash
# `make test`: the fast tier first, so a broken change fails in minutes, then the slow tier
# (world builds, real Slurm/MPI jobs, multi-process runs). The two world models the slow tier
# shares are built by one background process started now, so they are made while the fast tier
# runs on the other core; the slow tests that need them wait for them (tests/world_builds.py).
# EAR_DIST_TEST_WORLD_CACHE=DIR reuses (or fills) a cache instead. Extra arguments go to pytest.
#
# Usage: scripts/run_tests.sh [PYTEST_ARGS...]    (PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ -z "${EAR_DIST_TEST_WORLD_CACHE:-}" ]; then
    builds=$(mktemp -d -t ear-dist-worlds-XXXXXX)
    # the builds end with this script, however it ends (tests/world_builds.py: die_with_parent)
    EAR_DIST_BUILDS_PARENT=$$ "$PY" -m tests.world_builds "$builds" default_world_model short_var_world_model >"$builds/builds.log" 2>&1 &
    echo $! >"$builds/pid"
    trap 'kill "$(cat "$builds/pid")" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$builds"' EXIT
    export EAR_DIST_TEST_WORLD_BUILDS=$builds
fi

start=$(date +%s)
echo "== fast tier: pytest -m 'not slow'"
"$PY" -m pytest -q -m "not slow" --durations=10 "$@"
echo "== fast tier took $(( $(date +%s) - start )) s; slow tier: pytest -m slow"
"$PY" -m pytest -q -m slow --durations=20 "$@"
echo "== both tiers took $(( $(date +%s) - start )) s"
