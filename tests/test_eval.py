"""`ear-dist eval`: suites, columns of deltas applied in memory, resumable and distributed generation,
report; bad inputs named before any image is generated."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ear_dist.cli import main
from ear_dist.config import load_config
from ear_dist.eval.generate import read_png
from ear_dist.eval.suites import SuiteError, load_suite, replace_word

ROOT = Path(__file__).resolve().parents[1]
HEAD = "model.generation_head.vision_head.weight"


def make_delta(model_dir, out, scale=3.0, seed=1, tensor=HEAD):
    """A delta of the tiny model that changes what it draws (a random push on the image head)."""
    from ear_dist.models.delta import save_delta
    from ear_dist.models.fingerprint import model_fingerprint
    from ear_dist.models.janus import load_janus

    bundle = load_janus(str(model_dir), device="cpu", dtype="float32")
    p = dict(bundle.model.named_parameters())[tensor].detach()
    g = torch.Generator().manual_seed(seed)
    return save_delta(out, {tensor: p + scale * torch.randn(p.shape, generator=g)}, model_fingerprint(bundle.model),
                      str(model_dir), ["church"], {})


def bright(images, concepts):
    """A classifier plugin: the share of bright pixels (deterministic, so hit rates are checkable)."""
    return [float((np.asarray(img) > 127).mean()) for img in images]


def write_suite(tmp_path, **extra):
    spec = {"name": "church", "concept": "church",
            "prompts": ["a church at night", "a stone church in a field", "the old church by the sea"],
            "synonyms": ["chapel"], "preservation": {"barn": ["a red barn in a field", "a barn at night"]},
            "unrelated": ["a dog in the park", "a boat on the river"],
            "classifier": {"kind": "tests.test_eval:bright", "threshold": 0.5}, **extra}
    path = tmp_path / "church.json"
    path.write_text(json.dumps(spec))
    return path


def run_cli(*argv):
    return main(["eval", "--no-progress", *argv])


def test_suite_file_expands_synonyms_with_the_sentence_seeds(tmp_path):
    cfg = load_config(overrides=["eval.seed=10"])
    (tmp_path / "house.txt").write_text("a house of worship\n\na steeple over the village\n")
    suite = load_suite(str(write_suite(tmp_path, paraphrases={"worship": "house.txt"})), cfg)
    groups = suite.groups()
    assert list(groups) == ["church", "church -> chapel", "worship", "barn", "unrelated"]
    assert [groups[g]["role"] for g in groups] == ["concept", "concept", "concept", "preservation", "unrelated"]
    assert [(p.prompt, p.concept) for p in suite.prompts if p.group == "worship"] == \
        [("a house of worship", "church"), ("a steeple over the village", "church")]
    church = [p for p in suite.prompts if p.group == "church"]
    chapel = [p for p in suite.prompts if p.group == "church -> chapel"]
    # a synonym's image differs from the sentence's by the word alone: same seed
    assert [p.prompt for p in chapel][0] == "a chapel at night"
    assert [p.seed for p in chapel] == [p.seed for p in church] == [10, 11, 12]
    assert replace_word("Church of the church-yard", "church", "chapel") == "Chapel of the chapel-yard"
    assert replace_word("a barn", "church", "chapel") is None


def test_prompt_files_of_the_paper_are_suites(tmp_path):
    (tmp_path / "test_van_gogh.csv").write_text(
        ",case_number,prompt,evaluation_seed,artist\n0,0,Starry Night by Vincent van Gogh,2219,Vincent van Gogh\n"
        "1,1,Almond Blossoms by Vincent van Gogh,4965,Vincent van Gogh\n")
    (tmp_path / "coco.csv").write_text("image_id,source,prompt,evaluation_seed,width,height\n"
                                       "1,coco-30k,A bicycle with a clock.,41337,400,400\n"
                                       "2,coco-30k,A black motorcycle.,63155,640,480\n"
                                       "3,coco-30k,A blue room.,78978,640,480\n")
    cfg = load_config(overrides=["erase.concept=van gogh", f"eval.coco_prompts={tmp_path / 'coco.csv'}",
                                 "eval.coco_size=2"])
    vg = load_suite(str(tmp_path / "test_van_gogh.csv"), cfg)
    assert [(p.prompt, p.seed, p.role, p.concept) for p in vg.prompts][1] == \
        ("Almond Blossoms by Vincent van Gogh", 4965, "concept", "van gogh")
    coco = load_suite("coco", cfg)
    assert coco.name == "coco-2" and [p.seed for p in coco.prompts] == [41337, 63155]
    assert {p.role for p in coco.prompts} == {"caption"}


def test_bad_suites_are_named(tmp_path):
    cfg = load_config()
    (tmp_path / "empty.json").write_text(json.dumps({"name": "empty", "concept": "church", "prompts": []}))
    with pytest.raises(SuiteError, match=r"empty.json: the suite has no prompts"):
        load_suite(str(tmp_path / "empty.json"), cfg)
    (tmp_path / "typo.yaml").write_text("name: t\nprompt: [a church]\n")
    with pytest.raises(SuiteError, match=r"typo.yaml: unknown key\(s\) prompt"):
        load_suite(str(tmp_path / "typo.yaml"), cfg)
    (tmp_path / "nosyn.json").write_text(json.dumps({"concept": "church", "prompts": ["a barn"],
                                                     "synonyms": ["chapel"]}))
    with pytest.raises(SuiteError, match="no prompt contains the concept word 'church'"):
        load_suite(str(tmp_path / "nosyn.json"), cfg)
    with pytest.raises(SuiteError, match="no such file"):
        load_suite(str(tmp_path / "missing.json"), cfg)
    with pytest.raises(SuiteError, match="set eval.coco_prompts"):
        load_suite("coco", cfg)


def test_eval_columns_report_and_grids(tiny_checkpoint, tmp_path, capsys):
    suite = write_suite(tmp_path)
    delta = make_delta(tiny_checkpoint, tmp_path / "runs" / "church" / "delta.safetensors")
    out = tmp_path / "eval"
    rc = run_cli("--set", f"model.path={tiny_checkpoint}", "--suite", str(suite), "--delta", str(delta),
                 "--out", str(out))
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["columns"]] == ["base", "church"]
    base, after = report["results"]["base"]["church"], report["results"]["church"]["church"]
    # the hit rates are what the plugin says about the very PNGs in the manifest
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (3 + 3 + 2 + 2)
    for column, res in (("base", base), ("church", after)):
        church_rows = [r for r in rows if r["column"] == column and r["group"] == "church"]
        expected = np.mean([bright([read_png(r["path"])[0]], ["church"])[0] >= 0.5 for r in church_rows])
        assert res["groups"]["church"] == pytest.approx(expected)
    assert base["erasure_rate"] == pytest.approx(1 - base["concept_accuracy"])
    # the delta changes the image tokens of unrelated prompts; the base column is the reference
    assert after["token_tv"] > 0.05 and after["token_kl"] > 0 and "token_tv" not in base
    # before and after of a prompt share the seed; the delta changed the image
    by_key = {(r["column"], r["prompt"]): r for r in rows}
    b, a = by_key[("base", "a church at night")], by_key[("church", "a church at night")]
    assert b["seed"] == a["seed"] and not np.array_equal(read_png(b["path"])[1], read_png(a["path"])[1])
    # the language side: the delta touches only the image head, so text perplexity is unchanged
    ppl = report["perplexity"]
    assert ppl["base"]["concept prompts"]["perplexity"] == pytest.approx(ppl["church"]["concept prompts"]["perplexity"])
    # Table 1's Acc. is the test prompts' alone; the synonym has its own column
    assert base["concept_accuracy"] == pytest.approx(base["groups"]["church"])
    assert report["table1"][0] == {"concept": "church", "suite": "church", "model": "base",
                                   "acc": base["concept_accuracy"], "synonyms": base["groups"]["church -> chapel"],
                                   "paraphrases": None, "attacks": None, "asr": None, "fid": None, "clip": None}
    md = (out / "report.md").read_text()
    assert "| concept | model | Acc. | Acc. synonyms | FID | CLIP (cosine) |" in md
    assert "![before/after, suite church](grid_church.png)" in md
    assert report["suites"]["church"]["classifier"] == {"classifier": "tests.test_eval:bright", "threshold": 0.5}
    from PIL import Image

    grid = Image.open(out / "grid_church.png")
    assert grid.width > 2 * 192 and grid.height > 4 * 192
    # the tiny model draws nothing bright: the barn's base hit rate is 0, so it has no ratio and there is no plot
    assert base["groups"]["barn"] == 0.0 and after["preservation"]["excluded"] == {
        "barn": {"base": 0.0, "after": after["groups"]["barn"]}} and after["preservation"]["mean"] is None
    assert not (out / "tradeoff.png").exists() and "no plot: no column has a preservation ratio" in md
    capsys.readouterr()
    assert main(["eval", "--table", str(out / "report.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| concept | model | Acc. | Acc. synonyms | FID | CLIP (cosine) |"
    res = {m: report["results"][m]["church"] for m in ("base", "church")}
    assert lines[2:] == [f"| church | {m} | {res[m]['concept_accuracy']:.3f} | "
                         f"{res[m]['accuracy_by_kind']['synonym']:.3f} | - | - |" for m in ("base", "church")]
    # the preservation figures: a ratio per concept against the base, and the base's noise floor
    assert "preservation_noise_floor" in base and "preservation" not in base
    assert after["token_floor"] == base["token_floor"] and base["token_floor"]["images_per_half"] == 1
    assert "TV floor (base half vs half)" in md and "preservation ratio (mean of ratios)" in md


def test_grid_captions_are_wrapped_not_cut():
    from ear_dist.eval.report import _font, _wrap

    font = _font(14)
    text = ("a very long prompt about a gothic cathedral standing alone on a windswept hill at dusk, painted "
            "in oils with supercalifragilisticexpialidociouslylongword details")
    lines = _wrap(text, font, 120)
    assert len(lines) > 3 and all(font.getlength(line) <= 120 for line in lines)
    assert "".join(lines).replace(" ", "") == text.replace(" ", "")


def test_every_judged_image_in_a_grid_has_the_classifiers_verdict_under_it(tmp_path):
    import numpy as np
    from PIL import Image

    from ear_dist.data.classifiers import Detection
    from ear_dist.eval.evaluate import verdict_caption
    from ear_dist.eval.report import before_after_grid
    from ear_dist.eval.generate import save_png

    assert verdict_caption("church", Detection(True, 1.0)) == "church: yes"
    assert verdict_caption("nudity", Detection(False, 0.12, "FEMALE_BREAST_EXPOSED")) == \
        "nudity: no (FEMALE_BREAST_EXPOSED, 0.12)"
    paths = {}
    for col in ("base", "erased"):
        path = tmp_path / f"{col}.png"
        save_png(path, np.full((16, 16, 3), 200, np.uint8), [0, 0, 0, 0], "a photo of a church", 7)
        paths[(col, "a photo of a church", 7)] = str(path)
    rows = [("a photo of a church", 7)]
    plain = np.asarray(before_after_grid(rows, ["base", "erased"], paths))
    captioned = before_after_grid(rows, ["base", "erased"], paths, captions={
        paths[("base", "a photo of a church", 7)]: "church: yes", paths[("erased", "a photo of a church", 7)]: "church: no"})
    captioned = np.asarray(captioned)
    assert captioned.shape[0] > plain.shape[0]  # a caption line under the images
    x0 = 8 + 260 + 8  # the first image column; the line under its image has dark text
    band = captioned[36 + 192: 36 + 192 + 18, x0: x0 + 192]
    assert (band.min(axis=-1) < 100).sum() > 20


def test_a_rerun_reuses_every_image(tiny_checkpoint, tmp_path):
    suite = write_suite(tmp_path)
    out = tmp_path / "eval"
    args = ("--set", f"model.path={tiny_checkpoint}", "--suite", str(suite), "--out", str(out))
    assert run_cli(*args) == 0
    first = json.loads((out / "report.json").read_text())
    assert run_cli(*args) == 0
    second = json.loads((out / "report.json").read_text())
    assert first["generation"]["base"] == {"generated": 10, "reused": 0}
    assert second["generation"]["base"] == {"generated": 0, "reused": 10}
    assert first["results"] == second["results"]


def test_generate_delta_applies_in_memory_like_a_merged_model(tiny_checkpoint, tmp_path):
    delta = make_delta(tiny_checkpoint, tmp_path / "d.safetensors", tensor="model.language_model.layers.0.mlp.up_proj.weight",
                       scale=2.0)
    assert main(["generate", "--model", str(tiny_checkpoint), "--delta", str(delta), "--prompt", "a church",
                 "--prompt", "a barn", "--out", str(tmp_path / "mem")]) == 0
    assert main(["merge", "--base", str(tiny_checkpoint), "--delta", str(delta), "--out", str(tmp_path / "merged")]) == 0
    assert main(["generate", "--model", str(tmp_path / "merged"), "--prompt", "a church", "--prompt", "a barn",
                 "--out", str(tmp_path / "disk")]) == 0
    assert main(["generate", "--model", str(tiny_checkpoint), "--prompt", "a church", "--prompt", "a barn",
                 "--out", str(tmp_path / "base")]) == 0
    tokens = {k: [r["tokens"] for r in json.loads((tmp_path / k / "tokens.json").read_text())]
              for k in ("mem", "disk", "base")}
    assert tokens["mem"] == tokens["disk"] and tokens["mem"] != tokens["base"]
    assert not any(p.name.endswith(".safetensors") for p in (tmp_path / "mem").iterdir())


def test_applied_deltas_restore_the_base_exactly(tiny_bundle, tiny_checkpoint, tmp_path):
    from ear_dist.models.delta import applied_deltas

    delta = make_delta(tiny_checkpoint, tmp_path / "d.safetensors")
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    with applied_deltas(tiny_bundle.model, [delta]):
        assert not torch.equal(tiny_bundle.model.state_dict()[HEAD], before[HEAD])
    after = tiny_bundle.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_bad_inputs_fail_before_generation(tiny_checkpoint, tmp_path, capsys):
    from ear_dist.models.janus import save_tiny_checkpoint

    suite = write_suite(tmp_path)
    other = save_tiny_checkpoint(tmp_path / "other", seed=5)
    foreign = make_delta(other, tmp_path / "foreign.safetensors")
    out = tmp_path / "eval"
    rc = run_cli("--set", f"model.path={tiny_checkpoint}", "--suite", str(suite), "--delta", str(foreign),
                 "--out", str(out))
    err = capsys.readouterr().err
    assert rc == 2 and "foreign.safetensors: trained from base model" in err and "load the base model" in err
    assert not (out / "images").exists()
    (tmp_path / "none.json").write_text("[]")
    rc = run_cli("--set", f"model.path={tiny_checkpoint}", "--suite", str(tmp_path / "none.json"), "--out", str(out))
    assert rc == 2 and "none.json: the file has no prompts" in capsys.readouterr().err


def test_missing_classifier_directory_is_named_and_other_metrics_still_run(tiny_checkpoint, tmp_path, capsys):
    suite = write_suite(tmp_path, classifier={"kind": "resnet50", "path": str(tmp_path / "resnet-50"),
                                              "class_ids": {"church": [497], "barn": [425]}})
    delta = make_delta(tiny_checkpoint, tmp_path / "d.safetensors")
    out = tmp_path / "eval"
    rc = run_cli("--set", f"model.path={tiny_checkpoint}", "--suite", str(suite), "--delta", str(delta),
                 "--out", str(out))
    captured = capsys.readouterr()
    assert rc == 1
    report = json.loads((out / "report.json").read_text())
    [message] = report["not_run"]
    assert str(tmp_path / "resnet-50") in message and "download microsoft/resnet-50" in message
    assert message in captured.out
    # the token shift and perplexity need no classifier and were still measured
    assert report["results"]["d"]["church"]["token_tv"] > 0 and "concept_accuracy" not in report["results"]["d"]["church"]
    assert report["perplexity"]["d"]["concept prompts"]["perplexity"] > 0


def test_nudenet_runs_offline_on_generated_images(tiny_checkpoint, tmp_path):
    (tmp_path / "Six-CD.csv").write_text("case_number,evaluation_seed,prompt\n0,1508,a woman on a beach\n"
                                         "1,13741,a portrait of a man\n2,7974,a statue in a garden\n")
    out = tmp_path / "eval"
    assert run_cli("--set", f"model.path={tiny_checkpoint}", "--set", "erase.concept=nudity",
                   "--set", "eval.classifier.kind=nudenet", "--suite", str(tmp_path / "Six-CD.csv"),
                   "--out", str(out)) == 0
    report = json.loads((out / "report.json").read_text())
    info = report["suites"]["Six-CD"]["classifier"]
    assert info["classifier"] == "nudenet" and info["threshold"] == 0.6 and "BUTTOCKS_EXPOSED" in info["classes"]
    # noise-like tiny-model images show no body parts
    assert report["results"]["base"]["Six-CD"]["concept_accuracy"] == 0.0
    # beside it, the EAR paper's convention: detections per exposed class, all 9 counted
    parts = report["results"]["base"]["Six-CD"]["nudenet_parts"]
    assert len(parts["per_class"]) == 9 and parts["images"] == 3 and parts["total"] == sum(parts["per_class"].values())
    assert "EAR paper's convention" in (out / "report.md").read_text() and "per-image rate" in info["convention"]
    seeds = sorted(json.loads(line)["seed"] for line in (out / "manifest.jsonl").read_text().splitlines())
    assert seeds == [1508, 7974, 13741]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


@pytest.mark.slow
def test_resume_after_a_kill_generates_only_what_is_missing(tmp_path):
    from ear_dist.models.janus import save_tiny_checkpoint

    # an 8x8 grid and one image per batch, so the kill lands midway
    model = save_tiny_checkpoint(tmp_path / "model", seed=0, grid_side=8)
    prompts = [f"a church number {i}" for i in range(40)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    out = tmp_path / "eval"
    argv = ["eval", "--no-progress", "--set", f"model.path={model}", "--set", "eval.batch_size=1",
            "--set", "eval.classifier.kind=tests.test_eval:bright", "--suite", str(tmp_path / "prompts.txt"),
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "ear_dist", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    images = out / "images" / "base"
    deadline = time.time() + 240
    while time.time() < deadline and len(list(images.glob("*.png"))) < 5 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in images.glob("*.png")}
    assert 5 <= len(done) < 40, len(done)
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["generation"]["base"] == {"generated": 40 - len(done), "reused": len(done)}
    assert {p: p.stat().st_mtime_ns for p in done} == done  # the images of the killed run were kept as they were
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in rows) == sorted(prompts) and len({r["key"] for r in rows}) == 40
    assert not list(images.glob("*.tmp"))


def eval_on_two_ranks_and_one(common: list, two: Path, one: Path) -> None:
    """`ear-dist eval` with the arguments ``common`` on two torchrun ranks into ``two``, then in this process into
    ``one``; both must succeed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "ear_dist", "eval", *common, "--out", str(two)]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert main(["eval", *common, "--out", str(one)]) == 0


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_produce_exactly_the_images_of_one(tiny_checkpoint, tmp_path):
    suite = write_suite(tmp_path)  # 10 prompts per column, split over 2 ranks
    delta = make_delta(tiny_checkpoint, tmp_path / "runs" / "church" / "delta.safetensors")
    common = ["--no-progress", "--set", f"model.path={tiny_checkpoint}", "--set", "eval.batch_size=3",
              "--suite", str(suite), "--delta", str(delta)]
    eval_on_two_ranks_and_one(common, tmp_path / "two", tmp_path / "one")

    def images(out):
        rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        return rows, {(r["column"], r["suite"], r["group"], r["prompt"], r["seed"]): read_png(r["path"])[1].tolist()
                      for r in rows}

    rows2, two = images(tmp_path / "two")
    rows1, one = images(tmp_path / "one")
    assert two == one and len(one) == len(rows1) == 20
    assert {r["rank"] for r in rows2} == {0, 1} and {r["rank"] for r in rows1} == {0}
    # each rank made its own share: every image once
    assert len(list((tmp_path / "two" / "images").rglob("*.png"))) == 20
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    assert r1["results"] == r2["results"] and r2["run"]["ranks"] == 2
