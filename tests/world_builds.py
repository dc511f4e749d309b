"""The world models the slow tests share, built in one background process while the other tests run.

The default Janus world build and the 600-step VAR build are about a third of the suite's time
on a 2-core machine, and the tests that need them are few. When collection finds such tests,
``conftest.py`` starts ``python -m tests.world_builds DIR NAME ...`` (one build after the other,
each marked done in DIR) and moves those tests to the end of the session, so the builds
overlap everything else on the second core. A fixture waits for its build's marker (or for the
process to end) and then calls ``build_world_model`` itself: it returns the cached model, or,
if the background build did not finish, builds it in the test process as before. The models
are the same either way: pretraining fixes its own thread count (``world.threads``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# fixture name -> (model family, config overrides); the VAR field layout reaches its target in 600 steps
SHORT_VAR_BUILD = ["world.max_steps=600", "world.decay_steps=600", "world.eval_every=600"]
BUILDS: dict[str, tuple[str, list[str]]] = {
    "default_world_model": ("janus", []),
    "short_var_world_model": ("var", SHORT_VAR_BUILD),
}


def build(name: str, cache: Path):
    """(world config, model dir, build info) of the named build, cached under ``cache``."""
    from ear_dist.config import load_config
    from ear_dist.world.pretrain import build_world_model

    family, overrides = BUILDS[name]
    cfg = load_config(overrides=[f"world.cache_dir={cache}", *overrides]).world
    path, info = build_world_model(cfg, progress=False, family=family)
    return cfg, path, info


class BackgroundBuilds:
    """One background process making the named builds in order, under ``root/<name>``."""

    def __init__(self, names: list[str], root: Path):
        self.names, self.root = list(names), Path(root)
        self.log = self.root / "builds.log"
        with open(self.log, "wb") as log:  # -m from the repository root finds tests.world_builds
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.world_builds", str(self.root), *self.names],
                                         cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, EAR_DIST_BUILDS_PARENT=str(os.getpid())))

    def cache(self, name: str) -> Path:
        return self.root / name

    def wait(self, name: str) -> None:
        """Until ``name`` is built or the process has ended (finished, failed or killed)."""
        while not (self.root / f"{name}.done").exists() and self.proc.poll() is None:
            time.sleep(2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def wait_for_runner_build(root: Path, name: str) -> Path:
    """The cache of ``name`` that the test runner's background process (``scripts/run_tests.sh``) builds under
    ``root``: waits until it is marked done or the process (its pid in ``root/pid``) has ended; the fixture then
    builds whatever is missing itself."""
    pid_file = root / "pid"
    while not (root / f"{name}.done").exists() and pid_file.exists() and _alive(int(pid_file.read_text())):
        time.sleep(2)
    return root / name


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child its parent has not reaped yet counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def die_with_parent(parent: int) -> None:
    """End this process when ``parent`` (the test runner: pytest, or scripts/run_tests.sh) ends, however it ends
    (kill -9 included): the kernel's parent-death signal on Linux, and a watch on the parent's pid anywhere."""
    import ctypes
    import signal
    import threading

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the watch below does it

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    if os.getppid() != parent:  # the parent ended before the signal was set
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    die_with_parent(int(os.environ.get("EAR_DIST_BUILDS_PARENT", os.getppid())))
    out = Path(sys.argv[1])
    for build_name in sys.argv[2:]:
        _, model_dir, _ = build(build_name, out / build_name)
        (out / f"{build_name}.done").write_text(str(model_dir))
        print(f"{build_name}: {model_dir}", flush=True)
