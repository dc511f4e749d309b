"""No pickle is loaded and no remote code runs: checkpoints are safetensors + JSON, DeepSpeed's partitions
are read with weights_only=True, and a tampered file is refused without running what it carries."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("ear_dist", "launch", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_the_code_never_unpickles_nor_trusts_remote_code():
    offences = []
    for path in SOURCES:
        text = path.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", line):
                offences.append(where)
            if "torch.load(" in line and "weights_only=True" not in line:
                offences.append(where)
            if re.search(r"np\.load\(", line) and "allow_pickle=False" not in line:
                offences.append(where)
            if "trust_remote_code" in line:
                offences.append(where)
    assert offences == []


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _erase(model, pairs, out, *extra):
    sets = [f"model.path={model}", f"data.pairs={pairs}", f"train.out_dir={out}", "erase.window_len=4",
            "trainable.first_k_layers=1", "train.checkpoint_every=2", *extra]
    return subprocess.run([sys.executable, "-m", "ear_dist", "erase", "--no-progress",
                           *[x for s in sets for x in ("--set", s)]],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture()
def pairs(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn",
                              "concept": "church"}]))
    return f


@pytest.mark.slow  # over 10 s on a 2-core machine
def test_a_checkpoint_holds_only_safetensors_and_json(tmp_path, tiny_checkpoint, pairs):
    res = _erase(tiny_checkpoint, pairs, tmp_path / "run", "train.steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    (ckpt,) = (tmp_path / "run" / "checkpoint").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.json", "optimizer.safetensors", "rank-00000.json", "rank-00000.safetensors", "state.json",
        "trainable.safetensors"]


class _RunsCode:
    """A pickle payload: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_tampered_deepspeed_partition_is_refused_without_running_its_code(tmp_path, tiny_checkpoint, pairs):
    out = tmp_path / "run"
    ds = ["dist.deepspeed_config=ds_configs/zero2.json"]
    res = _erase(tiny_checkpoint, pairs, out, "train.steps=2", *ds)
    assert res.returncode == 0, res.stderr[-3000:]
    (partition,) = (out / "checkpoint" / "step-00000002" / "deepspeed").glob("*optim_states.pt")
    marker = tmp_path / "the-payload-ran"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, partition)
    res = _erase(tiny_checkpoint, pairs, out, "train.steps=3", *ds)
    assert res.returncode == 2, res.stderr[-3000:]
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith(f"ear-dist: error: {partition}: refused to load: Weights only load failed")
    assert not marker.exists()


def test_a_model_directory_with_only_pickled_weights_is_refused(tmp_path, tiny_checkpoint):
    from ear_dist.models.janus import ModelLoadError, load_janus

    model = tmp_path / "model"
    model.mkdir()
    for f in Path(tiny_checkpoint).iterdir():
        if f.suffix != ".safetensors":
            (model / f.name).write_bytes(f.read_bytes())
    torch.save({"weights": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights found \(only pickle files: pytorch_model\.bin;"):
        load_janus(str(model), device="cpu")
