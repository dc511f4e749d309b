import os

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


@pytest.fixture(scope="session")
def default_world_model(tmp_path_factory):
    """The default world build, the one the demo uses, made once per session for the slow tests (the longest
    part of the suite: tens of minutes on a 2-core machine, 36 min when it shared the cores with another build).

    EAR_DIST_TEST_WORLD_CACHE names a cache directory to build into (or reuse a build from)
    across test sessions; unset, every session builds afresh.
    """
    from ear_dist.config import load_config
    from ear_dist.world.pretrain import build_world_model

    cache = os.environ.get("EAR_DIST_TEST_WORLD_CACHE") or tmp_path_factory.mktemp("world-cache")
    cfg = load_config(overrides=[f"world.cache_dir={cache}"]).world
    path, info = build_world_model(cfg, progress=False)
    return cfg, path, info


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
