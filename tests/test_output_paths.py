"""The output-path rule (docs/safety.md, ``ear_dist.paths``): every command's output-path argument, tried against an
existing foreign directory, the base model's directory, a file and a path under a file, is refused with one line
naming it and exit code 2, before any work, and the files there are left as they were."""

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from ear_dist.cli import main

GOOD = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
        {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("outputs")
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps(GOOD))
    delta_run = root / "delta-run"
    sets = [f"model.path={tiny_checkpoint}", f"data.pairs={pairs}", f"train.out_dir={delta_run}",
            "erase.window_len=4", "trainable.first_k_layers=1", "train.steps=1", "train.pairs_per_step=2"]
    assert main(["erase", "--no-progress", *[x for s in sets for x in ("--set", s)]]) == 0
    concepts = root / "concepts.yaml"
    concepts.write_text(f"concepts:\n  - name: church\n    pairs: {pairs}\n")
    return {"root": root, "model": tiny_checkpoint, "pairs": pairs, "delta": delta_run / "delta.safetensors",
            "concepts": concepts}


def _sets(*items):
    return [x for s in items for x in ("--set", s)]


# command -> (argv given the output path, does it replace a foreign directory only with --overwrite)
COMMANDS = {
    "merge --out": (lambda e, out: ["merge", "--base", str(e["model"]), "--delta", str(e["delta"]), "--out", out], True),
    "convert --out": (lambda e, out: ["convert", "--from", str(e["model"]), "--out", out], True),
    "generate --out": (lambda e, out: ["generate", "--model", str(e["model"]), "--prompt", "a church", "--out", out,
                                       *_sets("model.device=cpu")], True),
    "eval --out": (lambda e, out: ["eval", "--suite", str(e["pairs"]), "--out", out,
                                   *_sets(f"model.path={e['model']}", "model.device=cpu")], True),
    "data build --out": (lambda e, out: ["data", "build", "--pairs", str(e["pairs"]), "--out", out], True),
    "teacher precompute --out": (lambda e, out: ["teacher", "precompute", "--out", out, *_sets(
        f"model.path={e['model']}", f"data.pairs={e['pairs']}", "model.device=cpu")], True),
    "erase train.out_dir": (lambda e, out: ["erase", "--no-progress", *_sets(
        f"model.path={e['model']}", f"data.pairs={e['pairs']}", f"train.out_dir={out}", "erase.window_len=4",
        "trainable.first_k_layers=1", "train.steps=1", "train.pairs_per_step=2")], False),
    "erase-many --out": (lambda e, out: ["erase-many", "--concepts", str(e["concepts"]), "--out", out,
                                         *_sets(f"model.path={e['model']}")], True),
    "world build world.cache_dir": (lambda e, out: ["world", "build", *_sets(f"world.cache_dir={out}")], False),
    "data build --jsonl": (lambda e, out: ["data", "build", "--pairs", str(e["pairs"]), "--out",
                                          str(e["root"] / "jsonl-shards"), "--jsonl", out], False),
    "bench --out": (lambda e, out: ["bench", "--out", out, *_sets(f"model.path={e['model']}")], False),
    "demo --out": (lambda e, out: ["demo", "--out", out], False),
    "submit --out": (lambda e, out: ["submit", "--template", "erase_multinode", "--dry-run", "--out", out, *_sets(
        f"model.path={e['model']}")], False),
}
# every output path is tried as a file (an output file: as a directory) and under a file; a model's place also as the
# base model; a directory that replaces what it finds (and erase's, which must not overwrite a hand-written
# config.yaml) as a foreign directory
FILE_OUTPUTS = {"data build --jsonl", "submit --out"}
NOT_A_MODEL_PLACE = {"data build --jsonl", "submit --out", "world build world.cache_dir", "bench --out", "demo --out"}
TRIES = [(command, target) for command in sorted(COMMANDS)
         for target in ["a file", "under a file", "the base model", "a foreign directory"]
         if not (target == "the base model" and command in NOT_A_MODEL_PLACE)
         and not (target == "a foreign directory" and not COMMANDS[command][1] and command != "erase train.out_dir")]


def _run(argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    return rc, err[-1] if err else ""


@pytest.mark.parametrize("command,target", TRIES, ids=[f"{c}|{t}" for c, t in TRIES])
def test_an_output_path_that_would_destroy_files_is_refused(command, target, env, capsys, tmp_path):
    argv_for, _ = COMMANDS[command]
    keep = tmp_path / "thesis.txt"
    keep.write_text("keep")
    out = {"a file": tmp_path if command in FILE_OUTPUTS else keep, "under a file": keep / "sub", "the base model": env["model"],
           "a foreign directory": tmp_path}[target]
    if command == "erase train.out_dir" and target == "a foreign directory":
        (tmp_path / "config.yaml").write_text("# my own notes\n")  # a hand-written config, not a run's
    before = tree_digest(tmp_path), tree_digest(env["model"])
    rc, line = _run(argv_for(env, str(out)), capsys)
    assert rc == 2, line
    assert re.match(r"ear-dist: (config )?error: ", line), line
    assert str(Path(os.path.abspath(out)).resolve()) in line or str(out) in line, line
    assert (tree_digest(tmp_path), tree_digest(env["model"])) == before
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp"))


def test_merge_replaces_its_own_output_and_a_foreign_directory_only_when_told(env, capsys, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "thesis.txt").write_text("keep")
    argv = ["merge", "--base", str(env["model"]), "--delta", str(env["delta"]), "--out", str(out)]
    rc, line = _run(argv, capsys)
    assert rc == 2 and "pass --overwrite to replace it" in line and "thesis.txt" in line, line
    assert (out / "thesis.txt").read_text() == "keep"
    assert main(argv + ["--overwrite"]) == 0
    assert not (out / "thesis.txt").exists() and (out / "config.json").is_file()
    assert main(argv) == 0  # a rerun into merge's own output needs no flag
    assert json.loads((out / ".ear-dist-output.json").read_text())["command"] == "merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temp sibling left behind


def test_outputs_are_written_with_the_users_umask(env, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["merge", "--base", str(env["model"]), "--delta", str(env["delta"]),
                     "--out", str(tmp_path / "merged")]) == 0
        from ear_dist.models.delta import load_delta, save_delta

        tensors, meta = load_delta(env["delta"])
        save_delta(tmp_path / "d.safetensors", tensors, meta["base_fingerprint"], meta["base_model"],
                   meta["concepts"], meta["config"])
    finally:
        os.umask(old)
    weights = sorted((tmp_path / "merged").glob("*.safetensors")) + [tmp_path / "d.safetensors"]
    assert len(weights) >= 2
    for f in weights:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_merged_model_carries_the_base_models_non_weight_files(env, tmp_path):
    base = tmp_path / "base"
    import shutil

    shutil.copytree(env["model"], base)
    (base / "preprocessor_config.json").write_text('{"image_processor_type": "JanusImageProcessor"}')
    (base / "processor_config.json").write_text('{"processor_class": "JanusProcessor"}')
    assert main(["merge", "--base", str(base), "--no-base-check", "--delta", str(env["delta"]),
                 "--out", str(tmp_path / "merged")]) == 0
    for name in ["preprocessor_config.json", "processor_config.json", "tokenizer_config.json"]:
        if (base / name).exists():
            assert (tmp_path / "merged" / name).read_bytes() == (base / name).read_bytes(), name
    assert (tmp_path / "merged" / "processor_config.json").is_file()
    assert "JanusProcessor.from_pretrained" in (tmp_path / "merged" / "README.md").read_text()
    # a base without processor files: the card does not promise JanusProcessor, it says how to sample instead
    assert main(["merge", "--base", str(env["model"]), "--delta", str(env["delta"]),
                 "--out", str(tmp_path / "plain")]) == 0
    card = (tmp_path / "plain" / "README.md").read_text()
    assert "JanusProcessor.from_pretrained" not in card and "carried no processor files" in card


@pytest.mark.parametrize("extra,message", [
    (["--prompt", ""], r"ear-dist: error: --prompt #1: empty prompt$"),
    (["--prompt", "a church", "--images-per-prompt", "0"], r"ear-dist: error: --images-per-prompt: must be >= 1, "
                                                           r"got 0$"),
])
def test_generate_refuses_nothing_to_draw(extra, message, env, capsys, tmp_path):
    rc, line = _run(["generate", "--model", str(env["model"]), "--out", str(tmp_path / "g"), *extra], capsys)
    assert rc == 2 and re.match(message, line), line
    assert not (tmp_path / "g").exists()


def test_overwrite_never_replaces_the_working_or_home_directory(env, capsys, tmp_path, monkeypatch):
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "src" / "main.py").write_text("keep")
    monkeypatch.chdir(work / "src")
    for out in (work / "src", work):
        rc, line = _run(["merge", "--base", str(env["model"]), "--delta", str(env["delta"]), "--out", str(out),
                         "--overwrite"], capsys)
        assert rc == 2 and "is (or holds) the working directory; --overwrite never replaces it" in line, line
    assert (work / "src" / "main.py").read_text() == "keep"


def _output_options(parser, prefix=()):
    """(command words, option) of every output-path option in the command line (--out, --jsonl)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _output_options(child, prefix + (name,))
        elif prefix and action.dest in ("out", "jsonl"):
            yield " ".join(prefix), action.option_strings[0]


def test_every_output_argument_of_every_command_is_tried():
    from ear_dist.cli import build_parser

    options = {f"{command} {option}" for command, option in _output_options(build_parser())}
    # and the config keys that name a command's output directory
    options |= {"erase train.out_dir", "world build world.cache_dir"}
    assert options == set(COMMANDS)
