"""A VAR-family model behind the family interface (transformer, T5 text encoder, BSQ image decoder),
its presets, and its directory on disk.

A model directory holds ``var_config.json`` and the three parts' files, named there::

    {"format": "ear-dist-var/1", "config": {...} or "preset": "infinity-2b",
     "transformer": "transformer.safetensors", "vae": "vae.safetensors", "text_encoder": "text_encoder"}

Released Infinity weights load as they are published: point ``transformer`` at
``infinity_2b_reg.pth`` and ``vae`` at ``infinity_vae_d32_reg.pth`` (read with
``torch.load(weights_only=True)``; the tokenizer file's decoder weights, under its ``"vae"``
entry) and ``text_encoder`` at a local flan-t5-xl directory. ``save_var`` writes
safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ear_dist.models.interface import ImageModel
from ear_dist.models.janus import ModelLoadError, resolve_device, resolve_dtype
from ear_dist.models.janus.presets import build_word_tokenizer
from ear_dist.models.var.bsq import (BsqDecoder, check_tokens, normalise_decoder_keys, summed_codes,
                                     teacher_forcing_inputs)
from ear_dist.models.var.config import VarConfig
from ear_dist.models.var.model import VarTransformer
from ear_dist.models.var.presets import VAR_PRESETS
from ear_dist.models.var.rollout import sample

VAR_CONFIG_FILE = "var_config.json"
FORMAT = "ear-dist-var/1"
# Buffers of the released code that carry no weights (zeros, masks rebuilt at run time).
RELEASED_BUFFERS = ("zero_k_bias", "lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen",
                    "Infinity_invisible_qlen")


class VarBundle(ImageModel):
    """``model`` (the next-scale transformer) is what a student copies and a delta changes; the T5
    encoder and the image decoder stay frozen beside it.

    ``tokenizer`` may be None for shape-only presets (infinity-2b with random weights):
    those feed T5 states directly.
    """

    family = "var"

    def __init__(self, model: VarTransformer, text_encoder, tokenizer, decoder: BsqDecoder, name: str):
        self.model, self.text_encoder, self.tokenizer, self.decoder, self.name = (
            model, text_encoder, tokenizer, decoder, name)
        for frozen in (text_encoder, decoder):
            frozen.eval()
            frozen.requires_grad_(False)

    @property
    def config(self):
        return self.model.config

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return 1 << self.config.bits

    @property
    def hidden_size(self) -> int:
        return self.config.embed_dim

    @property
    def head_width(self) -> int:
        return self.config.head_width

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of every block at full width (every head has its own)."""
        return int(self.config.depth * 2 * self.config.embed_dim * next(self.model.parameters()).element_size())

    @property
    def logit_groups(self) -> int:
        return self.config.bits

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        return self.config.scale_sizes

    def scale_end(self, n: int) -> bool:
        """Whether the first ``n`` tokens are whole scales."""
        return n in np.cumsum(self.scale_sizes)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (T5 states [B, L, text_channels] in the model's dtype, mask [B, L]); right-padded,
        so the unconditional form puts ``cfg_uncond[:len]`` on a prompt's own positions, as Infinity does."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer; pass T5 states instead of prompts")
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer([p.strip() for p in prompts], return_tensors="pt", padding=True, truncation=True,
                             max_length=self.config.text_maxlen)
        device = self.device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        states = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return states.to(self.model.dtype), mask

    def unconditional(self, cond: torch.Tensor) -> torch.Tensor:
        """The learned unconditional states ``cfg_uncond[:L]`` in every row (a row's mask keeps its own length)."""
        length = cond.shape[1]
        if length > self.config.text_maxlen:
            raise ValueError(f"prompt states of {length} tokens: more than text_maxlen {self.config.text_maxlen}")
        return self.model.cfg_uncond[:length].to(cond.dtype).unsqueeze(0).expand(cond.shape[0], -1, -1)

    def teacher_forced(self, model, cond, mask, image_tokens, return_logits=True):
        """All positions of whole scales in one pass (block-causal); the logits are the bitwise head's."""
        n = image_tokens.shape[1]
        if not self.scale_end(n):
            raise ValueError(f"teacher forcing of a next-scale model needs whole scales: {n} tokens is not one of "
                             f"the scale boundaries {list(np.cumsum(self.scale_sizes))}")
        check_tokens(image_tokens, self.config.bits)
        inputs = teacher_forcing_inputs(image_tokens, self.config.scales, self.config.bits)
        return model(cond, mask, inputs, return_logits=return_logits)

    def rollout_ids(self, cond, mask, guidance_weight=5.0, temperature=1.0, top_k=0, greedy=False, seeds=None,
                    progress=False, decode="eager", uncond=None):
        """Scale-by-scale CFG sampling of the bits (``top_k`` has no effect: a bit has two values; one decode
        loop whatever ``decode`` says: a scale is one forward, so there is no per-token overhead to remove).
        Negative prompts (``uncond``) are not implemented: the family's unconditional rows are learned states."""
        if uncond is not None:
            from ear_dist.errors import InputError

            raise InputError("negative prompts: the VAR family's unconditional branch is its learned cfg_uncond "
                             "states; negative prompts are implemented for the janus family only")
        return sample(self.model, cond, mask, self.unconditional(cond), guidance_weight, temperature, greedy, seeds,
                      progress)

    @torch.no_grad()
    def decode(self, image_tokens: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        outs = []
        dtype = next(self.decoder.parameters()).dtype
        for s in range(0, image_tokens.shape[0], batch_size):
            tokens = image_tokens[s: s + batch_size].to(self.device)
            latent = summed_codes(tokens, self.config.scales, self.config.bits).to(dtype)
            pix = ((self.decoder(latent).float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            outs.append(pix.permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 1, 1, 3), np.uint8)

    def save(self, path: Union[str, Path]) -> Path:
        return save_var(self, path)


# --------------------------------------------------------------------------- presets and files


def build_var_preset(name: str, seed: int = 0, device: Union[str, torch.device] = "cpu",
                     dtype: torch.dtype = torch.float32, meta: bool = False,
                     extra_words: Optional[Iterable[str]] = None, config: Optional[VarConfig] = None) -> VarBundle:
    """A preset (or ``config``) with seeded random weights, or on the meta device (shapes only).

    ``tiny-var`` gets the word-level tokenizer (plus ``extra_words``) and a tiny T5; the
    2B shape has no tokenizer.
    """
    if name not in VAR_PRESETS:
        raise ValueError(f"unknown VAR preset {name!r}; presets: {', '.join(VAR_PRESETS)}")
    make_config, make_t5 = VAR_PRESETS[name]
    cfg = config if config is not None else make_config()
    tokenizer = None
    t5_cfg = make_t5()
    if name == "tiny-var":
        tokenizer = build_word_tokenizer(extra_words)
        if len(tokenizer) > t5_cfg.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} words but the T5 vocabulary is {t5_cfg.vocab_size}")
        t5_cfg.d_model = cfg.text_channels
    if t5_cfg.d_model != cfg.text_channels:
        raise ValueError(f"text encoder width {t5_cfg.d_model} != text_channels {cfg.text_channels}")
    from transformers import T5EncoderModel

    if meta:
        with torch.device("meta"):
            parts = (VarTransformer(cfg), T5EncoderModel(t5_cfg), BsqDecoder(cfg.bits, cfg.decoder))
    else:
        torch.manual_seed(seed)
        parts = tuple(m.to(device=device, dtype=dtype) for m in
                      (VarTransformer(cfg), T5EncoderModel(t5_cfg), BsqDecoder(cfg.bits, cfg.decoder)))
    model, text_encoder, decoder = parts
    model.eval()
    return VarBundle(model, text_encoder, tokenizer, decoder, name)


def is_var_directory(root: Union[str, Path]) -> bool:
    return (Path(root) / VAR_CONFIG_FILE).is_file()


def save_var(bundle: VarBundle, path: Union[str, Path]) -> Path:
    """Write safetensors for the transformer and decoder, the T5 directory and ``var_config.json`` (last)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()},
              str(out / "transformer.safetensors"))
    save_file({f"decoder.{k}": v.detach().cpu().contiguous() for k, v in bundle.decoder.state_dict().items()},
              str(out / "vae.safetensors"))
    bundle.text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(out / "text_encoder")
    meta = {"format": FORMAT, "config": bundle.config.to_dict(), "transformer": "transformer.safetensors",
            "vae": "vae.safetensors", "text_encoder": "text_encoder"}
    (out / VAR_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return out


def save_tiny_var_checkpoint(path: Union[str, Path], seed: int = 0, extra_words: Optional[Iterable[str]] = None,
                             **config_overrides) -> Path:
    """Build a tiny random VAR model (optionally resized) and save it: tests load it back like a user would."""
    from ear_dist.models.var.presets import tiny_var_config

    bundle = build_var_preset("tiny-var", seed=seed, config=tiny_var_config(**config_overrides),
                              extra_words=extra_words)
    return save_var(bundle, path)


def read_weights(path: Path) -> dict:
    """Tensors of a safetensors file, or of a torch checkpoint read with ``weights_only=True``."""
    if not path.is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds: the message names the file
        raise ModelLoadError(f"{path}: not a readable weights-only torch checkpoint ({e})") from e
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def load_into(module: torch.nn.Module, state: dict, where: Path) -> None:
    """Load by name; every parameter must be there with its shape, nothing else (errors name the keys)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(expected[k].shape))
    problems = [f"{name}: {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        raise ModelLoadError(f"{where}: weights do not match the model config ({'; '.join(problems)})")
    module.load_state_dict(state)


def load_var(path_or_preset: str, device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
             seed: int = 0) -> VarBundle:
    """A VAR model from a local directory (``var_config.json``) or a preset (random weights)."""
    dev = resolve_device(device) if isinstance(device, str) else device
    dt = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    if path_or_preset in VAR_PRESETS and not Path(path_or_preset).exists():
        return build_var_preset(path_or_preset, seed=seed, device=dev, dtype=dt)
    root = Path(path_or_preset)
    if not root.exists():
        raise ModelLoadError(f"model path {root} does not exist (and is not a VAR preset: {', '.join(VAR_PRESETS)})")
    cfg_file = root / VAR_CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelLoadError(f"{root}: no {VAR_CONFIG_FILE}; a VAR model directory names its config and files there")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from e
    if "config" in meta:
        try:
            cfg = VarConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise ModelLoadError(f"{cfg_file}: field 'config': {e}") from e
    elif meta.get("preset") in VAR_PRESETS:
        cfg = VAR_PRESETS[meta["preset"]][0]()
    else:
        raise ModelLoadError(f"{cfg_file}: needs 'config' or a 'preset' ({', '.join(VAR_PRESETS)})")
    for key in ("transformer", "vae", "text_encoder"):
        if not meta.get(key):
            raise ModelLoadError(f"{cfg_file}: field {key!r} (the file or directory of that part) is missing")
    from transformers import AutoTokenizer, T5EncoderModel

    model = VarTransformer(cfg)
    weights = root / meta["transformer"]
    state = {k: v for k, v in read_weights(weights).items() if k.rsplit(".", 1)[-1] not in RELEASED_BUFFERS}
    load_into(model, state, weights)
    decoder = BsqDecoder(cfg.bits, cfg.decoder)
    vae = root / meta["vae"]
    load_into(decoder, normalise_decoder_keys(read_weights(vae), set(decoder.state_dict())), vae)
    text_dir = root / meta["text_encoder"]
    if not text_dir.is_dir():
        raise ModelLoadError(f"{cfg_file}: text_encoder directory {text_dir} does not exist")
    try:
        text_encoder = T5EncoderModel.from_pretrained(text_dir, dtype=dt, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{text_dir}: not a T5 encoder checkpoint ({e})") from e
    if text_encoder.config.d_model != cfg.text_channels:
        raise ModelLoadError(f"{text_dir}: T5 width {text_encoder.config.d_model} != the transformer's text_channels "
                             f"{cfg.text_channels}")
    tokenizer = None
    if any((text_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model")):
        tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
    bundle = VarBundle(model.to(device=dev, dtype=dt).eval(), text_encoder.to(dev), tokenizer,
                       decoder.to(device=dev, dtype=dt), str(root))
    return bundle
