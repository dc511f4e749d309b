"""Which parameters the student trains, chosen by name; everything else is frozen."""

from __future__ import annotations

import fnmatch
import re

import torch

from ear_dist.config import ConfigError, TrainableConfig

LLM_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
ATTENTION = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.")


def select_trainable_names(model: torch.nn.Module, cfg: TrainableConfig) -> list[str]:
    """Names of the parameters to train.

    Default (the paper): every module of the first ``first_k_layers`` LLM layers, or
    only their attention q/k/v/o projections (the official code). Explicit
    ``patterns`` (fnmatch on parameter names) replace both.
    """
    names = [n for n, _ in model.named_parameters()]
    if cfg.patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in cfg.patterns)]
        if not chosen:
            raise ConfigError(f"trainable.patterns: {cfg.patterns} match no parameter (e.g. {names[0]!r})")
        return chosen
    n_layers = sum(1 for _ in model.model.language_model.layers)
    if cfg.first_k_layers > n_layers:
        raise ConfigError(f"trainable.first_k_layers: {cfg.first_k_layers} > the model's {n_layers} LLM layers")
    chosen = []
    for n in names:
        m = LLM_LAYER.match(n)
        if not m or int(m.group(1)) >= cfg.first_k_layers:
            continue
        if cfg.modules == "attention" and not m.group(2).startswith(ATTENTION):
            continue
        chosen.append(n)
    if not chosen:
        raise ConfigError("trainable: the selection is empty (first_k_layers=0 and no patterns?)")
    return chosen


def freeze_all_but(model: torch.nn.Module, trainable: list[str]) -> int:
    """Set requires_grad on exactly ``trainable``; return the number of trainable elements."""
    keep = set(trainable)
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        count += p.numel() if n in keep else 0
    return count
