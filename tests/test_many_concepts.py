"""`ear-dist erase-many`: a concepts file -> pairs, filter, training, merge, eval -> one report.

What a user would notice if these broke: a bad concepts file that starts minutes of work, or
whose error does not say which file, entry and field; a job whose report lacks a concept's
erasure, names the wrong worst concept or counts an erased concept as preserved; a rerun that
trains again instead of resuming; an array route whose merged model is not the sum of its
per-concept deltas; a Slurm rendering whose array tasks or merge step run the wrong thing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ear_dist.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _pairs(tmp_path: Path) -> Path:
    return _write(tmp_path / "church_pairs.json", json.dumps([
        {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
        {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]))


# --------------------------------------------------------------------------- the concepts file


BAD_FILES = {
    "route": ("route: sideways\nconcepts: [church]\n", r"field 'route': 'sideways' is not one of joint, array"),
    "no concepts": ("route: joint\n", r"field 'concepts': expected a non-empty list"),
    "no name": ("concepts:\n  - words: [church]\n", r"concepts\[0\]: field 'name': missing or empty"),
    "unknown entry field": ("concepts:\n  - name: church\n  - name: van gogh\n    colour: red\n",
                            r"concepts\[1\] \(van gogh\): unknown field\(s\) colour"),
    "category": ("concepts:\n  - name: church\n    category: building\n",
                 r"concepts\[0\] \(church\): field 'category': 'building' is not one of object, style"),
    "missing pairs file": ("concepts:\n  - name: church\n  - name: barn\n    pairs: gone.json\n",
                           r"concepts\[1\] \(barn\): field 'pairs': .*gone.json does not exist"),
    "words": ("concepts:\n  - name: church\n    words: [church, 3]\n",
              r"concepts\[0\] \(church\): field 'words': expected a list of non-empty strings"),
    "duplicate": ("concepts:\n  - name: Van Gogh\n  - name: van  gogh\n",
                  r"concepts\[1\] \(van gogh\): field 'name': the same concept as concepts\[0\]"),
    "keep erased": ("concepts: [church]\nkeep: [barn, church]\n", r"field 'keep': church is erased too"),
    "compose": ("route: array\ncompose: blend\nconcepts: [church]\n", r"field 'compose': 'blend' is not one of sum"),
    "pairs per concept": ("pairs_per_concept: 0\nconcepts: [church]\n", r"field 'pairs_per_concept': expected a "
                                                                        r"positive integer"),
    "unknown top field": ("concepts: [church]\nconcept: barn\n", r"unknown field\(s\) concept"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_concepts_file_is_one_line_naming_file_entry_and_field(case, tmp_path, capsys):
    text, message = BAD_FILES[case]
    concepts = _write(tmp_path / "concepts.yaml", text)
    out = tmp_path / "job"
    code = main(["erase-many", "--concepts", str(concepts), "--out", str(out), "--set", "model.path=nowhere"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"ear-dist: error: {concepts}"), err
    import re

    assert re.search(message, err), err
    assert not out.exists()  # refused before anything ran or was written


def test_a_real_model_without_pairs_or_templates_is_refused_before_loading(tmp_path, capsys, tiny_checkpoint):
    concepts = _write(tmp_path / "concepts.yaml", f"concepts:\n  - name: church\n    pairs: {_pairs(tmp_path)}\n"
                                                  "  - name: van gogh\n")
    code = main(["erase-many", "--concepts", str(concepts), "--out", str(tmp_path / "job"),
                 "--set", f"model.path={tiny_checkpoint}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "concepts[1] (van gogh): field 'pairs': none given and data.ecg.templates is empty" in err


def test_an_array_task_past_the_concepts_is_refused(tmp_path, capsys, tiny_checkpoint):
    concepts = _write(tmp_path / "concepts.yaml", f"route: array\nconcepts:\n  - name: church\n"
                                                  f"    pairs: {_pairs(tmp_path)}\n")
    code = main(["erase-many", "--concepts", str(concepts), "--out", str(tmp_path / "job"), "--array-task", "1",
                 "--set", f"model.path={tiny_checkpoint}"])
    assert code == 2
    assert "--array-task 1: " in capsys.readouterr().err


def test_template_pairs_of_a_real_model_use_each_training_word(tmp_path):
    """ECG templates fill every training word of the concept; each pair carries the concept it erases."""
    from ear_dist.config import load_config
    from ear_dist.many.job import ManyConceptJob, Target
    from ear_dist.many.spec import load_spec

    spec = load_spec(_write(tmp_path / "c.yaml", "pairs_per_concept: 6\nconcepts:\n  - name: church\n"
                                                 "    words: [church, chapel]\n    surrogates: [barn, castle]\n"))
    cfg = load_config(overrides=['data.ecg.templates=["a photo of a {concept} {where}"]',
                                 "data.ecg.slots={where: [at night, in snow, by the sea]}"])
    job = ManyConceptJob(spec, cfg, Target("unused", "janus"), tmp_path / "job", log=lambda _: None)
    pairs = job._template_pairs(spec.concepts[0], 6)
    assert len(pairs) == 6
    assert {p.concept for p in pairs} == {"church", "chapel"}
    assert all(p.concept in p.target and p.surrogate_concept in p.surrogate for p in pairs)


def test_each_concept_of_a_real_models_job_draws_its_own_templates_and_surrogates(tmp_path):
    """Two concepts with the same templates and surrogates got pair i from the same draw (one seed for all), so
    a joint run taught every word the same sentences; in a job of several each draws its own, and a concept
    alone draws as it always did, so its pairs differ from its pairs in a job of two."""
    from ear_dist.config import load_config
    from ear_dist.many.job import ManyConceptJob, Target
    from ear_dist.many.spec import load_spec

    cfg = load_config(overrides=['data.ecg.templates=["a photo of a {concept} {where}", "a {concept} {where}"]',
                                 "data.ecg.slots={where: [at night, in snow, by the sea, in a field, in the city]}"])
    entries = ("  - name: tower\n    surrogates: [barn, castle, mill, shed]\n"
               "  - name: bridge\n    surrogates: [barn, castle, mill, shed]\n")

    def frames(text):
        spec = load_spec(_write(tmp_path / "c.yaml", "pairs_per_concept: 8\nconcepts:\n" + text))
        job = ManyConceptJob(spec, cfg, Target("unused", "janus"), tmp_path / "job", log=lambda _: None)
        return [[p.surrogate for p in job._template_pairs(e, 8)] for e in spec.concepts]

    tower, bridge = frames(entries)
    assert tower != bridge  # the surrogate sentences: the same only when both drew the same template and surrogate
    (alone,) = frames(entries.split("  - name: bridge")[0])
    assert alone != tower and len(alone) == len(tower) == 8


def test_a_real_models_pairs_whose_surrogate_names_another_concept_of_the_job_are_dropped(tmp_path):
    """church -> "a barn" would teach the student to draw barn while the same job erases it: such pairs are dropped
    and counted; with barn not erased they are kept (the check can fail)."""
    from ear_dist.config import load_config
    from ear_dist.many.job import ManyConceptJob, Target
    from ear_dist.many.spec import load_spec

    cfg = load_config(overrides=['data.ecg.templates=["a photo of a {concept} {where}"]',
                                 "data.ecg.slots={where: [at night, in snow, by the sea]}"])
    church = "  - name: church\n    surrogates: [barn, castle]\n"
    for erased, expect_dropped in (("  - name: barn\n    surrogates: [castle]\n", True), ("", False)):
        spec = load_spec(_write(tmp_path / "c.yaml", "pairs_per_concept: 12\nconcepts:\n" + church + erased))
        job = ManyConceptJob(spec, cfg, Target("unused", "janus"), tmp_path / f"job{len(erased)}", log=lambda _: None)
        facts = job.make_pairs(spec.concepts[0])
        from ear_dist.many.job import _read_pairs

        pairs = _read_pairs(job.layout.pairs("pairs", spec.concepts[0]))
        surrogates = {p.surrogate_concept for p in pairs}
        if expect_dropped:
            assert facts["dropped_naming_other_concepts"] > 0 and surrogates == {"castle"}, (facts, surrogates)
        else:
            assert facts["dropped_naming_other_concepts"] == 0 and surrogates == {"barn", "castle"}, facts


def test_a_composition_method_plugs_in_where_the_models_offer_it(tmp_path):
    """compose: NAME is checked against ear_dist.models.compose's methods, and merge gets the method with each
    concept's training prompts and the kept prompts."""
    from ear_dist.config import load_config
    from ear_dist.data.pairs import PromptPair
    from ear_dist.many.job import ManyConceptJob, Target, _write_pairs
    from ear_dist.many.spec import ConceptsFileError, load_spec
    from ear_dist.models.compose import ComposeSpec

    bad = _write(tmp_path / "bad.yaml", "route: array\ncompose: nope\nconcepts:\n  - name: church\n")
    with pytest.raises(ConceptsFileError, match="field 'compose': 'nope' is not one of sum, project, ties"):
        load_spec(bad)
    concepts = _write(tmp_path / "c.yaml", "route: array\ncompose: project\nconcepts:\n  - name: church\n"
                                           "    anchors: [a barn]\n  - name: monet\n")
    spec = load_spec(concepts)
    job = ManyConceptJob(spec, load_config(), Target("unused", "janus"), tmp_path / "job", log=lambda _: None)
    for entry, prompt in zip(spec.concepts, ["a church", "a field by monet"]):
        _write_pairs(job.layout.pairs("filter", entry), [PromptPair(prompt, "a field", concept=entry.name)])
    option = job.compose_option()
    assert option == ComposeSpec("project", (("a church",), ("a field by monet",)), ("a barn",), guidance_weight=5.0)


# --------------------------------------------------------------------------- Slurm rendering


def _render(tmp_path, tiny_checkpoint, route, capsys):
    concepts = _write(tmp_path / "concepts.yaml", f"route: {route}\nconcepts:\n  - name: church\n"
                                                  f"    pairs: church_pairs.json\n  - name: van gogh\n"
                                                  f"    pairs: church_pairs.json\n")
    _pairs(tmp_path)
    code = main(["submit", "--template", "erase_many", "--concepts", str(concepts), "--dry-run",
                 "--set", f"model.path={tiny_checkpoint}", "--set", f"train.out_dir={tmp_path / 'job'}",
                 "--set", "slurm.gpus_per_node=8", "--set", "slurm.nodes=4"])
    assert code == 0
    capsys.readouterr()
    return tmp_path / "job" / "slurm"


def test_the_array_route_renders_an_array_and_a_merge_eval_job_after_it(tmp_path, tiny_checkpoint, capsys):
    from ear_dist.config import load_config
    from ear_dist.many.slurm_job import ManyJobScripts, RenderedJob, submit_many

    slurm = _render(tmp_path, tiny_checkpoint, "array", capsys)
    array = (slurm / "ear-dist-erase_many_array.sbatch").read_text()
    finish = (slurm / "ear-dist-erase_many_finish.sbatch").read_text()
    copy = slurm / "ear-dist-erase_many.concepts.json"
    assert "#SBATCH --array=0-1" in array and "#SBATCH --array" not in finish
    # one process per task: a many-concept task is not a multi-node job
    for script in (array, finish):
        assert "#SBATCH --nodes=1" in script and "#SBATCH --gpus-per-node=1" in script
        assert f"erase-many --concepts {copy} --out {tmp_path / 'job'} --config \"$EAR_CONFIG\"" in script
        assert "sha256sum --check" in script and "scontrol requeue" in script
    assert '--array-task "${SLURM_ARRAY_TASK_ID}"' in array and "--array-task" not in finish.split("RANK_ARGS")[1]
    # the job runs the checked concepts file, with absolute paths
    data = json.loads(copy.read_text())
    assert [c["name"] for c in data["concepts"]] == ["church", "van gogh"]
    assert data["concepts"][0]["pairs"] == str(tmp_path / "church_pairs.json")
    cfg = load_config(files=[str(slurm / "ear-dist-erase_many.config.yaml")])
    assert (cfg.slurm.nodes, cfg.slurm.tasks_per_node, cfg.train.out_dir) == (1, 1, str(tmp_path / "job"))
    # the merge/eval job waits for every array task to succeed
    calls = []

    def fake_sbatch(script, *args):
        calls.append((Path(script).name, args))
        return str(100 + len(calls))

    job = RenderedJob("x", slurm / "ear-dist-erase_many_array.sbatch", slurm, "", "")
    done = RenderedJob("y", slurm / "ear-dist-erase_many_finish.sbatch", slurm, "", "")
    assert submit_many(ManyJobScripts(job, done, copy), fake_sbatch) == ["101", "102"]
    assert calls == [("ear-dist-erase_many_array.sbatch", ()),
                     ("ear-dist-erase_many_finish.sbatch", ("--dependency=afterok:101",))]


def test_the_joint_route_renders_one_job(tmp_path, tiny_checkpoint, capsys):
    slurm = _render(tmp_path, tiny_checkpoint, "joint", capsys)
    assert not (slurm / "ear-dist-erase_many_array.sbatch").exists()
    finish = (slurm / "ear-dist-erase_many_finish.sbatch").read_text()
    assert "route joint" in finish and "#SBATCH --array" not in finish


@pytest.mark.slow
def test_array_route_on_a_real_model_trains_each_pairs_file_and_merges(tmp_path, tiny_checkpoint, capsys):
    """A real model: pairs from each concept's file (no world, no filter), one run per concept, the merge; with no
    eval suite the report says so instead of inventing figures."""
    from transformers import JanusForConditionalGeneration

    _pairs(tmp_path)
    _write(tmp_path / "van_gogh.csv", "unsafe_prompt,safe_prompt\na Van Gogh painting of a field,a painting of a "
                                      "field\na Van Gogh style cafe,a cafe\n")
    concepts = _write(tmp_path / "c.yaml", "route: array\nconcepts:\n  - name: church\n    pairs: church_pairs.json\n"
                                           "  - name: Van Gogh\n    pairs: van_gogh.csv\n")
    out = tmp_path / "job"
    sets = [f"model.path={tiny_checkpoint}", "train.steps=2", "erase.window_len=4", "erase.loss_threshold=0",
            "trainable.first_k_layers=2"]
    assert main(["erase-many", "--concepts", str(concepts), "--out", str(out), *[a for s in sets
                                                                               for a in ("--set", s)]]) == 0
    printed = capsys.readouterr().out
    assert "[pairs 2/2] van gogh: 2 pairs (file " in printed and "kept 2 of 2 (off)" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == {"church": 2, "van gogh": 2} and not report["world"]
    assert "no eval suite" in report["eval_skipped"] and report["erasure"] == {}
    assert "Eval: no eval suite" in (out / "report.md").read_text()
    pairs = [json.loads(line) for line in (out / "filter" / "van-gogh.jsonl").read_text().splitlines()]
    assert {p["concept"] for p in pairs} == {"van gogh"}  # each pair carries its concept
    JanusForConditionalGeneration.from_pretrained(out / "merged")  # the merged model loads with plain transformers


# --------------------------------------------------------------------------- the job on the world


def _erase_many(concepts: Path, out: Path, model, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ear_dist", "erase-many", "--concepts", str(concepts), "--out", str(out),
           "--set", f"model.path={model}", "--set", "train.steps=2", "--set", "eval.world_prompts=4", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_a_world_concept_word_outside_the_training_split_is_refused(default_world_model, tmp_path, capsys):
    _, model, _ = default_world_model
    concepts = _write(tmp_path / "c.yaml", "concepts:\n  - name: church\n    words: [church, chapel]\n")
    code = main(["erase-many", "--concepts", str(concepts), "--out", str(tmp_path / "job"),
                 "--set", f"model.path={model}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "concepts[0] (church): field 'words': 'chapel' is a heldout word of the world" in err
    concepts = _write(tmp_path / "c.yaml", "concepts:\n  - name: church\n  - name: pagoda\n")
    assert main(["erase-many", "--concepts", str(concepts), "--out", str(tmp_path / "job"),
                 "--set", f"model.path={model}"]) == 2
    assert "concepts[1] (pagoda): field 'name': not a concept of the world" in capsys.readouterr().err


@pytest.mark.slow
def test_joint_route_on_the_world_reports_every_concept_and_a_rerun_resumes(default_world_model, tmp_path):
    from ear_dist.many.job import world_of
    from ear_dist.models.delta import delta_metadata
    from ear_dist.world.concepts import world_concepts

    _, model, _ = default_world_model
    concepts = _write(tmp_path / "c.yaml", "route: joint\npairs_per_concept: 8\nconcepts:\n  - name: church\n"
                                           "  - name: van gogh\n  - name: barn\n")
    out = tmp_path / "job"
    first = _erase_many(concepts, out, model)
    report = json.loads((out / "report.json").read_text())
    names = ["church", "van gogh", "barn"]
    assert report["concepts"] == names and report["route"] == "joint"
    # one run on every concept's pairs, train.steps per concept
    assert report["steps"] == {"joint": 6}
    summary = json.loads((out / "train.json").read_text())
    assert set(delta_metadata(summary["delta"])["concepts"]) == set(names)  # each pair carried its concept
    for c in names:
        row = report["erasure"][c]
        assert 0.0 <= row["erasure_rate"] <= 1.0 and row["worst_group"]
    # church's held-out words are its synonyms, each its own group
    assert {g for g in report["erasure"]["church"]["heldout_words"]} == {"held-out sentences (chapel)",
                                                                        "held-out sentences (cathedral)"}
    worst = report["worst_erased"]
    assert worst["erasure"] == min(r["worst_group_erasure"] for r in report["erasure"].values())
    assert worst["concept"] in names
    # preservation on every world concept not erased, never on an erased one
    kept = set(report["preservation"]["hit_rates"])
    assert kept == set(world_concepts(world_of(str(model), "janus"))) - set(names)
    p = report["preservation"]
    ratios = [r for r in p["ratios"].values()]
    assert p["mean"] == pytest.approx(sum(ratios) / len(ratios)) and p["worst"] == min(ratios)
    for stage in ("pairs", "filter", "train", "eval"):
        assert report["stages"][stage]["seconds"] > 0 and not report["stages"][stage]["skipped_this_run"]
    md = (out / "report.md").read_text()
    assert f"Worst erased concept: **{worst['concept']}**" in md and "Preservation ratio" in md
    assert "[train joint]: 6 steps" in first.stdout

    # a rerun does nothing but the report
    delta_bytes = Path(summary["delta"]).read_bytes()
    again = _erase_many(concepts, out, model)
    assert again.stdout.count("done before, skipped") == 3 + 3 + 1 + 1
    assert Path(summary["delta"]).read_bytes() == delta_bytes
    assert json.loads((out / "report.json").read_text())["erasure"] == report["erasure"]
    # a crash during eval: the next run evaluates again, nothing before it
    (out / "eval.json").unlink()
    third = _erase_many(concepts, out, model)
    assert "[train joint]: done before" in third.stdout and "[eval all]: 3 suites" in third.stdout
    assert "base: 0 images generated" in third.stdout  # its images were on disk already

    # another concepts file into the same directory is refused (the output-path rule)
    other = _write(tmp_path / "d.yaml", "concepts: [church]\n")
    res = subprocess.run([sys.executable, "-m", "ear_dist", "erase-many", "--concepts", str(other), "--out", str(out),
                          "--set", f"model.path={model}"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert res.returncode == 2 and "pass --overwrite" in res.stderr


@pytest.mark.slow
def test_array_route_on_the_world_merges_the_task_deltas_and_reports_the_kept_concepts(default_world_model,
                                                                                       tmp_path):
    from safetensors.torch import load_file

    from ear_dist.models.delta import load_delta
    from ear_dist.models.family import load_model

    _, model, _ = default_world_model
    concepts = _write(tmp_path / "c.yaml", "route: array\npairs_per_concept: 8\ncompose: sum\nconcepts:\n"
                                           "  - name: church\n  - name: van gogh\nkeep: [castle, barn, monet]\n")
    out = tmp_path / "job"
    # what the Slurm array tasks run, then the merge/eval step
    for task, name in enumerate(["church", "van gogh"]):
        res = _erase_many(concepts, out, model, "--array-task", str(task))
        assert f"array task {task} ({name}) done" in res.stdout and "[merge" not in res.stdout
    last = _erase_many(concepts, out, model)
    assert last.stdout.count("done before, skipped") == 6 and "[merge all]: 2 deltas composed (sum)" in last.stdout

    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == {"church": 2, "van gogh": 2} and report["compose"] == "sum"
    assert set(report["erasure"]) == {"church", "van gogh"}
    assert set(report["preservation"]["hit_rates"]) == {"castle", "barn", "monet"}
    # the merged model is base + the sum of the task deltas' changes, and what eval applied is the merged model
    base = dict(load_model(str(model), "janus", device="cpu", dtype="float32").model.named_parameters())
    church, _ = load_delta(out / "train" / "church" / "delta.safetensors")
    van_gogh, _ = load_delta(out / "train" / "van-gogh" / "delta.safetensors")
    composed = load_file(out / "merge" / "delta.safetensors")
    assert set(composed) == set(church) | set(van_gogh)
    for name, value in composed.items():
        expected = base[name].detach() + sum(d[name] - base[name].detach() for d in (church, van_gogh) if name in d)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    merged = load_model(str(out / "merged"), "janus", device="cpu", dtype="float32").model
    assert torch.equal(dict(merged.named_parameters())[next(iter(composed))].detach(), composed[next(iter(composed))])


# --------------------------------------------------------------------------- two ranks


JOINT_PAIRS = [
    {"target": "a photo of a church", "surrogate": "a photo of a barn", "concept": "church"},
    {"target": "a painting in the style of van gogh", "surrogate": "a painting", "concept": "van gogh"},
    {"target": "a church at night", "surrogate": "a castle at night", "concept": "church"},
    {"target": "a field in the style of van gogh", "surrogate": "a field", "concept": "van gogh"},
]


@pytest.mark.slow
@pytest.mark.dist
def test_a_joint_multi_concept_run_on_two_ranks_gives_the_one_process_delta(tmp_path, tiny_checkpoint):
    """The joint route's training (pairs of several concepts, per-concept windows) on 2 gloo ranks under ZeRO-2."""
    from safetensors.torch import load_file

    from ear_dist.config import load_config
    from ear_dist.train.trainer import run_erase
    from tests.test_distributed import _free_port

    pairs = _write(tmp_path / "joint.jsonl", "".join(json.dumps(p) + "\n" for p in JOINT_PAIRS))
    sets = [f"model.path={tiny_checkpoint}", f"data.pairs={pairs}", "train.steps=3", "train.pairs_per_step=2",
            "erase.window_len=4", "erase.concepts={van gogh: {window_len: 2}}", "optim.lr=1e-2",
            "erase.loss_threshold=0", "trainable.first_k_layers=2", "erase.update_mode=sequence"]
    one = run_erase(load_config(overrides=[*sets, f"train.out_dir={tmp_path / 'one'}"]), progress=False)["delta"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "ear_dist", "erase", "--no-progress"]
    for s in [*sets, f"train.out_dir={tmp_path / 'two'}", "dist.deepspeed_config=ds_configs/zero2.json"]:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    res = subprocess.run(cmd, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = load_file(one), load_file(tmp_path / "two" / "delta.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    metrics = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert any("van gogh" in json.dumps(m) for m in metrics) and any("church" in json.dumps(m) for m in metrics)


# --------------------------------------------------------------------------- on a real Slurm cluster


@pytest.mark.slow
@pytest.mark.dist
def test_the_many_concept_job_runs_as_an_array_and_a_dependent_merge_eval_job(slurm_cluster, tmp_path,
                                                                              tiny_checkpoint):
    _pairs(tmp_path)
    _write(tmp_path / "van_gogh.csv", "unsafe_prompt,safe_prompt\na Van Gogh painting of a field,a painting of a "
                                      "field\na Van Gogh style cafe,a cafe\n")
    concepts = _write(tmp_path / "c.yaml", "route: array\nconcepts:\n  - name: church\n    pairs: church_pairs.json\n"
                                           "  - name: van gogh\n    pairs: van_gogh.csv\n")
    job = _write(tmp_path / "job.yaml", json.dumps({
        "model": {"path": str(tiny_checkpoint)}, "train": {"steps": 2, "out_dir": "runs", "tensorboard": False},
        "erase": {"window_len": 4, "loss_threshold": 0}, "trainable": {"first_k_layers": 2},
        "slurm": {"cpus_per_task": 1, "launcher": "srun", "job_name": "many"}}))
    env = {**slurm_cluster.env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "ear_dist", "submit", "--template", "erase_many", "--concepts",
                          str(concepts), "--config", str(job)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    array_id, finish_id = res.stdout.split()
    records = slurm_cluster.wait_job(array_id, timeout_s=240)
    [final] = slurm_cluster.wait_job(finish_id, timeout_s=240)
    slurm = tmp_path / "runs" / "slurm"
    logs = {r["ArrayTaskId"]: (slurm / f"many-{array_id}_{r['ArrayTaskId']}.out").read_text() for r in records}
    finish_log = (slurm / f"many-{finish_id}.out").read_text()
    assert all(r["JobState"] == "COMPLETED" for r in records), logs
    assert final["JobState"] == "COMPLETED", finish_log
    assert all(final["StartTime"] >= r["EndTime"] for r in records)  # afterok: it waited for every task
    assert "array task 0 (church) done" in logs["0"] and "array task 1 (van gogh) done" in logs["1"]
    # the second job found every task's stages complete: it merged and reported, nothing else
    assert finish_log.count("done before, skipped") == 6 and "[merge all]: 2 deltas composed" in finish_log
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert report["steps"] == {"church": 2, "van gogh": 2} and report["route"] == "array"
    assert (tmp_path / "runs" / "merged" / "config.json").is_file()


@pytest.mark.slow
def test_a_job_stopped_during_training_resumes_from_its_checkpoint(tmp_path, tiny_checkpoint):
    """Preemption (SIGUSR1/SIGTERM) mid-training: the run checkpoints and the job stops; the same job again trains
    the remaining steps only and goes on to the report."""
    from ear_dist.config import load_config
    from ear_dist.many.job import ManyConceptJob, Stopped, Target
    from ear_dist.many.spec import load_spec

    _pairs(tmp_path)
    spec = load_spec(_write(tmp_path / "c.yaml", "concepts:\n  - name: church\n    pairs: church_pairs.json\n"))
    cfg = load_config(overrides=[f"model.path={tiny_checkpoint}", "train.steps=3", "erase.window_len=4",
                                 "erase.loss_threshold=0", "trainable.first_k_layers=2", "train.checkpoint_every=1"])
    lines = []
    asked = iter([False, True])  # the stop is asked for at the second poll: after two steps
    job = ManyConceptJob(spec, cfg, Target(str(tiny_checkpoint), "janus"), tmp_path / "job", log=lines.append,
                         should_stop=lambda: next(asked, True))
    with pytest.raises(Stopped, match="training joint stopped after step"):
        job.run()
    assert not (tmp_path / "job" / "train.json").exists()
    metrics = tmp_path / "job" / "train" / "joint" / "metrics.jsonl"
    assert [json.loads(m)["step"] for m in metrics.read_text().splitlines()] == [0, 1]
    again = ManyConceptJob(spec, cfg, Target(str(tiny_checkpoint), "janus"), tmp_path / "job", log=lines.append)
    again.run()
    summary = json.loads((tmp_path / "job" / "train.json").read_text())
    assert summary["steps"] == 3
    run = json.loads((tmp_path / "job" / "train" / "joint" / "summary.json").read_text())
    assert run["resumed_from"] == 2  # the checkpoint after the stop, not step 0
    assert [json.loads(m)["step"] for m in metrics.read_text().splitlines()] == [0, 1, 2]  # resumed: every step trained exactly once
    assert (tmp_path / "job" / "report.md").is_file()
