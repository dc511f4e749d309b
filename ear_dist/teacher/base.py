"""What the trainer asks of the frozen teacher M*, and how a placement is chosen.

One erasure step needs from the teacher: image tokens (a CFG rollout from one prompt of
each pair, unless the pair brings stored tokens) and teacher-forced outputs on the
target and surrogate prompts (last hidden states or generation-head logits, optionally
also on the unconditional prompt). Every decision about *what* to compute is made once,
in :class:`TeacherSettings` (from the config) and :class:`TeacherRequest` (settings +
one batch of pairs). The placements (colocated, dedicated ranks, offline shards) decide
only *where* it is computed, so one config trains on the same tokens wherever the
teacher runs.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch

from ear_dist.data.stream import PairBatch


@dataclass(frozen=True)
class TeacherSettings:
    """Everything a run's teacher requests share, decided from the config in one place.

    ``rollout_from``: which prompt of a pair the teacher samples image tokens from.
    ``reference``: what the guided target is anchored on, the surrogate prompt's outputs
    (EAR) or the unconditional prompt's (``unconditional``). ``mode``: ``hidden`` (last
    hidden states) or ``logit`` (generation-head logits); S-VARE always needs logits.
    ``with_uncond``: the teacher also runs the unconditional prompt (logit mode with
    teacher-side guidance). The sampling fields are the CFG rollout's.
    """

    rollout_from: str = "surrogate"
    reference: str = "surrogate"
    mode: str = "hidden"
    with_uncond: bool = False
    target_guidance_weight: float = 0.0
    sampling_guidance_weight: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    greedy: bool = False
    decode: str = "eager"

    @classmethod
    def from_config(cls, erase, rollout) -> "TeacherSettings":
        """The settings of a run from its ``erase`` and ``rollout`` config sections."""
        r = rollout
        mode = "logit" if erase.method == "svare" else erase.target_mode
        with_uncond = erase.method != "svare" and mode == "logit" and erase.teacher_guidance_weight > 0
        reference = "surrogate" if erase.method == "svare" else erase.reference_prompt
        return cls(erase.rollout_from, reference, mode, with_uncond,
                   float(erase.teacher_guidance_weight) if with_uncond else 0.0,
                   float(r.guidance_weight), float(r.temperature), int(r.top_k), bool(r.greedy), r.decode)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TeacherRequest:
    """One batch's teacher work: the prompts, the rollout seeds, and stored tokens if the pairs bring them."""

    settings: TeacherSettings
    target_prompts: list[str]
    surrogate_prompts: list[str]
    seeds: list[int]
    tokens: Optional[torch.Tensor] = None  # [B, T] stored rollouts of the prompts rollouts come from

    @classmethod
    def from_batch(cls, settings: TeacherSettings, batch: PairBatch) -> "TeacherRequest":
        tokens = batch.surrogate_tokens if settings.rollout_from == "surrogate" else batch.target_tokens
        return cls(settings, list(batch.target_prompts), list(batch.surrogate_prompts), list(batch.seeds), tokens)

    @property
    def rollout_prompts(self) -> list[str]:
        """The prompts the teacher samples image tokens from (``settings.rollout_from``)."""
        return self.surrogate_prompts if self.settings.rollout_from == "surrogate" else self.target_prompts

    def __len__(self) -> int:
        return len(self.target_prompts)


@dataclass
class TeacherOutputs:
    """The teacher's answer to one request: tokens [B, T] and raw outputs [B, T, D] (D = hidden or codebook).

    ``on_surrogate`` is the reference output the guidance pushes toward: the surrogate
    prompt's, or the unconditional prompt's when ``settings.reference`` says so.
    """

    tokens: torch.Tensor
    on_target: torch.Tensor
    on_surrogate: torch.Tensor
    uncond: Optional[torch.Tensor] = None  # with_uncond only


class Teacher(ABC):
    """Interface shared by every placement: one request in, tokens and raw outputs out."""

    #: whether the student may share this teacher's frozen tensors (a local, read-only model)
    shares_model: bool = False

    @abstractmethod
    def outputs(self, request: TeacherRequest) -> TeacherOutputs:
        """Tokens (stored or rolled out) and teacher-forced outputs for ``request``."""

    def serve(self, stream, start: int) -> dict:
        """Teacher ranks only (dedicated placement): serve the students until the run ends."""
        raise RuntimeError(f"{type(self).__name__} does not serve other ranks")


# placement name -> module that registers it; imported on demand so that this interface
# module does not depend on its implementations
PLACEMENT_MODULES = {
    "colocated": "ear_dist.teacher.colocated",
    "dedicated": "ear_dist.teacher.dedicated",
    "offline": "ear_dist.teacher.offline",
}
_BUILDERS: dict[str, Callable] = {}


def register_placement(name: str):
    """Decorator: ``builder(cfg, runtime, bundle, settings, steps) -> Teacher`` for a placement."""

    def wrap(builder: Callable) -> Callable:
        _BUILDERS[name] = builder
        return builder

    return wrap


def build_teacher(cfg, runtime, bundle, settings: Optional[TeacherSettings] = None, steps: Optional[int] = None
                  ) -> Teacher:
    """The teacher of this rank for ``dist.teacher_placement``; ``steps`` = steps this run still trains."""
    name = cfg.dist.teacher_placement
    if name not in PLACEMENT_MODULES:
        raise ValueError(f"dist.teacher_placement: {name!r} is not one of {', '.join(PLACEMENT_MODULES)}")
    importlib.import_module(PLACEMENT_MODULES[name])
    settings = settings if settings is not None else TeacherSettings.from_config(cfg.erase, cfg.rollout)
    return _BUILDERS[name](cfg, runtime, bundle, settings, cfg.train.steps if steps is None else steps)
