"""Which parameters the student trains, chosen by name; everything else is frozen."""

from __future__ import annotations

import fnmatch
import re

import torch

from ear_dist.config import ConfigError, TrainableConfig
from ear_dist.config.layers import resolve_layers

LLM_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$")
ATTENTION = ("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.", "self_attn.o_proj.")


def _janus_layer_of(name: str):
    m = LLM_LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def select_trainable_names(model: torch.nn.Module, cfg: TrainableConfig) -> list[str]:
    """Names of the parameters to train.

    Default (the paper): every module of the layers ``layers`` resolves to on this model
    (``ear_dist.config.layers``; empty: the first ``first_k_layers`` LLM layers), or only
    their attention q/k/v/o projections (the official code), less the model's first
    ``skip_first_layers``. Explicit
    ``patterns`` (fnmatch on parameter names) replace both. A model that names its own
    layers (the VAR family: ``layer_of``, ``num_layers``, ``attention_prefixes``) is read
    through those; for it ``attention`` means the self-attention of each block.
    """
    names = [n for n, _ in model.named_parameters()]
    if cfg.patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in cfg.patterns)]
        if not chosen:
            raise ConfigError(f"trainable.patterns: {cfg.patterns} match no parameter (e.g. {names[0]!r})")
        return chosen
    if hasattr(model, "layer_of"):
        layer_of, n_layers, attention = model.layer_of, model.num_layers, tuple(model.attention_prefixes)
    else:
        layer_of, n_layers, attention = _janus_layer_of, sum(1 for _ in model.model.language_model.layers), ATTENTION
    if not cfg.layers and cfg.first_k_layers > n_layers:
        raise ConfigError(f"trainable.first_k_layers: {cfg.first_k_layers} > the model's {n_layers} LLM layers")
    layers = resolve_layers(cfg.layers, n_layers, cfg.first_k_layers, cfg.skip_first_layers)
    chosen = []
    for n in names:
        where = layer_of(n)
        if where is None or where[0] not in layers:
            continue
        if cfg.modules == "attention" and not where[1].startswith(attention):
            continue
        chosen.append(n)
    if not chosen:
        raise ConfigError(f"trainable: the selection is empty (layers {cfg.layers!r}, first_k_layers "
                          f"{cfg.first_k_layers}, skip_first_layers {cfg.skip_first_layers} on {n_layers} layers)")
    return chosen


def freeze_all_but(model: torch.nn.Module, trainable: list[str]) -> int:
    """Set requires_grad on exactly ``trainable``; return the number of trainable elements."""
    keep = set(trainable)
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        count += p.numel() if n in keep else 0
    return count
