"""The bad-input catalogue (docs/runs-and-resume.md), case by case: each bad config, pair file, shard directory, run
directory (checkpoints), delta or model is one line on stderr naming what is wrong, and exit code 2, before
any training. The guide's table and CASES list the same cases (a test keeps them in step)."""

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from ear_dist.cli import main
from ear_dist.data.pairs import PromptPair
from ear_dist.data.shards import write_shards

ROOT = Path(__file__).resolve().parents[1]
GOOD = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
        {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"},
        {"original_prompt": "a red church in snow", "modified_prompt": "a red windmill in snow", "concept": "church"}]


@dataclass
class Case:
    id: str
    argv: Callable  # (inputs) -> argv of `ear-dist`
    message: str  # a regex the last stderr line must match from its start
    setup: Optional[Callable] = None  # (inputs) -> None, run first (e.g. an earlier run into the same directory)


class Inputs:
    """Files of every kind, good and bad, built once (under a temp directory)."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.good = self.write("good.json", json.dumps(GOOD))

    def write(self, name, text=None, data=None):
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if data is not None else text.encode())
        return path

    def shards(self, name, pairs, **kwargs):
        out = self.root / name
        if not out.exists():
            write_shards(pairs, out, **kwargs)
        return out


def token_pairs(n, count=16, code=lambda i, j: (i + j) % 64):
    pairs = []
    for i in range(n):
        pair = PromptPair(f"a church number {i}", f"a barn number {i}", "church", "barn")
        pair.surrogate_tokens = [code(i, j) for j in range(count)]
        pairs.append(pair)
    return pairs


def erase(inputs, *sets, pairs=None, out="run"):
    """`ear-dist erase` on the tiny model with ``sets``; ``pairs`` defaults to a good pairs file."""
    base = [f"model.path={inputs.model}", f"data.pairs={pairs if pairs is not None else inputs.good}",
            f"train.out_dir={inputs.root / out}", "erase.window_len=4", "trainable.first_k_layers=1", "train.steps=1"]
    return ["erase", "--no-progress", *[x for s in [*base, *sets] for x in ("--set", s)]]


def finished_run(out, *sets):
    def setup(inputs):
        shutil.rmtree(inputs.root / out, ignore_errors=True)
        assert main(erase(inputs, *sets, out=out)) == 0

    return setup


def stopped_run(out, step):
    def setup(inputs):
        from ear_dist.config import load_config
        from ear_dist.train.trainer import run_erase

        shutil.rmtree(inputs.root / out, ignore_errors=True)
        calls = {"n": 0}

        def stop():
            calls["n"] += 1
            return calls["n"] == step

        args = erase(inputs, "train.steps=10", "train.checkpoint_every=1", out=out)
        run_erase(load_config(overrides=args[3::2]), progress=False, should_stop=stop)

    return setup


def a_delta(inputs):
    """A real delta of the tiny model (the first call trains it)."""
    path = inputs.root / "delta-run" / "delta.safetensors"
    if not path.exists():
        assert main(erase(inputs, out="delta-run")) == 0
    return path


def model_dir(inputs, name, change):
    """A copy of the tiny model directory, changed by ``change(path)``."""
    out = inputs.root / name
    if not out.exists():
        shutil.copytree(inputs.model, out)
        change(out)
    return out


def not_janus(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    (path / "config.json").write_text(json.dumps(cfg))


def without_weights(path):
    for f in path.glob("*.safetensors"):
        f.unlink()


def pickled_weights(path):
    without_weights(path)
    torch.save({"w": torch.zeros(1)}, path / "pytorch_model.bin")


def other_shapes(path):
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(cfg))


def reseeded(path):
    from ear_dist.models.janus import save_tiny_checkpoint

    shutil.rmtree(path)
    save_tiny_checkpoint(path, seed=7)


def truncate(shard_dir, name, keep):
    path = shard_dir / name
    path.write_bytes(path.read_bytes()[:keep])
    return shard_dir


def garble_first_json(shard_dir, name):
    path = shard_dir / name
    data = bytearray(path.read_bytes())
    start = data.index(b'{"id"')
    data[start:start + 5] = b"#####"
    path.write_bytes(bytes(data))
    return shard_dir


def old_checkpoint(out):
    def setup(inputs):
        (inputs.root / out / "checkpoint").mkdir(parents=True, exist_ok=True)
        (inputs.root / out / "checkpoint" / "state.json").write_text('{"step": 3}')
        (inputs.root / out / "run.json").write_text("{}")

    return setup


def corrupt_optimizer_state(out):
    def setup(inputs):
        stopped_run(out, 2)(inputs)
        (state,) = (inputs.root / out / "checkpoint").glob("step-*/optimizer.json")
        state.write_text("{not json")

    return setup


def bad_delta_tensor(inputs):
    from safetensors.torch import load_file

    from ear_dist.models.delta import load_delta, save_delta

    tensors, meta = load_delta(a_delta(inputs))
    name = next(iter(tensors))
    path = inputs.root / "renamed-delta.safetensors"
    save_delta(path, {name.replace("layers.0.", "layers.99."): tensors[name]}, meta["base_fingerprint"],
               meta["base_model"], meta["concepts"], meta["config"])
    assert load_file(path)
    return path


def merge(inputs, delta, base=None):
    return ["merge", "--base", str(base or inputs.model), "--delta", str(delta), "--out", str(inputs.root / "merged")]


CODEBOOK_16384 = dict(code=lambda i, j: (i * 977 + j * 131) % 16384)


def crafted_delta(name, change):
    """A delta file (written without save_delta's checks) whose tensors are ``change(tensors)`` of a real delta."""
    def make(inputs):
        from safetensors import safe_open

        from ear_dist.storage import save_safetensors

        path = inputs.root / name
        if not path.exists():
            with safe_open(str(a_delta(inputs)), framework="pt") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            save_safetensors(path, change(tensors), meta)
        return path

    return make


def with_nan(tensors):
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[:3] = float("nan")
    return tensors


def foreign_dir(name):
    """A directory of the user's own, with a file in it."""
    def make(inputs):
        (inputs.root / name).mkdir(exist_ok=True)
        (inputs.root / name / "thesis.txt").write_text("keep")
        return inputs.root / name

    return make


def a_file(name):
    def make(inputs):
        return inputs.write(name, "keep")

    return make


def a_fifo(name):
    def make(inputs):
        import os

        path = inputs.root / name
        if not path.exists():
            os.mkfifo(path)
        return path

    return make


def church_suite(inputs):
    return inputs.write("church-suite.json", json.dumps({"name": "church", "concept": "church",
                                                         "prompts": ["a church at night", "a stone church"]}))


def broken_model(inputs):
    """A copy of the test model with one weight set to NaN (a broken merge made elsewhere)."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = inputs.root / "nan-model"
    shutil.copytree(inputs.model, out)
    weights = next(out.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(n for n, t in tensors.items() if t.is_floating_point() and t.dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def generate(inputs, *extra, out="generated"):
    return ["generate", "--model", str(inputs.model), "--out", str(inputs.root / out), "--set", "model.device=cpu",
            *extra]


def eval_cmd(inputs, suite, out="eval-out"):
    return ["eval", "--no-progress", "--suite", str(suite), "--out", str(inputs.root / out),
            "--set", f"model.path={inputs.model}", "--set", "model.device=cpu"]


LONG_PROMPT = "a church " + "with a tall stone tower " * 120

CASES = [
    # ------------------------------------------------------------------ configs
    Case("config-unknown-key", lambda i: erase(i, "erase.windowlen=4"),
         r"ear-dist: config error: erase\.windowlen: unknown key \(known keys of erase: adversarial, concept, concepts, "),
    Case("config-wrong-type", lambda i: erase(i, "train.steps=many"),
         r"ear-dist: config error: train\.steps: expected an integer, got 'many'$"),
    Case("config-value-not-allowed", lambda i: erase(i, "train.resume=sometimes"),
         r"ear-dist: config error: train\.resume: 'sometimes' is not one of auto, never, force$"),
    Case("config-out-of-range", lambda i: erase(i, "train.log_every=0"),
         r"ear-dist: config error: train\.log_every: must be >= 1, got 0$"),
    Case("config-file-missing", lambda i: ["erase", "--config", str(i.root / "nope.yaml")],
         r"ear-dist: config error: config file not found: .*nope\.yaml$"),
    Case("config-file-invalid-yaml", lambda i: ["erase", "--config", str(i.write("bad.yaml", "train:\n  steps: [1\n"))],
         r"ear-dist: config error: .*bad\.yaml: cannot parse: while parsing a flow sequence"),
    Case("config-window-longer-than-image", lambda i: erase(i, "erase.window_len=17"),
         r"ear-dist: config error: erase\.window_len: 17 > the model's 16 image tokens$"),
    Case("config-deepspeed-file-missing", lambda i: erase(i, f"dist.deepspeed_config={i.root / 'zero9.json'}"),
         r"ear-dist: config error: dist\.deepspeed_config: '.*zero9\.json' is neither a file nor a packaged config "
         r"\(zero1, zero2, zero3, zero3_offload\)$"),
    # ------------------------------------------------------------------ pair files
    Case("pairs-not-given", lambda i: erase(i, pairs=""),
         r"ear-dist: error: data\.pairs: no pairs file given \(e\.g\. --set data\.pairs=pairs\.json\)$"),
    Case("pairs-file-missing", lambda i: erase(i, pairs=i.root / "typo.json"),
         r"ear-dist: error: data\.pairs: .*typo\.json: file not found$"),
    Case("pairs-invalid-json", lambda i: erase(i, pairs=i.write("broken.json", '[{"original_prompt": "a",\n "x": }]')),
         r"ear-dist: error: .*broken\.json: line 2 column 7: invalid JSON: Expecting value$"),
    Case("pairs-missing-field", lambda i: erase(i, pairs=i.write("nofield.json", json.dumps(
        [{"original_prompt": "a church", "concept": "church"}]))),
         r"ear-dist: error: .*nofield\.json: row 1: field 'modified_prompt': field is missing$"),
    Case("pairs-empty-prompt", lambda i: erase(i, pairs=i.write("empty.json", json.dumps(
        [{"original_prompt": "  ", "modified_prompt": "a barn", "concept": "church"}]))),
         r"ear-dist: error: .*empty\.json: row 1: field 'original_prompt': empty prompt$"),
    Case("pairs-not-utf8", lambda i: erase(i, pairs=i.write("latin1.csv", data="unsafe_prompt,safe_prompt\n"
                                                                             "caf\xe9 church,caf\xe9 barn\n".encode("latin-1"))),
         r"ear-dist: error: .*latin1\.csv: line 2: not valid UTF-8 \(byte 0xe9 at offset 29\); save the file as UTF-8$"),
    Case("pairs-broken-csv-quote", lambda i: erase(i, pairs=i.write("quote.csv", 'unsafe_prompt,safe_prompt\n'
                                                                                   '"a church,a barn\n')),
         r"ear-dist: error: .*quote\.csv: "),
    Case("pairs-fewer-than-a-step", lambda i: erase(i, "train.pairs_per_step=5"),
         r"ear-dist: error: train\.pairs_per_step: 5 > the 3 pairs available$"),
    Case("pairs-target-without-concept", lambda i: erase(i, "erase.on_missing_concept=fail", pairs=i.write(
        "noconcept.json", json.dumps([{"original_prompt": "a photo of a house", "modified_prompt": "a barn",
                                       "concept": "church"}]))),
         r"ear-dist: error: pair 0 \(id \w+, source ear-json:noconcept\.json\): target prompt 'a photo of a house' "
         r"does not contain the concept 'church' \(set erase\.on_missing_concept=warn"),
    Case("pairs-stored-tokens-wrong-count", lambda i: erase(i, pairs=i.write("tokens.jsonl", json.dumps(
        token_pairs(1, count=20)[0].to_dict()))),
         r"ear-dist: error: pair 0 \(id \w+, source -\): field 'surrogate_tokens' has 20 tokens, the model makes 16 "
         r"image tokens per image"),
    # ------------------------------------------------------------------ shard directories
    Case("shards-no-index", lambda i: erase(i, "data.format=shards", pairs=i.root / "shards-no-index"),
         r"ear-dist: error: .*shards-no-index/index\.json: no index; build shards with `ear-dist data build`$",
         setup=lambda i: (i.root / "shards-no-index").mkdir(exist_ok=True)),
    Case("shards-index-invalid-json", lambda i: erase(i, pairs=i.write("shards-bad-index/index.json", "{").parent),
         r"ear-dist: error: .*shards-bad-index/index\.json: invalid JSON: "),
    Case("shards-token-ids-beyond-the-codebook", lambda i: erase(i, pairs=i.shards(
        "shards-16384", token_pairs(6, **CODEBOOK_16384), max_samples_per_shard=3)),
         r"ear-dist: error: .*shards-16384/pairs-000000\.tar: sample #0 \(pair id \w+\): field 'surrogate_tokens' "
         r"holds token id \d+ at position \d+, outside the model's image codebook \[0, 64\)"),
    Case("shards-token-count", lambda i: erase(i, pairs=i.shards("shards-576", token_pairs(4, count=576))),
         r"ear-dist: error: .*shards-576/pairs-000000\.tar: sample #0 \(pair id \w+\): field 'surrogate_tokens' has "
         r"576 tokens, the model makes 16 image tokens per image"),
    Case("shards-truncated", lambda i: erase(i, "data.shuffle=false", pairs=truncate(i.shards(
        "shards-truncated", token_pairs(4), max_samples_per_shard=2), "pairs-000000.tar", 3000)),
         r"ear-dist: error: .*shards-truncated/pairs-000000\.tar: is 3000 bytes, the index says 10240 "
         r"\(truncated or rewritten\)$"),
    Case("shards-corrupt-sample", lambda i: erase(i, "data.shuffle=false", pairs=garble_first_json(i.shards(
        "shards-garbled", token_pairs(4), max_samples_per_shard=2), "pairs-000000.tar")),
         r"ear-dist: error: .*shards-garbled/pairs-000000\.tar: sample #0: json: Expecting value"),
    Case("shards-fewer-than-a-step", lambda i: erase(i, "train.pairs_per_step=8", pairs=i.shards(
        "shards-small", token_pairs(4))),
         r"ear-dist: error: train\.pairs_per_step: 8 > the 4 pairs in .*shards-small$"),
    # ------------------------------------------------------------------ run directories and checkpoints
    Case("run-of-other-settings", lambda i: erase(i, "erase.concept=nudity", "optim.lr=0.001", out="run-other"),
         r"ear-dist: error: .*run-other holds a run of other settings: erase\.concept \(\"church\" there, "
         r"\"nudity\" now\), optim\.lr \(0\.0001 there, 0\.001 now\)\. Use another train\.out_dir",
         setup=finished_run("run-other")),
    Case("run-checkpoint-past-the-steps", lambda i: erase(i, "train.steps=2", "train.checkpoint_every=1",
                                                         out="run-past"),
         r"ear-dist: error: .*run-past/checkpoint/step-00000003: a checkpoint at step 3, past train\.steps=2",
         setup=stopped_run("run-past", 3)),
    Case("run-finished-without-checkpoint-extended", lambda i: erase(i, "train.steps=2", out="run-extend"),
         r"ear-dist: error: .*run-extend: the run finished at step 1 and kept no checkpoint there",
         setup=finished_run("run-extend")),
    Case("run-outputs-without-record", lambda i: erase(i, out="run-foreign"),
         r"ear-dist: error: .*run-foreign: holds delta\.safetensors but no run record",
         setup=lambda i: i.write("run-foreign/delta.safetensors", "not ours")),
    Case("checkpoint-of-an-older-layout", lambda i: erase(i, out="run-old"),
         r"ear-dist: error: .*run-old/checkpoint: a checkpoint in the layout of an older ear-dist",
         setup=old_checkpoint("run-old")),
    Case("checkpoint-state-unreadable", lambda i: erase(i, "train.steps=10", "train.checkpoint_every=1",
                                                       out="run-corrupt"),
         r"ear-dist: error: .*run-corrupt/checkpoint/step-00000002/optimizer\.\(safetensors\|json\): unreadable "
         r"checkpoint state: ", setup=corrupt_optimizer_state("run-corrupt")),
    # ------------------------------------------------------------------ deltas
    Case("delta-of-another-base", lambda i: merge(i, a_delta(i), base=model_dir(i, "other-base", reseeded)),
         r"ear-dist: error: .*delta-run/delta\.safetensors: trained from base model .* \(fingerprint \w+\), but the "
         r"model given has fingerprint \w+; load the base model the delta was made from \(its path and dtype do not "
         r"matter"),
    Case("delta-missing", lambda i: merge(i, i.root / "nowhere.safetensors"),
         r"ear-dist: error: delta file not found: .*nowhere\.safetensors$"),
    Case("delta-not-safetensors", lambda i: merge(i, i.write("junk.safetensors", "junk")),
         r"ear-dist: error: .*junk\.safetensors: not a readable safetensors file"),
    Case("delta-tensor-not-in-model", lambda i: merge(i, bad_delta_tensor(i)),
         r"ear-dist: error: .*renamed-delta\.safetensors: tensor 'model\.language_model\.layers\.99\..*' does not "
         r"exist in the model$"),
    # ------------------------------------------------------------------ models
    Case("model-path-missing", lambda i: erase(i, f"model.path={i.root / 'no-model'}"),
         r"ear-dist: error: model path .*no-model does not exist \(and is not a preset: tiny, "),
    Case("model-not-janus", lambda i: erase(i, f"model.path={model_dir(i, 'llama', not_janus)}"),
         r"ear-dist: error: .*llama/config\.json: model_type is 'llama', expected 'janus'"),
    Case("model-without-weights", lambda i: erase(i, f"model.path={model_dir(i, 'no-weights', without_weights)}"),
         r"ear-dist: error: .*no-weights: no \*\.safetensors weights found$"),
    Case("model-only-pickled-weights", lambda i: erase(i, f"model.path={model_dir(i, 'pickled', pickled_weights)}"),
         r"ear-dist: error: .*pickled: no \*\.safetensors weights found \(only pickle files: pytorch_model\.bin; "),
    Case("model-weights-do-not-match-config", lambda i: erase(i, f"model.path={model_dir(i, 'shapes', other_shapes)}"),
         r"ear-dist: error: .*shapes: weights do not match config\.json"),
    # ------------------------------------------------------------------ output paths (docs/safety.md)
    Case("out-foreign-directory", lambda i: merge(i, a_delta(i))[:-1] + [str(foreign_dir("mine")(i))],
         r"ear-dist: error: --out .*mine: exists \(1 entry: thesis\.txt\) and was not written by `ear-dist merge`; "
         r"pass --overwrite to replace it, or choose another --out$"),
    Case("out-is-the-base-model", lambda i: merge(i, a_delta(i))[:-1] + [str(i.model), "--overwrite"],
         r"ear-dist: error: --out .*model: is the base model .*model; an output never replaces or writes into an "
         r"input: choose another --out$"),
    Case("out-contains-the-source-checkpoint", lambda i: ["convert", "--from", str(model_dir(
        i, "orig/checkpoint", lambda p: None)), "--out", str(i.root / "orig"), "--overwrite"],
         r"ear-dist: error: --out .*orig: contains the source checkpoint .*orig/checkpoint; an output never"),
    Case("out-is-a-file", lambda i: generate(i, "--prompt", "a church", out="notes.txt"),
         r"ear-dist: error: --out .*notes\.txt: is a file, not a directory; choose a directory path$",
         setup=lambda i: a_file("notes.txt")(i)),
    Case("out-under-a-file", lambda i: ["data", "build", "--pairs", str(i.good), "--out",
                                        str(a_file("notes.txt")(i) / "shards")],
         r"ear-dist: error: --out .*notes\.txt/shards: cannot be created, .*notes\.txt is a file; choose another "
         r"path$"),
    Case("out-teacher-under-a-file", lambda i: ["teacher", "precompute", "--out", str(a_file("notes.txt")(i) / "t"),
                                                "--set", f"model.path={i.model}", "--set", f"data.pairs={i.good}"],
         r"ear-dist: error: --out .*notes\.txt/t: cannot be created, .*notes\.txt is a file"),
    Case("out-eval-foreign-directory", lambda i: eval_cmd(i, i.good, out="mine"),
         r"ear-dist: error: --out .*mine: exists \(1 entry: thesis\.txt\) and was not written by `ear-dist eval`",
         setup=lambda i: foreign_dir("mine")(i)),
    Case("run-out-dir-empty", lambda i: erase(i, "train.out_dir="),
         r"ear-dist: config error: train\.out_dir: empty; name the run directory"),
    Case("run-out-dir-is-a-file", lambda i: erase(i, out="notes.txt"),
         r"ear-dist: error: train\.out_dir .*notes\.txt: is a file, not a directory",
         setup=lambda i: a_file("notes.txt")(i)),
    Case("run-hand-written-config", lambda i: erase(i, out="run-config"),
         r"ear-dist: error: .*run-config: holds config\.yaml but no run record \(written by an older ear-dist, or by "
         r"hand\): use another train\.out_dir, or train\.resume=never to replace them$",
         setup=lambda i: i.write("run-config/config.yaml", "# my settings\n")),
    # ------------------------------------------------------------------ deltas that are no model
    Case("delta-not-finite", lambda i: merge(i, crafted_delta("nan-delta.safetensors", with_nan)(i)),
         r"ear-dist: error: .*nan-delta\.safetensors: tensor '.*' holds 3 non-finite values \(NaN or infinity; 3 of "
         r"the delta's \d+ values\); this delta cannot be applied$"),
    Case("delta-integer", lambda i: merge(i, crafted_delta("int-delta.safetensors", lambda t: {
        k: v.to(torch.int32) for k, v in t.items()})(i)),
         r"ear-dist: error: .*int-delta\.safetensors: tensor '.*' is int32; a delta holds floating-point weights"),
    Case("delta-empty", lambda i: merge(i, crafted_delta("empty-delta.safetensors", lambda t: {})(i)),
         r"ear-dist: error: .*empty-delta\.safetensors: holds no tensors; this delta cannot be applied$"),
    Case("merge-weight-not-finite", lambda i: merge(i, a_delta(i)) + ["--weight", "nan"],
         r"ear-dist: error: --weight nan: a delta's weight must be a finite number$"),
    # ------------------------------------------------------------------ settings that mean nothing
    Case("config-not-finite", lambda i: erase(i, "erase.loss_threshold=nan"),
         r"ear-dist: config error: erase\.loss_threshold: must be a finite number, got nan$"),
    Case("config-guidance-not-finite", lambda i: erase(i, "erase.erase_guidance=nan"),
         r"ear-dist: config error: erase\.erase_guidance: must be a finite number, got nan$"),
    Case("config-temperature-negative", lambda i: erase(i, "rollout.temperature=-1"),
         r"ear-dist: config error: rollout\.temperature: must be in \(0, 100\], got -1$"),
    Case("config-lr-infinite", lambda i: erase(i, "optim.lr=inf"),
         r"ear-dist: config error: optim\.lr: must be a finite number, got inf$"),
    Case("config-lr-not-a-number", lambda i: erase(i, "optim.lr=nan"),
         r"ear-dist: config error: optim\.lr: must be a finite number, got nan$"),
    Case("config-lr-too-large", lambda i: erase(i, "optim.lr=1e6"),
         r"ear-dist: config error: optim\.lr: must be in \(0, 1\], got 1e\+06$"),
    Case("config-workers-negative", lambda i: erase(i, "data.num_workers=-1"),
         r"ear-dist: config error: data\.num_workers: must be >= 0, got -1$"),
    Case("config-concept-empty", lambda i: erase(i, "erase.concept="),
         r"ear-dist: config error: erase\.concept: empty; name the concept to erase"),
    Case("config-device-unknown", lambda i: erase(i, "model.device=gpu7"),
         r"ear-dist: config error: model\.device: 'gpu7' is not one of auto, cpu, cuda, cuda:N"),
    Case("config-duplicate-key", lambda i: ["erase", "--config", str(i.write("dup.yaml", "train:\n  steps: 3\n"
                                                                                        "  steps: 5\n"))],
         r"ear-dist: config error: .*dup\.yaml: line 3: duplicate key 'steps'"),
    # ------------------------------------------------------------------ input limits
    Case("pairs-prompt-too-long", lambda i: erase(i, pairs=i.write("long.json", json.dumps(
        [{"original_prompt": LONG_PROMPT, "modified_prompt": "a barn", "concept": "church"}])), out="run-long"),
         r"ear-dist: error: pair 0 \(id \w+, source ear-json:.*long\.json\), target: prompt 'a church with a tall "
         r"stone tower .*\.\.\.' is \d+ tokens \(with the prompt template\); the model's context holds 512 positions, "
         r"16 of them for the image, so a prompt may have at most 496: shorten it$"),
    Case("pairs-file-is-a-fifo", lambda i: erase(i, pairs=a_fifo("pairs.fifo")(i)),
         r"ear-dist: error: data\.pairs: .*pairs\.fifo is a FIFO, not a regular file; give a file$"),
    Case("generate-prompt-too-long", lambda i: generate(i, "--prompts-file", str(i.write(
        "prompts.txt", f"a church\n\n{LONG_PROMPT}\n"))),
         r"ear-dist: error: .*prompts\.txt: line 3: prompt 'a church with a tall stone tower .*' is \d+ tokens "
         r"\(with the prompt template\); the model's context holds 512 positions"),
    Case("generate-empty-prompt", lambda i: generate(i, "--prompt", ""),
         r"ear-dist: error: --prompt #1: empty prompt$"),
    Case("generate-no-images", lambda i: generate(i, "--prompt", "a church", "--images-per-prompt", "0"),
         r"ear-dist: error: --images-per-prompt: must be >= 1, got 0$"),
    Case("generate-model-not-finite", lambda i: ["generate", "--model", str(broken_model(i)), "--prompt", "a church",
                                                 "--out", str(i.root / "generated"), "--set", "model.device=cpu"],
         r"ear-dist: error: .*nan-model: weight \S+ holds 1 NaN or infinite value\(s\) of \d+; the model is broken"),
    # ------------------------------------------------------------------ judges
    Case("eval-classifier-does-not-know-the-concept", lambda i: eval_cmd(i, church_suite(i)),
         r"ear-dist: error: suite church \(.*church-suite\.json\): concept 'church' cannot be judged by its "
         r"classifier \(eval\.classifier\.kind=nudenet judges nudity only\); pass a classifier that knows it"),
    Case("eval-suite-not-a-function", lambda i: eval_cmd(i, "os:system"),
         r"ear-dist: error: suite 'os:system': os:system is not a Python function"),
    Case("eval-world-suite-on-another-model", lambda i: eval_cmd(i, "world:church"),
         r"ear-dist: error: suite world-church \(world \w+\): judges images of 64 tokens from 256 codes, but model "
         r".* makes 16 tokens from 64 codes"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoint):
    return Inputs(tmp_path_factory.mktemp("bad-inputs"), tiny_checkpoint)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_naming_it_and_exit_code_2(case, inputs, capsys):
    if case.setup is not None:
        case.setup(inputs)
    argv = case.argv(inputs)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err[-5:]
    assert re.match(case.message, err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err)


def test_the_docs_catalogue_lists_exactly_these_cases():
    guide = (ROOT / "docs" / "runs-and-resume.md").read_text()
    section = guide.split("## Bad-input catalogue", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"\| `([a-z0-9-]+)` \|", section)
    assert listed == [c.id for c in CASES] and len(listed) >= 25
