"""A non-editable install works on its own: no checkout, no PYTHONPATH.

The wheel is built from a copy of the source tree and installed into a fresh venv that
borrows only the third-party packages of this one (a path in a .pth file, so this venv's
editable ear-dist is not picked up). From a directory outside the checkout, that install
renders an sbatch template with a DeepSpeed config given by name, runs the job's own
pre-flight commands, and reads the packaged example configs.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__",
                                ".pytest_cache", ".cache")


def _run(cmd, cwd, env, timeout=300):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def test_deepspeed_configs_resolve_by_name_and_unknown_names_list_the_choices(tmp_path, monkeypatch):
    from ear_dist.config import ConfigError
    from ear_dist.distributed.deepspeed_engine import DS_CONFIG_DIR, resolve_ds_config

    monkeypatch.chdir(tmp_path)
    assert resolve_ds_config("zero2") == DS_CONFIG_DIR / "zero2.json"
    assert resolve_ds_config("zero3_offload.json") == DS_CONFIG_DIR / "zero3_offload.json"
    (tmp_path / "zero2.json").write_text("{}")  # a file of the user's wins over the packaged name
    assert resolve_ds_config("zero2.json").resolve() == (tmp_path / "zero2.json").resolve()
    with pytest.raises(ConfigError, match="'zero9' is neither a file nor a packaged config .*zero1, zero2, zero3"):
        resolve_ds_config("zero9")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, ear-dist script, venv dir) of a venv where ear_dist comes from the wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    source = shutil.copytree(ROOT, tmp / "source", ignore=IGNORE, symlinks=True)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheels"),
          str(source)], cwd=tmp, env=env)
    wheel = next((tmp / "wheels").glob("ear_dist-*.whl"))
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env).stdout.strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], cwd=tmp, env=env)
    return python, venv / "bin" / "ear-dist", venv, env


@pytest.mark.slow
def test_the_wheel_carries_templates_deepspeed_configs_examples_and_launch(installed, tmp_path):
    python, _, venv, env = installed
    code = ("import ear_dist, ear_dist.launch as launch, json;"
            "from ear_dist.distributed.deepspeed_engine import resolve_ds_config;"
            "from ear_dist.slurm.render import template_path;"
            "from ear_dist.config.loading import example_configs;"
            "print(json.dumps([ear_dist.__file__, launch.__file__, str(resolve_ds_config('zero2')),"
            " str(template_path('erase_multinode')), sorted(example_configs())]))")
    import json

    files = json.loads(_run([str(python), "-c", code], cwd=tmp_path, env=env).stdout)
    for path in files[:4]:
        assert Path(path).resolve().is_relative_to(venv.resolve()), path
    assert files[4] == ["church", "nudity", "van_gogh"]


@pytest.mark.slow
def test_an_installed_ear_dist_renders_a_job_outside_the_checkout(installed, tmp_path):
    python, ear_dist, venv, env = installed
    (tmp_path / "pairs.json").write_text('[{"original_prompt": "a church", "modified_prompt": "a barn"}]')
    sets = ["--set", "data.pairs=pairs.json", "--set", "dist.deepspeed_config=zero2", "--set", "train.out_dir=runs/x",
            "--set", "slurm.nodes=2", "--set", f"slurm.python={python}"]
    res = _run([str(ear_dist), "submit", "--template", "erase_multinode", "--dry-run", *sets], cwd=tmp_path, env=env)
    assert "PYTHONPATH" not in res.stdout
    assert str(ROOT) not in res.stdout
    assert "#SBATCH --nodes=2" in res.stdout
    config = next((tmp_path / "runs" / "x" / "slurm").glob("*.config.yaml"))
    assert "deepspeed_config: zero2" in config.read_text()
    # the job's own first commands, as the node runs them: the installed interpreter, no checkout on the path
    _run([str(python), "-m", "ear_dist", "slurm-env", "--config", str(config), "--check-gpus"], cwd=tmp_path, env=env)
    _run([str(python), "-m", "ear_dist.launch.print_env", "--shell"], cwd=tmp_path, env=env)
    shown = _run([str(ear_dist), "config", "show", "--config", "church"], cwd=tmp_path, env=env).stdout
    assert "window_len: 48" in shown
