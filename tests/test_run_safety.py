"""A rerun into a train.out_dir resumes only what it should (train.resume), and a delta's metadata always
describes the tensors it holds."""

import json

import pytest
from safetensors.torch import load_file

from ear_dist.cli import main
from ear_dist.config import load_config
from ear_dist.models.delta import load_delta
from ear_dist.train.run_state import RunStateError
from ear_dist.train.trainer import run_erase

CHURCH = [{"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
          {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]
NUDITY = [{"unsafe_prompt": "a nude woman on a beach", "safe_prompt": "a woman on a beach", "concept": "nudity"},
          {"unsafe_prompt": "a nude man in a park", "safe_prompt": "a man in a park", "concept": "nudity"}]


@pytest.fixture()
def files(tmp_path):
    church, nudity = tmp_path / "church.json", tmp_path / "nudity.json"
    church.write_text(json.dumps(CHURCH))
    nudity.write_text(json.dumps(NUDITY))
    return church, nudity


def common(model, out, *extra):
    return [f"model.path={model}", f"train.out_dir={out}", "erase.window_len=4", "trainable.first_k_layers=1",
            "optim.lr=1e-2", "erase.loss_threshold=0", *extra]


def erase_cli(overrides):
    return main(["erase", "--no-progress", *[x for o in overrides for x in ("--set", o)]])


def snapshot(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_a_rerun_with_another_concept_is_refused_naming_what_differs(tmp_path, tiny_checkpoint, files, capsys):
    church, nudity = files
    out = tmp_path / "run"
    assert erase_cli(common(tiny_checkpoint, out, f"data.pairs={church}", "train.steps=2",
                            "train.checkpoint_every=2")) == 0
    before = snapshot(out)
    capsys.readouterr()
    rc = erase_cli(common(tiny_checkpoint, out, f"data.pairs={nudity}", "train.steps=2", "erase.concept=nudity"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"ear-dist: error: {out} holds a run of other settings: data.content")
    assert "erase.concept (\"church\" there, \"nudity\" now)" in err[-1] and "train.resume=never" in err[-1]
    assert snapshot(out) == before  # config.yaml still says church; the delta is untouched
    _, meta = load_delta(out / "delta.safetensors")
    assert meta["concepts"] == ["church"] and meta["config"]["erase"]["concept"] == "church"


def test_a_finished_run_is_reported_and_not_rerun(tmp_path, tiny_checkpoint, files, monkeypatch):
    import ear_dist.train.trainer as trainer

    church, _ = files
    cfg = load_config(overrides=common(tiny_checkpoint, tmp_path / "run", f"data.pairs={church}", "train.steps=2"))
    first = run_erase(cfg, progress=False)
    before = snapshot(tmp_path / "run")

    def no_stream(*args):  # a shard directory would start its readers here
        raise AssertionError("the pair stream was opened for a run that had already finished")

    monkeypatch.setattr(trainer, "open_stream", no_stream)
    again = run_erase(cfg, progress=False)
    assert again["already_finished"] and again["delta"] == first["delta"] and again["steps"] == 2
    assert snapshot(tmp_path / "run") == before  # nothing rewritten: no metrics appended, same delta bytes


def test_a_finished_run_extends_to_more_steps_as_if_uninterrupted(tmp_path, tiny_checkpoint, files):
    church, _ = files
    args = common(tiny_checkpoint, tmp_path / "run", f"data.pairs={church}", "train.checkpoint_every=2")
    run_erase(load_config(overrides=[*args, "train.steps=2"]), progress=False)
    longer = run_erase(load_config(overrides=[*args, "train.steps=4"]), progress=False)
    assert longer["resumed_from"] == 2
    whole = run_erase(load_config(overrides=[*common(tiny_checkpoint, tmp_path / "whole", f"data.pairs={church}"),
                                             "train.steps=4"]), progress=False)
    a, b = load_file(longer["delta"]), load_file(whole["delta"])
    assert all((a[n] == b[n]).all() for n in a)
    _, meta = load_delta(longer["delta"])
    assert meta["extra"]["trained_steps"] == 4 and meta["extra"]["segments"] == []


def test_a_finished_run_without_a_checkpoint_cannot_be_extended(tmp_path, tiny_checkpoint, files):
    church, _ = files
    args = common(tiny_checkpoint, tmp_path / "run", f"data.pairs={church}")
    run_erase(load_config(overrides=[*args, "train.steps=2"]), progress=False)
    with pytest.raises(RunStateError, match="finished at step 2 and kept no checkpoint there"):
        run_erase(load_config(overrides=[*args, "train.steps=3"]), progress=False)


def test_never_starts_over_and_leaves_nothing_of_the_previous_run(tmp_path, tiny_checkpoint, files):
    church, nudity = files
    out = tmp_path / "run"
    run_erase(load_config(overrides=common(tiny_checkpoint, out, f"data.pairs={church}", "train.steps=3",
                                           "train.checkpoint_every=1")), progress=False)
    summary = run_erase(load_config(overrides=common(tiny_checkpoint, out, f"data.pairs={nudity}", "train.steps=2",
                                                     "erase.concept=nudity", "train.resume=never")), progress=False)
    assert summary["resumed_from"] == 0
    _, meta = load_delta(out / "delta.safetensors")
    assert meta["concepts"] == ["nudity"] and meta["config"]["erase"]["concept"] == "nudity"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / "checkpoint").exists() and len(list(out.glob("events.out.tfevents.*"))) == 1


def test_force_resumes_and_the_delta_records_the_other_settings(tmp_path, tiny_checkpoint, files):
    church, _ = files
    out = tmp_path / "run"
    args = common(tiny_checkpoint, out, f"data.pairs={church}", "train.steps=4", "train.checkpoint_every=2")
    stop = {"n": 0}

    def after_two():
        stop["n"] += 1
        return stop["n"] == 2

    assert run_erase(load_config(overrides=args), progress=False, should_stop=after_two)["stopped"]
    with pytest.raises(RunStateError, match=r"optim\.lr \(0\.01 there, 0\.001 now\)"):
        run_erase(load_config(overrides=[*args, "optim.lr=1e-3"]), progress=False)
    summary = run_erase(load_config(overrides=[*args, "optim.lr=1e-3", "train.resume=force"]), progress=False)
    assert summary["resumed_from"] == 2
    _, meta = load_delta(out / "delta.safetensors")
    (segment,) = meta["extra"]["segments"]
    assert segment["to_step"] == 2 and segment["differs"] == {"optim.lr": [0.01, 0.001]}
    assert meta["extra"]["run_hash"] == json.loads((out / "run.json").read_text())["run_hash"]


def test_a_checkpoint_past_the_steps_asked_for_is_refused(tmp_path, tiny_checkpoint, files):
    church, _ = files
    args = common(tiny_checkpoint, tmp_path / "run", f"data.pairs={church}", "train.checkpoint_every=1")
    stop = {"n": 0}

    def after_three():
        stop["n"] += 1
        return stop["n"] == 3

    run_erase(load_config(overrides=[*args, "train.steps=5"]), progress=False, should_stop=after_three)
    with pytest.raises(RunStateError, match="a checkpoint at step 3, past train.steps=2"):
        run_erase(load_config(overrides=[*args, "train.steps=2"]), progress=False)


def test_outputs_without_a_run_record_are_not_overwritten(tmp_path, tiny_checkpoint, files):
    church, _ = files
    out = tmp_path / "run"
    out.mkdir()
    (out / "delta.safetensors").write_bytes(b"someone else's delta")
    with pytest.raises(RunStateError, match="holds delta.safetensors but no run record"):
        run_erase(load_config(overrides=common(tiny_checkpoint, out, f"data.pairs={church}", "train.steps=1")),
                  progress=False)
    assert (out / "delta.safetensors").read_bytes() == b"someone else's delta"


def test_moving_the_data_keeps_the_run_resumable(tmp_path, tiny_checkpoint, files):
    """The data's identity is its content, not its path."""
    church, _ = files
    moved = tmp_path / "elsewhere.json"
    moved.write_bytes(church.read_bytes())
    args = common(tiny_checkpoint, tmp_path / "run", "train.checkpoint_every=1")
    run_erase(load_config(overrides=[*args, f"data.pairs={church}", "train.steps=1"]), progress=False)
    assert run_erase(load_config(overrides=[*args, f"data.pairs={moved}", "train.steps=2"]),
                     progress=False)["resumed_from"] == 1


# ----------------------------------------------------------------------------- one writer per out_dir


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_lock(tmp_path, tiny_checkpoint, files, capsys):
    import os

    from ear_dist.train.run_lock import RunLock

    out = tmp_path / "run"
    args = common(tiny_checkpoint, out, f"data.pairs={files[0]}", "train.steps=1")
    held = RunLock(out).acquire()  # another run, as the kernel sees it: a flock on another open file
    try:
        assert erase_cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err
        assert f"{out} is in use by another run (pid {os.getpid()} on" in err and str(out / ".lock") in err
        assert not (out / "run.json").exists() and not (out / "delta.safetensors").exists()
    finally:
        held.release()
    assert erase_cli(args) == 0  # released: the same command goes through


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, tiny_checkpoint, files, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on gone-node since 2026-12-07 10:00:00 UTC\n")  # nobody holds it
    with caplog.at_level("INFO", logger="ear_dist.train"):
        assert erase_cli(common(tiny_checkpoint, out, f"data.pairs={files[0]}", "train.steps=1")) == 0
    assert "the run that held it (pid 999999 on gone-node" in caplog.text and "is gone; taking it over" in caplog.text
    assert (out / ".lock").read_text() == ""  # released at the end


# ----------------------------------------------------------------------------- non-finite guards


def test_an_update_that_makes_the_weights_non_finite_stops_the_run_with_exit_3(tmp_path, tiny_checkpoint, files,
                                                                               monkeypatch, capsys):
    import torch

    import ear_dist.train.student as student_module

    def overflowing(params, cfg):  # what optim.lr=inf does; set here, past any validation of the setting
        return torch.optim.Adam(params, lr=float("inf"))

    monkeypatch.setattr(student_module, "build_optimizer", overflowing)
    out = tmp_path / "run"
    args = common(tiny_checkpoint, out, f"data.pairs={files[0]}", "train.steps=3", "train.checkpoint_every=1")
    assert erase_cli(args) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ear-dist: error: step 0: the update made the trained weights non-finite (optim.lr=")
    assert "Lower optim.lr" in err
    assert not (out / "delta.safetensors").exists() and not (out / "checkpoint").exists()


def test_a_non_finite_delta_is_never_written():
    import torch

    from ear_dist.train.trainer import NonFiniteError, _check_finite

    cfg = load_config(overrides=["optim.lr=1e-2"])
    _check_finite({"a": torch.ones(3)}, cfg)
    with pytest.raises(NonFiniteError, match=r"not finite in 1 of 2 tensors \(e.g. b\).*optim.lr \(now 0.01\)"):
        _check_finite({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, cfg)
    assert NonFiniteError.exit_code == 3
