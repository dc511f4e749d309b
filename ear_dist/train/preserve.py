"""Keeping everything else: preservation anchors and drift probes on the distributions sampling uses.

Erasure damages other concepts through a small shared drift of the student's
next-token distributions that classifier-free guidance at weight 5 amplifies about
tenfold, on the conditional branch and on the unconditional one, which the erasure
loss never watches. So preservation is measured where sampling happens: on prompts of
other concepts (anchors), teacher-forced on the frozen teacher's own rollouts,
``KL(teacher || student)`` of the guided (CFG-combined), unconditional and/or
conditional next-token distributions.

The teacher's side is taken once, at the start, from the base model (every placement
has it then, before the first update), so the term costs one student forward per
step. Anchors are drawn with probability proportional to their last measured drift
(re-measured every ``refresh_every`` steps), so the most damaged get the most weight.
Every rank draws the same global anchor batch and trains on its slice, so one process
and N ranks train the same student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ear_dist.config import ConfigError
from ear_dist.models.family import as_image_model
from ear_dist.models.interface import ImageModel
from ear_dist.train.adapters import EditSpec, nullspace_projectors

BRANCHES = ("guided", "uncond", "cond")


def branch_log_probs(cond: torch.Tensor, uncond: torch.Tensor, guidance_weight: float,
                     branches: Sequence[str], groups: int = 1) -> dict[str, torch.Tensor]:
    """Log-probabilities [N, T, V] (float32) of each named branch from conditional and unconditional logits.

    ``groups`` > 1 (a bitwise head): [N, T, groups, V / groups], one softmax per group.
    """
    out = {}
    for name in branches:
        if name == "guided":
            logits = uncond.float() + guidance_weight * (cond.float() - uncond.float())
        elif name == "uncond":
            logits = uncond.float()
        elif name == "cond":
            logits = cond.float()
        else:
            raise ValueError(f"preserve.branches: {name!r} is not one of {', '.join(BRANCHES)}")
        if groups > 1:
            logits = logits.reshape(*logits.shape[:-1], groups, -1)
        out[name] = torch.log_softmax(logits, dim=-1)
    return out


def kl_per_row(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row [N], mean over tokens, from log-probabilities [N, T, ...] (summed
    over everything after the token dimension: the codes, or a bitwise head's bits and values)."""
    p = teacher.exp()
    return (p * (teacher - student)).flatten(2).sum(-1).mean(-1)


def student_logits(model, bundle: ImageModel, prompts: Sequence[str], tokens: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional and unconditional image logits of ``model`` on ``prompts``, teacher-forced on ``tokens``."""
    bundle = as_image_model(bundle)
    ids, mask = bundle.encode_prompts(list(prompts))
    b = ids.shape[0]
    rows = torch.cat([ids, bundle.unconditional(ids)])
    _, logits = bundle.teacher_forced(model, rows, mask.repeat(2, 1), tokens.repeat(2, 1))
    return logits[:b], logits[b:]


@torch.no_grad()
def anchor_rollouts(bundle: ImageModel, prompts: Sequence[str], guidance_weight: float, seed: int,
                    batch_size: int = 16) -> torch.Tensor:
    """The model's own CFG samples [M, T] of ``prompts``, one seed per prompt (``seed`` names the set)."""
    bundle = as_image_model(bundle)
    return bundle.sample(list(prompts), guidance_weight=guidance_weight,
                         seeds=[seed * 1_000_003 + i for i in range(len(prompts))], batch_size=batch_size)


def teacher_forced_feed(bundle: ImageModel, prompts: Sequence[str], tokens: torch.Tensor, batch_size: int = 16):
    """A ``run()`` for ``adapters.input_second_moments``: the prompts teacher-forced on ``tokens``, at prompt and
    image positions, with their unconditional prompts (every input a trained layer sees while sampling)."""
    def feed() -> None:
        for s in range(0, len(prompts), batch_size):
            student_logits(bundle.model, bundle, prompts[s: s + batch_size], tokens[s: s + batch_size])

    return feed


@dataclass
class AnchorSet:
    """Prompts with the frozen teacher's rollouts and its next-token log-probabilities on them, per branch."""

    prompts: list[str]
    tokens: torch.Tensor  # [M, T]
    teacher: dict[str, torch.Tensor]  # branch -> [M, T, V] float32 log-probs (on the CPU when the model is on CUDA)
    guidance_weight: float
    groups: int = 1  # softmaxes per position (a bitwise head's bits)

    @classmethod
    @torch.no_grad()
    def snapshot(cls, bundle: ImageModel, prompts: Sequence[str], guidance_weight: float, seed: int,
                 branches: Sequence[str], batch_size: int = 16) -> "AnchorSet":
        """Sample each prompt with the teacher (CFG, one seed per prompt) and keep its distributions."""
        bundle = as_image_model(bundle)
        prompts = list(prompts)
        if not prompts:
            raise ValueError("preserve: no anchor prompts")
        tokens = anchor_rollouts(bundle, prompts, guidance_weight, seed, batch_size)
        store = torch.device("cpu") if tokens.device.type == "cuda" else tokens.device
        parts: dict[str, list] = {b: [] for b in branches}
        for s in range(0, len(prompts), batch_size):
            cond, uncond = student_logits(bundle.model, bundle, prompts[s: s + batch_size], tokens[s: s + batch_size])
            for name, lp in branch_log_probs(cond, uncond, guidance_weight, branches, bundle.logit_groups).items():
                parts[name].append(lp.to(store))
        return cls(prompts, tokens, {b: torch.cat(v) for b, v in parts.items()}, guidance_weight, bundle.logit_groups)

    def __len__(self) -> int:
        return len(self.prompts)

    def kl(self, model, bundle: ImageModel, index: Sequence[int]) -> dict[str, torch.Tensor]:
        """Per branch, KL(teacher || model) per anchor of ``index`` [len(index)] (differentiable in the model)."""
        idx = torch.as_tensor(list(index), dtype=torch.long)
        tokens = self.tokens[idx.to(self.tokens.device)]
        cond, uncond = student_logits(model, bundle, [self.prompts[i] for i in idx.tolist()], tokens)
        student = branch_log_probs(cond, uncond, self.guidance_weight, list(self.teacher), self.groups)
        return {name: kl_per_row(self.teacher[name][idx].to(cond.device), student[name]) for name in self.teacher}


class Preservation:
    """The preservation term of the step: drift-weighted anchors, KL on the watched branches."""

    def __init__(self, anchors: AnchorSet, weight: float, per_step: int, drift_power: float, refresh_every: int,
                 seed: int, dp_rank: int = 0, dp_world: int = 1):
        if per_step % dp_world:
            raise ConfigError(f"preserve.per_step: {per_step} is not divisible by the {dp_world} student ranks")
        self.anchors, self.weight, self.per_step = anchors, weight, min(per_step, len(anchors))
        self.drift_power, self.refresh_every = drift_power, refresh_every
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.generator = torch.Generator().manual_seed(seed)
        self.drift = torch.ones(len(anchors))
        self.steps = 0

    def draw(self) -> list[int]:
        """This rank's anchors for the coming step (the same global draw on every rank)."""
        probs = self.drift.clamp(min=1e-12) ** self.drift_power
        chosen = torch.multinomial(probs / probs.sum(), self.per_step, replacement=False, generator=self.generator)
        per_rank = self.per_step // self.dp_world
        return chosen[self.dp_rank * per_rank: (self.dp_rank + 1) * per_rank].tolist()

    def maybe_refresh(self, model, bundle: ImageModel, batch_size: int = 16) -> Optional[torch.Tensor]:
        """Every ``refresh_every`` steps (and first), re-measure every anchor's drift; returns it when measured."""
        due = self.steps % self.refresh_every == 0
        self.steps += 1
        if not due or self.drift_power == 0:
            return None
        with torch.no_grad():
            parts = []
            for s in range(0, len(self.anchors), batch_size):
                kl = self.anchors.kl(model, bundle, range(s, min(s + batch_size, len(self.anchors))))
                parts.append(sum(kl.values()).float().cpu())
        self.drift = torch.cat(parts)
        return self.drift

    def loss(self, model, bundle: ImageModel, index: Sequence[int]) -> tuple[torch.Tensor, dict]:
        """``weight`` times the mean over this rank's anchors of the summed branch KLs, and its parts."""
        kl = self.anchors.kl(model, bundle, index)
        total = sum(v.mean() for v in kl.values())
        return self.weight * total, {f"preserve_kl/{k}": float(v.detach().mean()) for k, v in kl.items()}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "drift": self.drift.clone(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.drift = state["drift"].clone()
        self.steps = int(state["steps"])


class DriftProbe:
    """A fixed probe set of other-concept prompts, never trained on, whose drift is logged."""

    def __init__(self, anchors: AnchorSet):
        self.anchors = anchors

    @torch.no_grad()
    def measure(self, model, bundle: ImageModel, batch_size: int = 16) -> dict[str, float]:
        sums: dict[str, float] = {}
        for s in range(0, len(self.anchors), batch_size):
            for name, v in self.anchors.kl(model, bundle, range(s, min(s + batch_size, len(self.anchors)))).items():
                sums[name] = sums.get(name, 0.0) + float(v.sum())
        return {f"probe_kl/{k}": v / len(self.anchors) for k, v in sums.items()}


def anchor_prompts(preserve_cfg, on_error: str = "fail") -> list[str]:
    """``preserve.prompts`` plus the prompts of ``preserve.prompts_file`` (its target field)."""
    prompts = list(preserve_cfg.prompts)
    if preserve_cfg.prompts_file:
        from ear_dist.data.readers import ReadReport, read_pairs

        prompts += [p.target for p in read_pairs(preserve_cfg.prompts_file, "auto", on_error, "", ReadReport())]
    return prompts


def surrogate_anchors(preserve_cfg, pairs: Sequence, erased: Sequence[str] = (), given: Sequence[str] = ()
                      ) -> list[str]:
    """The first ``preserve.surrogates`` distinct surrogate prompts of ``pairs`` that are not ``given`` anchors
    and name none of the pairs' concepts nor of ``erased`` (a job array's other concepts, ``slurm.concepts``)."""
    if not preserve_cfg.surrogates:
        return []
    from ear_dist.data.ecg import mentions

    # a surrogate that shows a concept the run erases (a joint run's church -> barn while barn is erased too,
    # or a style pair's sentence that names church) would protect what the run must remove
    concepts = {p.concept for p in pairs if p.concept} | {c for c in erased if c}
    seen, extra = set(given), []
    for p in pairs:
        if len(extra) < preserve_cfg.surrogates and p.surrogate and p.surrogate not in seen and not any(
                mentions(p.surrogate, c) for c in concepts):
            seen.add(p.surrogate)
            extra.append(p.surrogate)
    return extra


@dataclass
class PreservingParts:
    """What ``preserve`` and ``trainable.adapter`` add to a run, built from the base model before any update."""

    edits: EditSpec
    preservation: Optional[Preservation] = None
    probe: Optional[DriftProbe] = None
    nullspace_ranks: Optional[dict] = None
    anchors: int = 0  # anchor prompts in all
    surrogate_anchors: int = 0  # of which the training pairs' surrogates (preserve.surrogates)


def build_preserving_parts(cfg, rt, bundle: ImageModel, trainable: list[str], pairs: Sequence = ()
                           ) -> PreservingParts:
    """Anchors and their teacher distributions, null-space projectors, the preservation term and the probe.

    ``pairs``: the training pairs, whose surrogates join the anchors when ``preserve.surrogates`` > 0 (save
    those naming a concept of the pairs or of the job array, ``slurm.concepts``).
    """
    p = cfg.preserve
    guidance = cfg.rollout.guidance_weight
    anchors, surrogates = None, []
    if p.weight > 0 or p.nullspace:
        given = anchor_prompts(p)
        surrogates = surrogate_anchors(p, pairs, cfg.slurm.concepts, given)
        anchors = AnchorSet.snapshot(bundle, given + surrogates, guidance, p.seed, p.branches)
    projectors, ranks = {}, None
    if p.nullspace:
        feed = teacher_forced_feed(bundle, anchors.prompts, anchors.tokens)
        projectors, ranks = nullspace_projectors(bundle.model, trainable, feed, p.nullspace_energy)
    edits = EditSpec(cfg.trainable.adapter, cfg.trainable.lora_rank, cfg.trainable.lora_alpha, projectors)
    preservation = None
    if p.weight > 0:
        preservation = Preservation(anchors, p.weight, p.per_step, p.drift_power, p.refresh_every,
                                    seed=cfg.train.seed + 7919, dp_rank=max(rt.dp_rank, 0), dp_world=rt.dp_world)
    probe = None
    if p.probe_every:
        probe = DriftProbe(AnchorSet.snapshot(bundle, p.probe_prompts, guidance, p.seed + 1, BRANCHES))
    return PreservingParts(edits, preservation, probe, ranks, len(anchors) if anchors is not None else 0,
                           len(surrogates))
