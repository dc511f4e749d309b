"""The world as an eval suite: `ear-dist eval --suite world` reproduces what `ear-dist demo` prints for
the same build and settings, because the demo evaluates through eval (one code path)."""

import json
import re

import pytest

from ear_dist.cli import main


def _table_rows(text: str) -> dict[str, list[str]]:
    """model -> the cells of its row in the demo's printed markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and re.fullmatch(r"[\d.]+", cells[1] or "x"):
            rows[cells[0]] = cells[1:]
    return rows


def test_world_suite_runs_on_a_small_world_build(tmp_path):
    """Fast: the suite's groups, seeds and classifier on an untrained small world (quality is not the point)."""
    from ear_dist.config import load_config
    from ear_dist.world.suite import world_suite

    cfg = load_config(overrides=["world.calibration_samples=400", "eval.world_prompts=4"])
    suite = world_suite(cfg, "church")
    groups = suite.groups()
    assert list(groups)[:3] == [f"held-out sentences ({w})" for w in ("church", "chapel", "cathedral")]
    assert {g: i["role"] for g, i in groups.items()}["castle"] == "preservation"
    assert groups["unrelated"]["role"] == "unrelated" and all(i["prompts"] == 4 for i in groups.values())
    assert [p.seed for p in suite.prompts[:2]] == [101 * 100000, 101 * 100000 + 1]
    assert "chapel" in suite.prompts[4].prompt
    style = world_suite(cfg, "van gogh")
    assert "monet" in style.groups() and style.classifier_info["classifier"] == "world"
    from ear_dist.eval.suites import SuiteError

    with pytest.raises(SuiteError, match="the world's concepts are"):
        world_suite(cfg, "mosque")


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first to run waits for the session's default world build
def test_eval_world_suite_reproduces_the_demo(default_world_model, tmp_path, capsys):
    cfg, path, _ = default_world_model
    world_sets = ["--set", f"world.cache_dir={cfg.cache_dir}"]
    demo_out = tmp_path / "demo"
    # the default demo: the paper's EAR and the preserving method (null-space EAR) side by side
    assert main(["demo", "--out", str(demo_out), "--pairs", "16", "--eval-prompts", "16",
                 "--set", "train.steps=10", *world_sets]) == 0
    demo_rows = _table_rows(capsys.readouterr().out)
    assert set(demo_rows) == {"before", "EAR", "preserving"}
    preserving = (demo_out / "runs" / "preserving" / "config.yaml").read_text()
    assert "nullspace: true" in preserving and "loss_threshold: 0.0" in preserving
    delta = demo_out / "runs" / "ear" / "delta.safetensors"
    eval_out = tmp_path / "eval"  # a fresh directory: every image is sampled again
    assert main(["eval", "--no-progress", "--suite", "world:church", "--delta", f"EAR={delta}",
                 "--set", f"model.path={path}", "--set", "eval.world_prompts=16", *world_sets,
                 "--out", str(eval_out)]) == 0
    report = json.loads((eval_out / "report.json").read_text())
    assert report["generation"]["EAR"] == {"generated": 160, "reused": 0}
    from ear_dist.world.erasure import evaluation_from_report, markdown_table

    rows = {"before": evaluation_from_report(report, "base", "world-church", "church"),
            "EAR": evaluation_from_report(report, "EAR", "world-church", "church")}
    assert _table_rows(markdown_table(rows)) == {k: demo_rows[k] for k in ("before", "EAR")}
    # the demo's report files: its table, and the eval report and pictures beside them
    assert (demo_out / "results.md").is_file() and (demo_out / "before_after.png").is_file()
    demo_results = json.loads((demo_out / "report.json").read_text())["results"]
    assert set(demo_results) == {"base", "EAR", "preserving"}
    assert {k: demo_results[k] for k in report["results"]} == report["results"]
