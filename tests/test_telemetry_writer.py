"""What a user opens in TensorBoard or reads from metrics.jsonl must be the numbers written,
reduced over ranks, and written once (rank 0)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ear_dist.telemetry.writer import MetricsWriter, read_jsonl


def read_tb_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def test_single_process_tensorboard_and_jsonl_round_trip(tmp_path):
    steps = [
        {"loss": 0.75, "throughput/image_tokens_per_s": 1234.5, "nvml/energy_j": None, "mfu": torch.tensor(0.375)},
        {"loss": 0.5, "throughput/image_tokens_per_s": 2000.0, "nvml/energy_j": None, "mfu": 0.25},
        {"loss": float("nan"), "throughput/image_tokens_per_s": 10.0, "nvml/energy_j": None, "mfu": 0.125},
    ]
    with MetricsWriter(tmp_path, reductions={"throughput/*": "sum"}) as writer:
        assert writer.rank == 0 and writer.world_size == 1
        for step, metrics in enumerate(steps):
            writer.write(step, metrics)

    scalars = read_tb_scalars(tmp_path)
    assert set(scalars) == {"loss", "throughput/image_tokens_per_s", "mfu"}  # None is not written
    assert scalars["throughput/image_tokens_per_s"] == [(0, 1234.5), (1, 2000.0), (2, 10.0)]
    assert scalars["mfu"] == [(0, 0.375), (1, 0.25), (2, 0.125)]
    assert scalars["loss"][:2] == [(0, 0.75), (1, 0.5)]
    assert math.isnan(scalars["loss"][2][1])

    records = list(read_jsonl(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[0]["loss"] == 0.75 and records[1]["throughput/image_tokens_per_s"] == 2000.0
    assert records[0]["mfu"] == 0.375
    assert records[0]["nvml/energy_j"] is None
    assert records[2]["loss"] is None  # NaN becomes null: the file stays strict JSON
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


def test_bad_inputs_name_the_metric(tmp_path):
    with pytest.raises(ValueError, match="'time/x'.*'median'"):
        MetricsWriter(tmp_path, reductions={"time/x": "median"})
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'loss'.*expected a number"):
            writer.write(0, {"loss": "low"})
        with pytest.raises(ValueError, match="'loss'.*scalar"):
            writer.write(0, {"loss": torch.ones(3)})
    assert event_files(tmp_path) == []
    (tmp_path / "broken.jsonl").write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match="broken.jsonl: line 2"):
        list(read_jsonl(tmp_path / "broken.jsonl"))


def test_reduction_lookup_exact_then_pattern_then_default(tmp_path):
    with MetricsWriter(tmp_path, reductions={"time/*": "max", "time/data_wait_ms": "min"}, tensorboard=False) as w:
        assert w.reduction_of("time/step_ms") == "max"
        assert w.reduction_of("time/data_wait_ms") == "min"
        assert w.reduction_of("loss") == "mean"


def _two_rank_worker(rank: int, world_size: int, rdzv_file: str, log_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdzv_file}", rank=rank, world_size=world_size)
    try:
        writer = MetricsWriter(
            log_dir,
            reductions={"tokens_per_s": "sum", "peak_gib": "max", "data_wait_ms": "min"},
        )
        assert writer.rank == rank and writer.world_size == 2
        for step in range(2):
            metrics = {
                "loss": float(rank + 1 + step),  # mean over ranks: 1.5 + step
                "tokens_per_s": 10.0 * (rank + 1),  # sum: 30
                "peak_gib": 4.0 + rank,  # max: 5
                "data_wait_ms": 7.0 - rank,  # min: 6
                "energy_j": 100.0 if rank == 0 else None,  # only rank 0 has NVML: 100
                "only_missing": None,
            }
            reduced = writer.write(step, metrics)
            # every rank gets the reduced figures back
            assert reduced["loss"] == 1.5 + step and reduced["tokens_per_s"] == 30.0
            assert reduced["peak_gib"] == 5.0 and reduced["data_wait_ms"] == 6.0
            assert reduced["energy_j"] == 100.0 and reduced["only_missing"] is None
        if rank == 1:
            assert writer._tb is None and writer._jsonl is None
        # different names on the two ranks: an error on both, not a hang
        try:
            writer.write(2, {"loss": 1.0} if rank == 0 else {"loss_typo": 1.0})
        except ValueError as e:
            assert "different metric names" in str(e)
        else:
            raise AssertionError("mismatched metric names were not detected")
        writer.close()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_gloo_rank0_writes_reduced_values(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    log_dir = tmp_path / "tb"
    mp.spawn(_two_rank_worker, args=(2, str(tmp_path / "rdzv"), str(log_dir)), nprocs=2, join=True)

    # one events file: rank 0's; rank 1 wrote none
    assert len(event_files(log_dir)) == 1
    scalars = read_tb_scalars(log_dir)
    assert scalars["loss"] == [(0, 1.5), (1, 2.5)]
    assert scalars["tokens_per_s"] == [(0, 30.0), (1, 30.0)]
    assert scalars["peak_gib"] == [(0, 5.0), (1, 5.0)]
    assert scalars["data_wait_ms"] == [(0, 6.0), (1, 6.0)]
    assert scalars["energy_j"] == [(0, 100.0), (1, 100.0)]
    assert "only_missing" not in scalars

    records = list(read_jsonl(log_dir / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1]  # written once, not once per rank
    assert records[1]["loss"] == 2.5 and records[0]["only_missing"] is None
