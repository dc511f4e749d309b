"""Checkpoints of an erasure run: what a resume needs, written so that a crash never costs the last one.

Layout, one directory per checkpoint::

    <train.out_dir>/checkpoint/step-00000012/
        state.json                     # step, run hash, data position (written last)
        trainable.safetensors          # the trained tensors
        optimizer.safetensors/.json    # optimizer state, with a bf16/fp16 student's float32 masters
                                       # (one process; see below under DeepSpeed)
        rank-00000.safetensors/.json   # each student rank's RNG states and its parts' states
        deepspeed/                     # DeepSpeed's per-rank partitions (ZeRO)

A checkpoint is written into ``step-N.tmp`` and renamed to ``step-N`` when complete;
only then are older ones deleted. So the newest ``step-N`` directory is always whole:
a process killed in the middle of a write leaves the previous checkpoint, which the
next run resumes from, and a ``.tmp`` directory that the next write removes.

No pickle is loaded. What this package writes is safetensors and JSON
(``state_io``). DeepSpeed writes its partitions with ``torch.save`` (pickle); they
are read back through :class:`WeightsOnlyCheckpointEngine`, i.e. ``torch.load`` with
``weights_only=True`` and an allowlist of the few DeepSpeed classes its files hold,
so a tampered partition cannot run code.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ear_dist.errors import InputError, StorageError, storage_error
from ear_dist.storage import fsync_path, save_safetensors, write_text_atomic
from ear_dist.train.state_io import load_tree, save_tree

log = logging.getLogger(__name__)

CKPT = "checkpoint"
STATE = "state.json"
DEEPSPEED = "deepspeed"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message names the directory and the part."""


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / CKPT


def latest(out_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint directory in ``out_dir``, or None."""
    root = checkpoint_root(out_dir)
    if (root / STATE).is_file():
        raise CheckpointError(f"{root}: a checkpoint in the layout of an older ear-dist (no step-N directories); "
                              "start over with train.resume=never or use another train.out_dir")
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE).is_file()]
    return max(steps)[1] if steps else None


def read_state(out_dir: Path) -> Optional[dict]:
    """The ``state.json`` of the newest checkpoint in ``out_dir`` (step, run hash, data position), or None."""
    ckpt = latest(out_dir)
    if ckpt is None:
        return None
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE}: unreadable: {e}") from None


def write(out_dir: Path, rt, student, generator: torch.Generator, step: int, state: Optional[dict] = None,
          parts: Optional[dict] = None) -> Path:
    """Checkpoint the run at ``step``; every student rank calls it (ZeRO gathers and writes partitions).

    ``state``: JSON-safe facts saved in ``state.json`` (run hash, data position).
    ``parts``: this rank's states of other stateful parts (e.g. the preservation sampler).
    """
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a write that was killed before
    _barrier(rt)
    trained = student.raw_state()  # collective under ZeRO-3
    try:
        _write_parts(tmp, rt, student, generator, trained, step, state, parts)
    except StorageError:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint never stays behind
        raise
    if rt.is_main:
        try:
            fsync_path(tmp)
            tmp.rename(final)
            fsync_path(root)
        except OSError as e:
            raise storage_error(tmp, e) from None
        for old in root.iterdir():  # older checkpoints, and .tmp leftovers of killed writes
            if old != final and (_STEP_DIR.match(old.name) or old.name.endswith(".tmp")):
                shutil.rmtree(old, ignore_errors=True)
    _barrier(rt)
    return final


def _write_parts(tmp: Path, rt, student, generator: torch.Generator, trained: dict, step: int,
                 state: Optional[dict], parts: Optional[dict]) -> None:
    """Every rank writes its own files into ``tmp``; then the main rank the shared ones, ``state.json`` last."""
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        if student.engine is not None:  # each rank writes its partition of the optimizer (and ZeRO-3 weights)
            student.engine.save_checkpoint(str(tmp), tag=DEEPSPEED, save_latest=False, exclude_frozen_parameters=True)
    except OSError as e:
        raise storage_error(tmp, e) from None
    save_tree(tmp / f"rank-{rt.dp_rank:05d}", {
        "torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state(),
        "parts": parts or {}})
    _barrier(rt)
    if rt.is_main:
        save_safetensors(tmp / "trainable.safetensors", trained)
        if student.engine is None:  # optimizer state, and the float32 masters of a bf16/fp16 student
            save_tree(tmp / "optimizer", student.updater.state_dict())
        write_text_atomic(tmp / STATE, json.dumps({"step": step, "student_ranks": rt.dp_world, **(state or {})}))


def restore(out_dir: Path, rt, student, generator: torch.Generator) -> tuple[dict, dict]:
    """Load the newest checkpoint into the student, its optimizer and the RNGs.

    Returns (its ``state.json``, this rank's parts' states saved with ``write(..., parts=...)``).
    """
    from safetensors.torch import load_file

    ckpt = latest(out_dir)
    if ckpt is None:
        raise CheckpointError(f"{checkpoint_root(out_dir)}: no complete checkpoint to resume from")
    state = json.loads((ckpt / STATE).read_text())
    if int(state.get("student_ranks", rt.dp_world)) != rt.dp_world and student.engine is not None:
        raise CheckpointError(f"{ckpt}: written by {state['student_ranks']} student ranks, this run has "
                              f"{rt.dp_world}: DeepSpeed's optimizer partitions do not fit; resume with as many ranks")
    if student.engine is not None:
        use_weights_only_loading(student.engine)
        # frozen tensors are left out of the files (they are the base model's): load the rest non-strictly
        student.engine.load_checkpoint(str(ckpt), tag=DEEPSPEED, load_module_strict=False)
    else:
        trained = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(student.module.named_parameters())
        with torch.no_grad():
            for n, value in trained.items():  # raw_state: the parameters that train (edits under their names)
                params[n].copy_(value)
        if student.engine is None:
            student.updater.load_state_dict(load_tree(ckpt / "optimizer"))
    rank_file = ckpt / f"rank-{rt.dp_rank:05d}"
    if not rank_file.with_suffix(".json").is_file():  # resumed with more ranks: start from rank 0's RNGs
        rank_file = ckpt / "rank-00000"
    rng = load_tree(rank_file)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    generator.set_state(rng["generator"])
    return state, rng["parts"]


def _barrier(rt) -> None:
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier(group=rt.student_group)


# --------------------------------------------------------------------------- DeepSpeed's files, read safely


def _deepspeed_safe_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_weights_only_loading(engine) -> None:
    """Make ``engine.load_checkpoint`` read files with ``torch.load(weights_only=True)``."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading without running pickled code."""

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: the file is refused
                    raise CheckpointError(f"{path}: refused to load: {str(e).splitlines()[0]}") from None

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
