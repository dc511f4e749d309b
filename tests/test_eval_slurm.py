"""`ear-dist submit --template eval` on the real two-node Slurm cluster: one rank per node samples its
share of the images, rank 0 writes the report; bad inputs are refused before sbatch."""

import json

import pytest

from tests.test_eval import make_delta, write_suite
from tests.test_slurm_submit import _ear_dist, _submit, _write_config

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_eval_template_splits_the_images_over_two_nodes(slurm_cluster, tmp_path, tiny_checkpoint):
    suite = write_suite(tmp_path)
    make_delta(tiny_checkpoint, tmp_path / "runs" / "church" / "delta.safetensors")
    config = _write_config(tmp_path, {
        "model": {"path": str(tiny_checkpoint)}, "train": {"out_dir": "runs"},
        # relative paths, made absolute at submit time
        "eval": {"suites": [suite.name], "deltas": ["erased=runs/church/delta.safetensors"], "out_dir": "runs/eval"},
        "slurm": {"nodes": 2, "cpus_per_task": 1, "launcher": "srun", "job_name": "eval"}})
    job_id = _submit(slurm_cluster, tmp_path, config, "eval")
    [record] = slurm_cluster.wait_job(job_id, timeout_s=240)
    log = (tmp_path / "runs" / "slurm" / f"eval-{job_id}.out").read_text()
    assert record["JobState"] == "COMPLETED", log
    report = json.loads((tmp_path / "runs" / "eval" / "report.json").read_text())
    assert report["run"]["ranks"] == 2 and [c["name"] for c in report["columns"]] == ["base", "erased"]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "eval" / "manifest.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in rows} == {0, 1} and len({r["key"] for r in rows}) == 20


def test_eval_template_refuses_a_missing_delta_before_sbatch(slurm_cluster, tmp_path, tiny_checkpoint):
    config = _write_config(tmp_path, {
        "model": {"path": str(tiny_checkpoint)},
        "eval": {"suites": ["coco"], "deltas": ["runs/none/delta.safetensors"]}, "slurm": {"job_name": "eval"}})
    result = _ear_dist(slurm_cluster, tmp_path, "submit", "--config", str(config), "--template", "eval", "--dry-run")
    assert result.returncode != 0 and "eval.deltas: " in result.stderr and "does not exist" in result.stderr
