"""Edited linear layers: LoRA updates and null-space-constrained updates of the trained weights.

Both replace a trained ``nn.Linear`` of the student by an :class:`EditedLinear` whose
weight is ``W0 + E P``: ``W0`` the base weight (frozen), ``E`` the edit (the full
matrix, or ``(alpha / r) B A`` with LoRA), and ``P`` a projector onto the complement of
the inputs the layer sees on preserved prompts (null-space editing, as AlphaEdit does
for language models and SPEED for diffusion), or the identity. Because ``E P k = 0`` for
every preserved input ``k``, the layer's outputs on those inputs cannot move, whatever
the optimizer does with ``E``.

The effective weight is materialised in each forward (one ``out x in x in`` matmul per
edited layer, ~70 us for a 4096 x 4096 projection on an H100), and a delta stores it
under the layer's own weight name, so ``merge``, deltas and job arrays are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class EditSpec:
    """How the trained linear weights are edited."""

    kind: str = "full"  # full | lora
    rank: int = 8
    alpha: float = 16.0
    projectors: dict = field(default_factory=dict)  # weight name -> P [in, in] (null space), or absent

    @property
    def active(self) -> bool:
        return self.kind == "lora" or bool(self.projectors)


class EditedLinear(torch.nn.Module):
    """``y = x (W0 + E P)^T + b`` with a full or low-rank edit ``E`` and an optional projector ``P``."""

    def __init__(self, base: torch.nn.Linear, kind: str, rank: int = 8, alpha: float = 16.0,
                 projector: Optional[torch.Tensor] = None, seed: int = 0):
        super().__init__()
        self.kind = kind
        self.in_features, self.out_features = base.in_features, base.out_features
        w0 = base.weight.detach()
        self.register_buffer("base_weight", w0, persistent=False)  # shared with the teacher, never trained
        self.bias = base.bias
        if projector is not None:
            self.register_buffer("projector", projector.to(device=w0.device, dtype=w0.dtype), persistent=False)
        else:
            self.projector = None
        if kind == "full":
            self.weight = torch.nn.Parameter(w0.clone())  # the edited weight itself; E = weight - W0
        elif kind == "lora":
            g = torch.Generator().manual_seed(seed)
            a = torch.empty(rank, self.in_features).uniform_(-1, 1, generator=g) / math.sqrt(self.in_features)
            self.lora_A = torch.nn.Parameter(a.to(device=w0.device, dtype=w0.dtype))
            self.lora_B = torch.nn.Parameter(torch.zeros(self.out_features, rank, device=w0.device, dtype=w0.dtype))
            self.scale = alpha / rank
        else:
            raise ValueError(f"trainable.adapter: {kind!r} is not one of full, lora")

    def edit(self) -> torch.Tensor:
        """The change ``E P`` to the base weight."""
        e = self.weight - self.base_weight if self.kind == "full" else self.scale * (self.lora_B @ self.lora_A)
        return e @ self.projector if self.projector is not None else e

    def effective_weight(self) -> torch.Tensor:
        return self.base_weight + self.edit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


def _module_path(weight_name: str) -> str:
    if not weight_name.endswith(".weight"):
        raise ValueError(f"{weight_name}: only linear weights can be edited")
    return weight_name[: -len(".weight")]


def linear_weights(model: torch.nn.Module, names: list[str]) -> list[str]:
    """The names among ``names`` that are weights of ``nn.Linear`` layers (the ones an edit applies to)."""
    out = []
    for name in names:
        if not name.endswith(".weight"):
            continue
        module = model.get_submodule(_module_path(name))
        if isinstance(module, torch.nn.Linear):
            out.append(name)
    return out


def install(model: torch.nn.Module, weight_names: list[str], spec: EditSpec, seed: int = 0) -> dict[str, EditedLinear]:
    """Replace the linear layers among ``weight_names`` by edited ones; only their edit parameters train.

    Returns weight name -> EditedLinear. Other names (norm weights of ``modules=all``) keep
    training as they are; every other parameter of ``model`` is frozen.
    """
    keep = set(weight_names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
    edited = {}
    for i, name in enumerate(linear_weights(model, weight_names)):
        path = _module_path(name)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        layer = EditedLinear(base, spec.kind, spec.rank, spec.alpha, spec.projectors.get(name), seed=seed + i)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        setattr(parent, child, layer)
        edited[name] = layer
    return edited


def effective_state(edited: dict[str, EditedLinear]) -> dict[str, torch.Tensor]:
    """The edited layers' effective weights, on the CPU, under the original weight names (what a delta stores)."""
    with torch.no_grad():
        return {n: m.effective_weight().detach().to("cpu").contiguous().clone() for n, m in edited.items()}


@torch.no_grad()
def input_second_moments(model: torch.nn.Module, weight_names: list[str], run) -> dict[str, torch.Tensor]:
    """``sum x x^T`` [in, in] (float64) of each named linear layer's inputs over what ``run()`` feeds the model."""
    moments: dict[str, torch.Tensor] = {}
    handles = []
    for name in weight_names:
        module = model.get_submodule(_module_path(name))

        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            moments[name] = moments.get(name, 0) + x.T @ x

        handles.append(module.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return moments


def principal_basis(moment: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """(U [in, k] in the moment's dtype, the rank counted): the top eigenvectors of a second moment holding
    ``energy`` of its trace."""
    values, vectors = torch.linalg.eigh(moment)  # ascending
    values = values.clamp(min=0).flip(0)
    vectors = vectors.flip(1)
    share = values.cumsum(0) / values.sum().clamp(min=1e-300)
    rank = int((share < energy).sum()) + 1
    return vectors[:, :rank], rank


def null_space_projector(moment: torch.Tensor, energy: float) -> tuple[torch.Tensor, int]:
    """``P = I - U U^T``, U the top eigenvectors of the second moment holding ``energy`` of its trace.

    Returns (P in float32, the rank of the preserved span).
    """
    u, rank = principal_basis(moment, energy)
    p = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device) - u @ u.T
    return p.float(), rank


def nullspace_projectors(model: torch.nn.Module, weight_names: list[str], run, energy: float
                         ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """A projector per named linear weight from its inputs on the preserved prompts (``run`` feeds them).

    Layers fed the same inputs (q, k and v of one attention block) share one projector tensor.
    """
    weight_names = linear_weights(model, weight_names)
    moments = input_second_moments(model, weight_names, run)
    projectors, ranks, cache = {}, {}, []
    for name in weight_names:
        if name not in moments:
            raise ValueError(f"preserve.nullspace: {name} saw no input on the anchor prompts")
        for moment, p, r in cache:
            if moment.shape == moments[name].shape and torch.equal(moment, moments[name]):
                projectors[name], ranks[name] = p, r
                break
        else:
            p, r = null_space_projector(moments[name], energy)
            cache.append((moments[name], p, r))
            projectors[name], ranks[name] = p, r
    return projectors, ranks
