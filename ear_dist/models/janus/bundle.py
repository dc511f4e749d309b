"""Janus-Pro through transformers' ``JanusForConditionalGeneration``: load, save, and
the text-to-image teacher-forced forward that transformers does not provide.

Layout facts used here (transformers 5.x): the Llama decoder is
``model.model.language_model`` (layers at ``.layers[i]``); image tokens are embedded by
``prepare_embeddings_for_image_generation`` (generation_embeddings -> generation_aligner);
logits over the image codebook come from ``model.model.generation_head``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, asdict
from pathlib import Path
from typing import Optional, Union

import torch
from transformers import JanusConfig, JanusForConditionalGeneration

from ear_dist.errors import InputError
from ear_dist.models.janus.presets import (
    JANUS_PRO_TEMPLATE,
    PRESETS,
    PromptFormat,
    build_word_tokenizer,
    preset_config,
    tiny_prompt_format,
)

PROMPT_FORMAT_FILE = "ear_dist_prompt.json"


class ModelLoadError(InputError, ValueError):
    """A model directory that cannot be used; the message names the path and the problem."""


@dataclass
class JanusBundle:
    """A Janus model with what it needs to turn prompts into inputs.

    ``tokenizer`` may be None for shape-only presets (janus-pro-7b with random weights):
    those feed token ids directly.
    """

    model: JanusForConditionalGeneration
    tokenizer: object
    prompt_format: PromptFormat
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_image_tokens(self) -> int:
        return image_token_count(self.model.config)

    @property
    def codebook_size(self) -> int:
        return self.model.config.vq_config.num_embeddings

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt (template included) that leaves room for an image in the text context."""
        return int(self.model.config.text_config.max_position_embeddings) - self.num_image_tokens

    def prompt_lengths(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt with the prompt template (what ``encode_prompts`` feeds the model)."""
        texts = [self.prompt_format.template.format(prompt=p.strip()) for p in prompts]
        return [len(ids) for ids in self.tokenizer(texts)["input_ids"]]

    def check_prompt_lengths(self, prompts: list[str], lengths: Optional[list[int]] = None,
                             where: Optional[list[str]] = None) -> None:
        """A prompt longer than the model's context (text + image tokens) is an error naming it (``where``: the
        file and row of each prompt, when known) and its length."""
        limit = self.max_prompt_tokens
        lengths = self.prompt_lengths(prompts) if lengths is None else lengths
        for i, (prompt, n) in enumerate(zip(prompts, lengths)):
            if n > limit:
                start = prompt.strip()[:60] + ("..." if len(prompt.strip()) > 60 else "")
                raise PromptTooLongError(
                    f"{where[i] + ': ' if where else ''}prompt {start!r} is {n} tokens (with the prompt template); "
                    f"the model's context holds {self.model.config.text_config.max_position_embeddings} positions, "
                    f"{self.num_image_tokens} of them for the image, so a prompt may have at most {limit}: shorten it")

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts (left-padded, each ending in begin-of-image) -> (input_ids, attention_mask)."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.name!r} has no tokenizer; pass token ids instead of prompts")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        texts = [self.prompt_format.template.format(prompt=p.strip()) for p in prompts]
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        self.check_prompt_lengths(prompts, mask.sum(dim=1).tolist())
        if not bool((ids[:, -1] == self.prompt_format.boi_token_id).all()):
            raise ValueError("prompt encoding does not end in the begin-of-image token; check the prompt template")
        return ids.to(self.device), mask.to(self.device)


class PromptTooLongError(InputError, ValueError):
    """A prompt that does not fit the model's context beside an image (exit 2)."""


def image_token_count(config: JanusConfig) -> int:
    return int(config.vision_config.num_image_tokens)


def grid_side(config: JanusConfig) -> int:
    return int(config.vq_config.num_patches)


def resolve_dtype(name: str, device: Union[str, torch.device]) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_preset(
    name: str, seed: int = 0, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
    meta: bool = False, extra_words: Optional[list[str]] = None, config: Optional[JanusConfig] = None,
) -> JanusBundle:
    """Build a preset with random weights (seeded), or on the meta device (shapes only)."""
    cfg = config if config is not None else preset_config(name)
    tokenizer, fmt = None, None
    if name == "tiny" or config is not None:
        tokenizer = build_word_tokenizer(extra_words)
        if len(tokenizer) > cfg.text_config.vocab_size:
            raise ValueError(
                f"tokenizer has {len(tokenizer)} words but text_config.vocab_size is {cfg.text_config.vocab_size}"
            )
        fmt = tiny_prompt_format()
    else:
        t = cfg.text_config
        fmt = PromptFormat(JANUS_PRO_TEMPLATE, "<begin_of_image>", t.pad_token_id, t.bos_token_id, 100016)
    if meta:
        with torch.device("meta"):
            model = JanusForConditionalGeneration(cfg)
    else:
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(cfg)
        model.to(device=device, dtype=dtype)
    model.eval()
    _set_generation_defaults(model, fmt)
    return JanusBundle(model, tokenizer, fmt, name)


def _set_generation_defaults(model: JanusForConditionalGeneration, fmt: PromptFormat) -> None:
    gc = model.generation_config
    gc.bos_token_id = fmt.bos_token_id
    gc.pad_token_id = fmt.pad_token_id
    gc.generation_kwargs = {"boi_token_id": fmt.boi_token_id}


def save_janus(bundle: JanusBundle, path: Union[str, Path]) -> Path:
    """Write a checkpoint that both ``load_janus`` and plain ``from_pretrained`` load (safetensors)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    bundle.model.save_pretrained(out, safe_serialization=True)
    if bundle.tokenizer is not None:
        bundle.tokenizer.save_pretrained(out)
    (out / PROMPT_FORMAT_FILE).write_text(json.dumps(asdict(bundle.prompt_format), indent=2))
    return out


def save_tiny_checkpoint(path: Union[str, Path], seed: int = 0, **config_overrides) -> Path:
    """Build a tiny random Janus (optionally resized) and save it: tests load it back like a user would."""
    from ear_dist.models.janus.presets import tiny_config

    extra_words = config_overrides.pop("extra_words", None)
    cfg = tiny_config(**config_overrides)
    bundle = build_preset("tiny", seed=seed, config=cfg, extra_words=extra_words)
    return save_janus(bundle, path)


def read_config_json(root: Path) -> dict:
    """``root/config.json`` as a dict; a missing or unreadable file is a ModelLoadError naming it."""
    cfg_file = root / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{root}: no config.json; expected a Hugging Face model directory")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({e})") from e


def is_original_format(raw_config: dict) -> bool:
    """Whether a config.json is DeepSeek's original Janus format (deepseek-ai/Janus-Pro-*), not transformers'."""
    return raw_config.get("model_type") == "multi_modality" or {"language_config", "gen_head_config"} <= set(raw_config)


def load_janus(
    path_or_preset: str, device: Union[str, torch.device] = "auto", dtype: Union[str, torch.dtype] = "auto",
    seed: int = 0,
) -> JanusBundle:
    """Load a Janus model from a local directory (HF format) or build a named preset.

    Errors name the path and what is wrong: missing directory, a config that is not
    Janus, weights that do not match the config.
    """
    dev = resolve_device(device) if isinstance(device, str) else device
    dt = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    if path_or_preset in PRESETS and not Path(path_or_preset).exists():
        return build_preset(path_or_preset, seed=seed, device=dev, dtype=dt)
    root = Path(path_or_preset)
    if not root.exists():
        raise ModelLoadError(
            f"model path {root} does not exist (and is not a preset: {', '.join(PRESETS)})"
        )
    raw = read_config_json(root)
    cfg_file = root / "config.json"
    if raw.get("model_type") != "janus":
        hint = ""
        if is_original_format(raw):
            hint = (f"; this is DeepSeek's original Janus format (deepseek-ai/Janus-Pro-*). Convert it with "
                    f"`ear-dist convert --from {root} --out {root}-hf`, or use the transformers-format copy "
                    "(deepseek-community/Janus-Pro-1B or -7B)")
        raise ModelLoadError(
            f"{cfg_file}: model_type is {raw.get('model_type')!r}, expected 'janus' (JanusForConditionalGeneration)"
            + hint)
    if not any(root.glob("*.safetensors")):
        pickled = sorted(p.name for p in root.glob("*.bin")) + sorted(p.name for p in root.glob("*.pt"))
        hint = (f" (only pickle files: {', '.join(pickled[:3])}; loading one can run code it carries: convert "
                "them to safetensors where you trust them)") if pickled else ""
        raise ModelLoadError(f"{root}: no *.safetensors weights found{hint}")
    try:
        model, info = JanusForConditionalGeneration.from_pretrained(
            root, dtype=dt, output_loading_info=True, local_files_only=True, use_safetensors=True
        )
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelLoadError(f"{root}: weights do not match config.json: {e}") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(f"{k}: {sorted(v)[:5]}{' ...' if len(v) > 5 else ''}" for k, v in bad.items())
        raise ModelLoadError(f"{root}: weights do not match config.json ({detail})")
    model.to(dev).eval()
    tokenizer = None
    if (root / "tokenizer.json").is_file() or (root / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    fmt_file = root / PROMPT_FORMAT_FILE
    if fmt_file.is_file():
        fmt = PromptFormat(**json.loads(fmt_file.read_text()))
    else:
        fmt = _janus_pro_format(tokenizer, model.config, root)
    if tokenizer is not None:
        check_tokenizer(tokenizer, fmt, model, root)
    _set_generation_defaults(model, fmt)
    return JanusBundle(model, tokenizer, fmt, str(root))


# A prompt whose words must come back with their spaces; the Janus-Pro template adds
# the newlines ("\n\n" before "<|Assistant|>:").
TOKENIZER_PROBE = "a photo of a church at night"
# The first transformers release that loads a byte-level tokenizer.json declared as
# LlamaTokenizerFast (how Janus-Pro ships) as byte-level; earlier 5.x releases put a
# SentencePiece pre-tokenizer in front of it, which drops every space and newline.
TRANSFORMERS_BYTE_LEVEL_FIX = "5.22.0"


def check_tokenizer(tokenizer, fmt: PromptFormat, model: JanusForConditionalGeneration, root: Path) -> None:
    """Refuse a tokenizer that would silently feed the model other text than the prompt.

    Encodes the prompt template around a probe and checks: BOS first (once), the text
    decodes back exactly (spaces and newlines survive), the prompt ends in
    begin-of-image, and BOS, pad and begin-of-image ids agree with the model's config
    and generation config. Errors name the directory, what came back, and the fix.
    """
    import transformers

    text = fmt.template.format(prompt=TOKENIZER_PROBE)
    ids = list(tokenizer(text)["input_ids"])
    where = f"{root}: tokenizer check"
    if not ids or ids[0] != fmt.bos_token_id or fmt.bos_token_id in ids[1:]:
        raise ModelLoadError(
            f"{where}: {text!r} encodes to ids starting {ids[:4]}, expected BOS id {fmt.bos_token_id} first and once; "
            "the tokenizer must add BOS itself (its post-processor or add_bos_token in tokenizer_config.json)")
    decoded = tokenizer.decode(ids[1:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if decoded != text:
        raise ModelLoadError(
            f"{where}: {text!r} decodes back as {decoded!r}, so spaces or newlines are lost and the model would "
            f"see other text than the prompt. transformers {transformers.__version__} loaded it as "
            f"{type(tokenizer).__name__}; byte-level tokenizers declared as LlamaTokenizerFast (as Janus-Pro's is) "
            f"load correctly from transformers {TRANSFORMERS_BYTE_LEVEL_FIX} on: pip install "
            f"'transformers>={TRANSFORMERS_BYTE_LEVEL_FIX},<6', or set \"tokenizer_class\": \"TokenizersBackend\" "
            f"in {root / 'tokenizer_config.json'}")
    if ids[-1] != fmt.boi_token_id:
        raise ModelLoadError(f"{where}: the prompt ends in id {ids[-1]}, expected begin-of-image "
                             f"({fmt.boi_token!r}, id {fmt.boi_token_id})")
    text_cfg = model.config.text_config
    gen_boi = (getattr(model.generation_config, "generation_kwargs", None) or {}).get("boi_token_id")
    expected = [("BOS", fmt.bos_token_id, text_cfg.bos_token_id, "config.json text_config.bos_token_id"),
                ("pad", fmt.pad_token_id, text_cfg.pad_token_id, "config.json text_config.pad_token_id"),
                ("begin-of-image", fmt.boi_token_id, gen_boi,
                 "generation_config.json generation_kwargs.boi_token_id")]
    for name, got, want, source in expected:
        if want is not None and got != want:
            raise ModelLoadError(f"{where}: the tokenizer's {name} id is {got}, but {source} says {want}; "
                                 "the tokenizer and the weights come from different checkpoints")


def _janus_pro_format(tokenizer, config: JanusConfig, root: Path) -> PromptFormat:
    """The chat format of released Janus-Pro checkpoints (no ear_dist prompt file present)."""
    if tokenizer is None:
        raise ModelLoadError(f"{root}: no tokenizer files; a Janus-Pro checkpoint needs its tokenizer")
    boi = tokenizer.convert_tokens_to_ids("<begin_of_image>")
    if boi is None or boi == tokenizer.unk_token_id:
        raise ModelLoadError(f"{root}: tokenizer has no <begin_of_image> token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.text_config.pad_token_id
    return PromptFormat(JANUS_PRO_TEMPLATE, "<begin_of_image>", int(pad), int(tokenizer.bos_token_id), int(boi))


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a prompt's positions do not depend on its batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def teacher_forced(
    model: JanusForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_tokens: torch.Tensor,
    return_logits: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """All image positions in one pass.

    Input sequence: prompt (ending in begin-of-image) followed by the embeddings of
    ``image_tokens[:, :-1]``. Output position i is the state that predicts image token i:
    ``hidden`` [B, T, H] is the last hidden state h(c, x_<i) and ``logits`` [B, T, V] the
    generation-head logits over the image codebook.
    """
    prompt_len = input_ids.shape[1]
    num_tokens = image_tokens.shape[1]
    text_embeds = model.get_input_embeddings()(input_ids)
    image_embeds = model.prepare_embeddings_for_image_generation(image_tokens[:, :-1])
    embeds = torch.cat([text_embeds, image_embeds.to(text_embeds.dtype)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(image_tokens.shape[0], num_tokens - 1)], dim=1)
    out = model.model.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
    )
    hidden = out.last_hidden_state[:, prompt_len - 1 :]
    logits = model.model.generation_head(hidden) if return_logits else None
    return hidden, logits


def unconditional_ids(input_ids: torch.Tensor, fmt: PromptFormat) -> torch.Tensor:
    """The CFG unconditional prompt: every token but BOS and begin-of-image becomes pad (as Janus does)."""
    keep = (input_ids == fmt.bos_token_id) | (input_ids == fmt.boi_token_id)
    return torch.where(keep, input_ids, torch.full_like(input_ids, fmt.pad_token_id))

