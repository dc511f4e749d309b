"""The student under DeepSpeed ZeRO (stages 1, 2, 3, 3 + CPU offload).

DeepSpeed owns the student's gradients and optimizer state; only the trainable
tensors are given to the optimizer, so frozen layers carry no optimizer state. The
optimizer is the config's torch optimizer passed as DeepSpeed's client optimizer (no
op compilation on CPU). For ZeRO-3 the student is built through transformers'
HfDeepSpeedConfig so that ``from_pretrained`` partitions it as it loads (a model that is
not a transformers class is built under ``deepspeed.zero.Init`` instead).

``dist.deepspeed_config`` is a JSON file or the name of one shipped in ``ds_configs/``
beside this module (zero1, zero2, zero3, zero3_offload), so an installed package resolves
``zero2`` from any directory. Values ``"auto"`` in such a file are filled from the config
tree (batch size, bf16 by model dtype), the same convention as transformers' Trainer.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from ear_dist.config import Config, ConfigError
from ear_dist.distributed.runtime import Runtime, StudentMPU


def prepare_deepspeed(device: torch.device) -> None:
    """On CPU, skip DeepSpeed's shared-memory all-reduce op: building it takes ~50 s per fresh
    machine and gloo does the same job for the few tensors a student reduces."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    from ear_dist.telemetry.logs import route_library_logs

    route_library_logs()  # DeepSpeed's logger writes to stdout, which carries only a command's result
    if device.type == "cpu":
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False


DS_CONFIG_DIR = Path(__file__).parent / "ds_configs"


def packaged_ds_configs() -> dict[str, Path]:
    """The DeepSpeed configs shipped with ear-dist, by name."""
    return {p.stem: p for p in sorted(DS_CONFIG_DIR.glob("*.json"))}


def resolve_ds_config(value: str) -> Path:
    """``dist.deepspeed_config`` as a file: an existing path, else a packaged config's name (``zero2``)."""
    path = Path(value)
    if path.is_file():
        return path
    packaged = packaged_ds_configs()
    if value.removesuffix(".json") in packaged and path.parent == Path("."):
        return packaged[value.removesuffix(".json")]
    raise ConfigError(f"dist.deepspeed_config: {value!r} is neither a file nor a packaged config "
                      f"({', '.join(packaged)})")


def load_ds_config(cfg: Config, per_rank_pairs: int, dtype: torch.dtype) -> dict:
    """Read ``dist.deepspeed_config`` and fill its "auto" values; errors name the file and key."""
    path = resolve_ds_config(cfg.dist.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    zero = ds.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage is {stage!r}, expected 0-3")
    if "optimizer" in ds:
        raise ConfigError(f"{path}: remove 'optimizer'; the optimizer comes from the optim section of the config")
    ds["train_micro_batch_size_per_gpu"] = per_rank_pairs
    ds.pop("train_batch_size", None)
    gas = ds.get("gradient_accumulation_steps", 1)
    if gas == "auto":
        gas = 1
    if gas != 1 and cfg.erase.update_mode == "window":
        raise ConfigError(f"{path}: gradient_accumulation_steps={gas} with erase.update_mode=window "
                          "(the per-window update steps after every window); use 1")
    ds["gradient_accumulation_steps"] = gas
    for key, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        if key in ds and ds[key].get("enabled") == "auto":
            ds[key]["enabled"] = enabled
    if ds.get("gradient_clipping") == "auto":
        ds["gradient_clipping"] = 0.0
    ds["zero_allow_untested_optimizer"] = True
    if zero.get("offload_optimizer"):
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)
    if cfg.dist.log_comms:
        ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    return ds


def comm_bytes() -> dict[str, int]:
    """Bytes moved per collective kind so far on this rank (from DeepSpeed's comms logger)."""
    import deepspeed.comm as dcomm

    logger = getattr(dcomm, "comms_logger", None)
    if logger is None:
        return {}
    return {op: int(sum(size * rec[0] for size, rec in sizes.items())) for op, sizes in logger.comms_dict.items()}


def comm_seconds() -> float:
    """Seconds this rank has spent inside DeepSpeed's collectives so far (its comms logger times each op,
    synchronising the device around it, so the figure is wall time in communication)."""
    import deepspeed.comm as dcomm

    logger = getattr(dcomm, "comms_logger", None)
    if logger is None:
        return 0.0
    return sum(sum(rec[1]) for sizes in logger.comms_dict.values() for rec in sizes.values()) / 1e3


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedUpdater:
    """The step's updater over a DeepSpeed engine, with agreement across the data-parallel group.

    Every student rank must call backward/step the same number of times (they hold
    collectives), so whether a step happens is decided by all of them together.
    """

    def __init__(self, engine, group=None):
        self.engine = engine
        self.group = group

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def global_any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item() > 0)

    def global_max(self, value: int) -> int:
        t = torch.tensor([float(value)], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")


def load_partitioned_model(model_source: str, base_model: torch.nn.Module, ds: dict) -> torch.nn.Module:
    """A fresh model for ZeRO-3, partitioned across the student ranks as it loads.

    Loaded under HfDeepSpeedConfig from ``model_source`` (a preset is saved to a temp dir
    first: the same seed on every rank gives the same weights), so every tensor, frozen
    ones included, is partitioned.
    """
    from transformers import JanusForConditionalGeneration
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if not hasattr(base_model, "save_pretrained"):
        return _partitioned_copy(base_model, ds)
    src = Path(model_source)
    tmp = None
    if not src.is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="ear-dist-zero3-")
        src = Path(tmp.name)
        base_model.save_pretrained(src, safe_serialization=True)
    dschf = HfDeepSpeedConfig(ds)  # noqa: F841 (must stay alive while the model is built)
    try:
        return JanusForConditionalGeneration.from_pretrained(src, dtype=base_model.dtype, use_safetensors=True)
    finally:
        unset_hf_deepspeed_config()
        if tmp is not None:
            tmp.cleanup()


def _partitioned_copy(base_model: torch.nn.Module, ds: dict) -> torch.nn.Module:
    """A model that is not a transformers class (the VAR family), built partitioned under ``zero.Init`` and
    filled from ``base_model``, which every rank loaded identically."""
    import deepspeed

    # the dtype comes from the config (bf16 / fp16 set by the model's dtype): given with a config,
    # zero.Init on a CPU accelerator builds bfloat16 parameters whatever dtype says
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = type(base_model)(base_model.config)
    built = {p.dtype for p in model.parameters()}
    if built != {base_model.dtype}:
        raise ConfigError(f"ZeRO-3 built the student's parameters in {sorted(map(str, built))} but the model is "
                          f"{base_model.dtype}: the DeepSpeed config's bf16/fp16 sections must match model.dtype")
    source = dict(base_model.named_parameters())
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(source[name].data)
    return model


def initialize_engine(student: torch.nn.Module, optimizer: torch.optim.Optimizer, ds: dict, rt: Runtime):
    """Wrap the student and its (client) optimizer in a DeepSpeed engine over the student ranks."""
    import deepspeed

    if not dist.is_initialized():
        # one process (the one-rank baseline of `ear-dist bench`): DeepSpeed needs a process group all the same
        backend = "nccl" if rt.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's sanity check reads it
    mpu = StudentMPU(rt) if rt.teacher_ranks else None
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds, mpu=mpu,
                                           dist_init_required=False)
    return engine


def gather_full(student: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Full values of ZeRO-3-partitioned parameters on every student rank (a collective), on the CPU."""
    import deepspeed

    params = dict(student.named_parameters())
    chosen = [params[n] for n in names]
    with deepspeed.zero.GatheredParameters(chosen, modifier_rank=None):
        return {n: params[n].detach().to("cpu").clone() for n in names}
