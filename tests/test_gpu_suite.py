"""The GPU suite's smoke mode, as CI runs it: every part runs on the CPU, and it needs no package the GPU
machine lacks (deepspeed and webdataset are blocked here, as they are absent there).

What a user would notice if this broke: the one command that measures every GPU goal failing on the
rare day a GPU is at hand, or leaving a JSON and a table that do not say what was measured.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the suite run with the packages the GPU machine does not have made unimportable
RUN_WITHOUT_DEEPSPEED = """
import runpy, sys

for name in ("deepspeed", "webdataset"):  # import fails, find_spec says absent
    sys.modules[name] = None
sys.argv = ["benchmarks/gpu_suite.py"] + sys.argv[1:]
runpy.run_path("benchmarks/gpu_suite.py", run_name="__main__")
"""


@pytest.mark.slow
def test_smoke_suite_runs_every_part_and_writes_what_it_measured(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", RUN_WITHOUT_DEEPSPEED, "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    record = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert record["complete"] and record["mode"] == "smoke"
    assert {name: p["status"] for name, p in record["parts"].items()} == {
        "headline": "done", "many": "done", "eval": "done", "rollout": "done", "step": "done", "mfu": "done",
        "loss": "done", "var": "done", "exact": "done"}
    assert "gpu_suite.py --smoke" in record["command"] and record["versions"]["torch"] and record["commit"]

    rollout = record["parts"]["rollout"]["figures"]
    assert rollout["same_tokens_as_eager: ours, lean (uncaptured)"] is True
    assert rollout["same_tokens_as_eager: transformers generate"] is True
    assert rollout["token_agreement_with_eager: ours, lean (uncaptured)"] == 1.0
    for rate in rollout["image_tokens_per_s"].values():
        assert 0 < rate["min"] <= rate["median"] <= rate["max"] and rate["repeats"] == 2

    step = record["parts"]["step"]["figures"]
    assert set(step["speedups"]) == {"ours (stored rollout)", "ours, window updates (stored rollout)",
                                     "ours, window-cached updates (stored rollout)", "ours (with CFG rollout)"}
    assert all(v["vs_official"]["median"] > 0 for v in step["speedups"].values())

    head = record["parts"]["headline"]["figures"]
    for prefix in ("recompute", "cached"):
        h = head[prefix]
        assert h["repeats"] == 2 and h["total_s"]["repeats"] == 2
        assert h["total_s"]["min"] <= h["total_s"]["median"] <= h["total_s"]["max"]
        assert h["windows_kept"] > 0  # the default threshold keeps windows: the steps trained
        assert h["window_updates"] > 0

    many = record["parts"]["many"]["figures"]  # 3 concepts, 2 steps of one pair of each
    assert many["pairs_per_step"] == 3 and many["steps_measured"] == 2
    m = many["measured"]
    assert m["total_s"] == pytest.approx(m["rollouts_s"] + m["training_s"]) and m["window_updates"] > 0
    assert many["projected_total_s"] == pytest.approx(m["rollouts_s"] / 6 * 150 + m["training_s"] / 2 * 50)
    assert many["projected_s_per_concept"] == pytest.approx(many["projected_total_s"] / 3)

    ev = record["parts"]["eval"]["figures"]  # the planner's batch under the smoke's 0.002 GiB KV budget
    assert 1 < ev["batch"] <= 8 and ev["kv_cache_gib"] <= ev["kv_budget_gib"]
    assert ev["kv_budget_source"] == "eval.kv_cache_gib=0.002 on cpu"
    assert ev["images_per_s"]["repeats"] == 2 and ev["images_per_s"]["median"] > 0
    assert ev["images_per_s_with_vq_decode"]["median"] <= ev["images_per_s"]["max"]
    assert ev["bandwidth_gb_s_measured"] is None and "bound_images_per_s" not in ev  # no bound made up on a CPU

    var = record["parts"]["var"]["figures"]  # the VAR family's step, its tiny preset here
    assert var["preset"] == "tiny-var" and var["supervised_tokens"] == 2 * 85
    assert var["same_objective"]["step_loss"] == pytest.approx(var["same_objective"]["per_scale_loop_loss"],
                                                               rel=1e-4)
    assert set(var["ms_per_call"]) == {"ours (stored rollout)", "ours (with CFG rollout)", "ours, S-VARE (stored)",
                                       "per-scale loop + KV cache"}

    exact = record["parts"]["exact"]["figures"]  # float32: the lean path's tokens are the eager loop's
    assert exact["token_agreement"] == 1.0 and exact["first_differing_token_per_row"] == [None, None]

    mfu = record["parts"]["mfu"]["figures"]
    assert mfu["student_mfu"] is None and mfu["phases_ms"]["student_fwd_bwd"] > 0  # no CPU peak: n/a, not made up
    assert (tmp_path / "bench" / "bench.json").is_file()

    variants = {r["variant"] for r in record["parts"]["loss"]["figures"]["rows"]}
    assert variants == {"eager", "compile", "triton (interpreter; not a speed figure)"}
    for part in record["parts"].values():
        assert part["seconds"] > 0 and part["peak_memory_gib"] > 0 and "unavailable" in part["nvml"]
        assert "allocated_at_end_gib" in part

    table = (tmp_path / "gpu_suite.md").read_text()
    assert "# GPU suite (smoke)" in table and "| headline | done |" in table and "window_prefix=cached" in table
    assert "Many concepts: 3 concepts" in table and "Eval sampling: batch" in table


def test_goal_rows_read_the_figures_they_judge():
    """On a GPU run the table compares each goal with the figure measured for it."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_suite import GOALS, goal_rows, markdown

    def stat(x):
        return {"median": x, "min": x - 1, "max": x + 1, "repeats": 3}

    record = {
        "mode": "full", "date": "d", "machine": "m", "command": "c", "versions": {"torch": "t"}, "seconds": 1.0,
        "complete": True, "scale": {"lean": "cuda_graph"},
        "parts": {
            "step": {"status": "done", "figures": {"speedups": {"ours (stored rollout)": {
                "vs_official": stat(150.0), "vs_kv_loop": stat(4.0)}}}},
            "rollout": {"status": "done", "figures": {"ours, lean (cuda_graph) / generate": stat(3.5), "failed": {}}},
            "headline": {"status": "done", "figures": {"recompute": {"total_s": 75.0, "rollouts_s": 5.0,
                                                                      "training_s": 70.0}}},
            "mfu": {"status": "failed: RuntimeError: x"},
            "many": {"status": "done", "figures": {"concepts": 20, "pairs_per_concept_measured": 3,
                                                   "projected_s_per_concept": 24.0}},
            "eval": {"status": "done", "figures": {"batch": 76, "images_per_s": stat(8.0),
                                                   "bound_images_per_s": 12.5}},
        },
    }
    rows = {r["goal"]: r for r in goal_rows(record)}
    assert rows["step vs the official pattern (stored rollouts)"]["met"] is True
    assert rows["step vs the KV-cached per-token loop"]["met"] is False
    assert rows["rollout tokens/s vs transformers generate"]["value"] == 3.5
    assert rows["erase one concept end to end (exact windows), s"]["met"] is False
    assert rows["student MFU (6N convention)"]["met"] is None  # the part failed: no figure, no verdict
    assert rows["erase one concept end to end (exact windows), s"]["target"] == GOALS["headline_s"]
    many = rows["many concepts: s per concept, 20 concepts' pairs in one joint run"]
    assert many["met"] is True and many["target"] == 30.0 and many["note"] == "projected from 3 of 50 pairs per concept"
    ev = rows["eval images/s per GPU, 576-token CFG samples"]
    assert ev["met"] is False and ev["value"] == 8.0 and "memory-bandwidth bound 12.5 images/s" in ev["note"]
    record["goals"] = list(rows.values())
    del record["parts"]["many"], record["parts"]["eval"]  # their own tables need every figure of a real run
    table = markdown(record)
    assert "| step vs the KV-cached per-token loop | 4.00 (3.00-5.00) | 5 | **no** |" in table


def test_a_run_cut_short_keeps_what_it_measured_and_says_what_did_not_run(tmp_path):
    """A lease ending mid-run (SIGTERM) or the time limit: the JSON holds every finished part's figures, the part
    it stopped in, and why each other part did not run."""
    import signal

    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_suite import FULL, SMOKE, Interrupted, Suite, _interrupt

    suite = Suite(tmp_path, SMOKE, smoke=True, time_limit_s=600)
    suite.record["parts"] = {n: {"status": "not run: the run ended before it"} for n in ("headline", "many", "eval")}
    suite.run("headline", lambda: {"total_s": 1.5})

    def stopped():
        _interrupt(signal.SIGTERM, None)

    with pytest.raises(Interrupted):
        suite.run("many", stopped)
    record = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert record["parts"]["headline"]["figures"] == {"total_s": 1.5} and not record["complete"]
    assert record["parts"]["many"]["status"].startswith("not finished: stopped by signal SIGTERM after ")
    assert record["parts"]["eval"]["status"] == "not run: the run ended before it"
    assert "INCOMPLETE" in (tmp_path / "gpu_suite.md").read_text()

    full = Suite(tmp_path / "full", FULL, smoke=False, time_limit_s=100)  # the headline's ~200 s would not fit
    full.run("headline", lambda: pytest.fail("a part that cannot end within the limit must not start"))
    status = json.loads((tmp_path / "full" / "gpu_suite.json").read_text())["parts"]["headline"]["status"]
    assert status.startswith("skipped: at 0 s, with about 200 s to run, it would end after --time-limit-s 100")


def test_the_eval_bound_at_the_7b_shape_on_an_h100():
    """The memory-bandwidth bound the eval goal is read against, at the figures an H100 run would give: 75 prompts
    (what 70% of the free memory holds), 13.8 GB of decoder weights, 491,520 KV bytes per position and row
    (30 layers x 2 x 32 heads x 128 x 2 bytes), ~3,000 GB/s by a device copy. The weights are read once per step
    for the whole batch, the KV cache per row: about 10.6 images/s if only the filled positions are read, 6.8 if
    the static cache is read whole, against the goal of 10."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_suite import bandwidth_bound

    per_position = 2 * 75 * 491520
    b = bandwidth_bound(75, 576, 13.8e9, per_position * (24 + 288), per_position * (24 + 576), 3000.0)
    assert b["bound_images_per_s"] == pytest.approx(75 / (576 * (13.8e9 + per_position * 312) / 3e12))
    assert 10.0 < b["bound_images_per_s"] < 11.0 and 6.5 < b["bound_images_per_s_static_cache"] < 7.0
