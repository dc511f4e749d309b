"""Checkpoints of an erasure run: what a resume needs, written atomically.

``<train.out_dir>/checkpoint/`` holds the trained tensors (safetensors), the optimizer
state with, for a bfloat16/float16 student, its float32 master weights (one process;
DeepSpeed writes its per-rank partitions under ``<out_dir>/deepspeed/``), the RNG states
and the step. It is written to a temp
directory and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import torch

CKPT = "checkpoint"


def read_state(out_dir: Path) -> Optional[dict]:
    """The state of the checkpoint in ``out_dir`` (its step and extras), or None."""
    f = Path(out_dir) / CKPT / "state.json"
    return json.loads(f.read_text()) if f.is_file() else None


def save_checkpoint(out_dir: Path, step: int, trained: dict, optimizer_state: Optional[dict],
                    generator: torch.Generator, extra: dict, parts: Optional[dict] = None) -> Path:
    """Atomically write trained tensors, optimizer state, step and RNG states."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final = out_dir / CKPT
    tmp = out_dir / (CKPT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trained.items()}, str(tmp / "trainable.safetensors"))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate(), "generator": generator.get_state(),
                "parts": parts or {}}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
    old = out_dir / (CKPT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write(out_dir: Path, rt, student, generator: torch.Generator, step: int, extra: Optional[dict] = None) -> None:
    """Checkpoint the run at ``step`` (every student rank calls it: ZeRO gathers and writes partitions).

    ``extra``: tensors of other stateful parts (e.g. the preservation sampler), saved beside the RNG states.
    """
    trained = student.raw_state()  # collective under ZeRO-3
    if student.engine is not None:  # each rank writes its optimizer partition
        student.engine.save_checkpoint(str(Path(out_dir) / "deepspeed"), tag=f"step{step}")
    if rt.is_main:
        save_checkpoint(out_dir, step, trained, student.updater.state_dict() if student.engine is None else None,
                        generator, {"deepspeed_tag": f"step{step}" if student.engine is not None else None},
                        extra or {})
    if rt.distributed:
        import torch.distributed as dist

        dist.barrier(group=rt.student_group)


def restore(out_dir: Path, student, generator: torch.Generator) -> tuple[int, dict]:
    """Load the checkpoint in ``out_dir`` into the student, its optimizer and the RNGs.

    Returns (its step, the other parts' states saved with ``write(..., extra=...)``).
    """
    from safetensors.torch import load_file

    ckpt = Path(out_dir) / CKPT
    state = json.loads((ckpt / "state.json").read_text())
    if student.engine is not None:
        student.engine.load_checkpoint(str(Path(out_dir) / "deepspeed"), tag=state["deepspeed_tag"])
    else:
        trained = load_file(str(ckpt / "trainable.safetensors"))
        params = dict(student.module.named_parameters())
        with torch.no_grad():
            for n, value in trained.items():  # raw_state: the parameters that train (edits under their names)
                params[n].copy_(value)
        if (ckpt / "optimizer.pt").is_file():  # optimizer state, and the float32 masters of a bf16/fp16 student
            student.updater.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuples(rng["python"]))
    generator.set_state(rng["generator"])
    return int(state["step"]), rng.get("parts", {})


def _as_tuples(value):
    """random.setstate needs the nested tuples that getstate gave (a load may return lists)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value
