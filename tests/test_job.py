"""One job builder: what `ear-dist bench` times is the job `ear-dist erase` trains, preserving parts included."""

import json

import pytest

import ear_dist.bench.erase as bench_module
import ear_dist.train.trainer as trainer_module
from ear_dist.config import load_config
from ear_dist.train import job as job_module

PAIRS = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
         {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]


def _recording(monkeypatch, module, jobs):
    def build(*args, **kwargs):
        job = job_module.build_job(*args, **kwargs)
        jobs.append(job)
        return job

    monkeypatch.setattr(module, "build_job", build)


def _parts(job):
    """What a user would see differ if the bench timed another job than the trainer trains."""
    student, keep = job.student, job.keep
    groups = [{k: v for k, v in g.items() if k != "params"} for g in student.updater.optimizer.param_groups]
    return {
        "model": type(job.bundle).__name__, "teacher": type(job.teacher).__name__,
        "teacher settings": job.settings, "step": type(job.step).__name__, "erase": job.step.cfg,
        "updater": type(student.updater).__name__, "optimizer": type(student.updater.optimizer).__name__,
        "optimizer settings": groups, "trainable": job.trainable,
        "parameters that train": sorted(n for n, p in student.module.named_parameters() if p.requires_grad),
        "edits": sorted(student.edited), "projected": sorted(keep.edits.projectors),
        "preservation": type(keep.preservation).__name__, "anchors": keep.anchors,
        "surrogate anchors": keep.surrogate_anchors, "generator seed": job.generator.initial_seed(),
    }


@pytest.mark.parametrize("extra", [
    [],
    ["preserve.nullspace=true", "preserve.weight=1.0", "preserve.surrogates=2", "trainable.modules=all",
     'preserve.prompts=["a photo of a tree", "a dog at night"]'],
], ids=["ear", "preserving"])
def test_the_bench_times_the_job_the_trainer_trains(tmp_path, tiny_checkpoint, monkeypatch, extra):
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    overrides = [f"model.path={tiny_checkpoint}", f"data.pairs={pairs}", "train.steps=1", "erase.window_len=4",
                 "trainable.first_k_layers=2", "train.pairs_per_step=2", "erase.loss_threshold=0",
                 f"train.out_dir={tmp_path / 'run'}", *extra]
    trained, timed = [], []
    _recording(monkeypatch, trainer_module, trained)
    _recording(monkeypatch, bench_module, timed)
    trainer_module.run_erase(load_config(overrides=overrides), progress=False)
    bench_module.run_erasure_bench(load_config(overrides=overrides), steps=1, warmup=0, log_dir=tmp_path / "bench",
                                   echo=lambda *_: None)
    assert len(trained) == len(timed) == 1
    ours, theirs = _parts(trained[0]), _parts(timed[0])
    assert ours == theirs
    assert ours["model"] == "JanusModel"  # the family loader, as `ear-dist erase` loads it
    if extra:  # the preserving parts are built for the bench too
        assert ours["preservation"] == "Preservation" and ours["projected"] and ours["surrogate anchors"] == 2
