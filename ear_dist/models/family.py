"""What the rest of ear-dist asks of a text-to-image model, whatever its family.

Two families sit behind one interface, :class:`ImageModel`, chosen by the config key
``model.family``:

- ``janus``: Janus-Pro (transformers' ``JanusForConditionalGeneration``), one codebook,
  next-token prediction over a raster of image tokens (``ear_dist.models.janus``);
- ``var``: Infinity-style next-scale prediction over a multi-scale bitwise token map,
  text from a T5 encoder (``ear_dist.models.var``).

The interface (:class:`ear_dist.models.interface.ImageModel`) is what the step, the
teacher and the evaluation call; this module adapts Janus to it and loads either family.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch

from ear_dist.config import ConfigError
from ear_dist.models.interface import ImageModel
from ear_dist.models.images import decode_tokens
from ear_dist.models.janus import JanusBundle, load_janus, save_janus, teacher_forced, unconditional_ids
from ear_dist.models.janus.presets import PRESETS
from ear_dist.models.janus.rollout import rollout_ids
from ear_dist.models.var.presets import VAR_PRESETS
from ear_dist.models.var.bundle import is_var_directory, load_var

MODEL_FAMILIES = ("janus", "var")


class JanusModel(JanusBundle, ImageModel):
    """Janus-Pro behind the family interface: every method is the Janus code path as it was."""

    family = "janus"

    @classmethod
    def of(cls, bundle: JanusBundle) -> "JanusModel":
        return cls(**{f.name: getattr(bundle, f.name) for f in dataclasses.fields(bundle)})

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def head_width(self) -> int:
        return int(self.model.config.vq_config.num_embeddings)

    @property
    def kv_bytes_per_token(self) -> int:
        text = self.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return int(text.num_hidden_layers * 2 * kv_heads * head_dim * itemsize)

    def unconditional(self, cond: torch.Tensor) -> torch.Tensor:
        return unconditional_ids(cond, self.prompt_format)

    def teacher_forced(self, model, cond, mask, image_tokens, return_logits=True):
        return teacher_forced(model, cond, mask, image_tokens, return_logits=return_logits)

    def rollout_ids(self, cond, mask, guidance_weight=5.0, temperature=1.0, top_k=0, greedy=False, seeds=None,
                    progress=False, decode="eager", uncond=None):
        return rollout_ids(self, cond, mask, guidance_weight, temperature, top_k, greedy, seeds,
                           progress=progress, decode=decode, uncond=uncond)

    def decode(self, image_tokens, batch_size=16):
        return decode_tokens(self.model, image_tokens, batch_size=batch_size)

    def save(self, path):
        return save_janus(self, path)


def as_image_model(bundle) -> ImageModel:
    """The family interface of a loaded model (a Janus bundle is wrapped; an ImageModel is returned as is)."""
    if isinstance(bundle, ImageModel):
        return bundle
    if isinstance(bundle, JanusBundle):
        return JanusModel.of(bundle)
    raise TypeError(f"not a model of a known family ({', '.join(MODEL_FAMILIES)}): {type(bundle).__name__}")


def detect_family(path_or_preset: str) -> Optional[str]:
    """The family a preset name or a local model directory belongs to; None when it cannot tell."""
    if path_or_preset in PRESETS:
        return "janus"
    if path_or_preset in VAR_PRESETS:
        return "var"
    root = Path(path_or_preset)
    if root.is_dir():
        if is_var_directory(root):
            return "var"
        if (root / "config.json").is_file():
            return "janus"
    return None


def load_model(path_or_preset: str, family: str = "janus", device: Union[str, torch.device] = "auto",
               dtype: Union[str, torch.dtype] = "auto", seed: int = 0) -> ImageModel:
    """Load a model of ``family`` (the config key ``model.family``) from a local directory or a preset.

    A directory or preset of the other family is an error that names ``model.family``.
    """
    if family not in MODEL_FAMILIES:
        raise ConfigError(f"model.family: {family!r} is not one of {', '.join(MODEL_FAMILIES)}")
    found = detect_family(path_or_preset)
    if found is not None and found != family:
        raise ConfigError(f"model.path {path_or_preset!r} is a {found} model but model.family is {family!r}; "
                         f"set model.family={found}")
    if family == "var":
        bundle = load_var(path_or_preset, device=device, dtype=dtype, seed=seed)
    else:
        bundle = JanusModel.of(load_janus(path_or_preset, device=device, dtype=dtype, seed=seed))
    check_finite_weights(bundle.model, path_or_preset)
    return bundle


def check_finite_weights(model: torch.nn.Module, where: str) -> None:
    """A model whose weights hold NaN or infinities (a broken merge or training made outside ear-dist) is an input
    error naming the first such tensor, before it samples or trains anything."""
    from ear_dist.models.janus import ModelLoadError

    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise ModelLoadError(f"{where}: weight {name} holds {bad} NaN or infinite value(s) of "
                                     f"{tensor.numel()}; the model is broken (was it merged or trained with a "
                                     "non-finite update?): use the base model or a finite delta")


def layer_count(path_or_preset: str, family: str) -> Optional[int]:
    """The number of layers ``trainable.layers`` counts (LLM layers of a Janus, blocks of a var model),
    read from the preset or the directory's config without loading weights; None when it cannot tell."""
    import json

    from ear_dist.models.janus.presets import preset_config
    from ear_dist.models.var.bundle import VAR_CONFIG_FILE
    from ear_dist.models.var.config import VarConfig

    root = Path(path_or_preset)
    try:
        if family == "var":
            if path_or_preset in VAR_PRESETS and not root.exists():
                return VAR_PRESETS[path_or_preset][0]().depth
            meta = json.loads((root / VAR_CONFIG_FILE).read_text())
            config = VarConfig.from_dict(meta["config"]) if "config" in meta else VAR_PRESETS[meta["preset"]][0]()
            return config.depth
        if path_or_preset in PRESETS and not root.exists():
            return preset_config(path_or_preset).text_config.num_hidden_layers
        config = json.loads((root / "config.json").read_text())
        return int(config["text_config"]["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
