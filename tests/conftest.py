import os
import shutil
import tempfile
from pathlib import Path

# Tests share 2 cores with other processes; one intra-op thread keeps them predictable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)

# Without a GPU the Triton kernels run under the interpreter. Triton reads the switch when
# a kernel module is imported, so it is set here, before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolated_launch_state():
    """Each test leaves the environment and the process group as it found them.

    A one-rank DeepSpeed run in the test process exports RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR, ... and joins a one-process group; left behind, they make every later
    srun/mpirun/torchrun child look like a one-rank "env" launch.
    """
    import torch.distributed as dist

    saved = dict(os.environ)
    had_group = dist.is_available() and dist.is_initialized()
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random Janus written to disk once per session, loaded back like a user's model."""
    from ear_dist.models.janus import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture()
def tiny_bundle(tiny_checkpoint):
    from ear_dist.models.janus import load_janus

    return load_janus(str(tiny_checkpoint), device="cpu", dtype="float32")


def _world_model(request, name: str, tmp_path_factory):
    """A shared world build: EAR_DIST_TEST_WORLD_CACHE names a cache directory to build into (or reuse a build
    from) across sessions; unset, the session's background process builds it (``tests/world_builds.py``)."""
    from tests.world_builds import build

    from tests.world_builds import wait_for_runner_build

    cache = os.environ.get("EAR_DIST_TEST_WORLD_CACHE")
    background = getattr(request.config, "_ear_dist_world_builds", None)
    if not cache and os.environ.get("EAR_DIST_TEST_WORLD_BUILDS"):
        cache = wait_for_runner_build(Path(os.environ["EAR_DIST_TEST_WORLD_BUILDS"]), name)
    elif not cache and background is not None and name in background.names:
        background.wait(name)
        cache = background.cache(name)
    return build(name, Path(cache) if cache else tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def default_world_model(request, tmp_path_factory):
    """The default world build, the one the demo uses, for the slow tests (the longest part of the suite: ~13 min
    on a 2-core machine, made in the background while the other tests run)."""
    return _world_model(request, "default_world_model", tmp_path_factory)


@pytest.fixture(scope="session")
def short_var_world_model(request, tmp_path_factory):
    """A 600-step VAR world build (the field layout reaches its target already: README, "The VAR family")."""
    return _world_model(request, "short_var_world_model", tmp_path_factory)


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected
def pytest_collection_modifyitems(session, config, items):
    """Tests that need a shared world build run last, in build order; the builds start now, in the background."""
    from tests.world_builds import BUILDS, BackgroundBuilds

    def needs(item):
        names = getattr(item, "fixturenames", ())
        return next((i for i, name in enumerate(BUILDS) if name in names), -1)

    order = sorted(range(len(items)), key=lambda i: (needs(items[i]), i))
    items[:] = [items[i] for i in order]
    wanted = [name for i, name in enumerate(BUILDS) if any(needs(item) == i for item in items)]
    started_by_runner = os.environ.get("EAR_DIST_TEST_WORLD_CACHE") or os.environ.get("EAR_DIST_TEST_WORLD_BUILDS")
    if wanted and not started_by_runner and not config.option.collectonly:
        config._ear_dist_world_builds = BackgroundBuilds(wanted, Path(tempfile.mkdtemp(prefix="ear-dist-worlds-")))


def pytest_unconfigure(config):
    background = getattr(config, "_ear_dist_world_builds", None)
    if background is not None:
        background.stop()
        shutil.rmtree(background.root, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real two-node Slurm cluster (node1, node2) on this machine, for the session.

    Fails, never skips, when Slurm is not installed or does not start: CI installs
    it with scripts/install_system_deps.sh, and the message says so.
    """
    from tests.slurm_cluster import INSTALL_HINT, LocalSlurmCluster, SlurmClusterError, missing_programs

    missing = missing_programs()
    if missing:
        pytest.fail(f"Slurm tests need {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    cluster = LocalSlurmCluster()
    try:
        cluster.start()
    except SlurmClusterError as error:
        pytest.fail(f"the local Slurm cluster did not start: {error}", pytrace=False)
    yield cluster
    cluster.stop()
