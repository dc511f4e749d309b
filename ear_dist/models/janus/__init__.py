"""The Janus family: Janus-Pro through transformers' ``JanusForConditionalGeneration``.

``bundle``: load, save, the presets' builds and the teacher-forced forward; ``presets``:
named shapes and the tiny word-level tokenizer; ``rollout``: CFG rollouts with a static
KV cache (the eager loop), ``decode``: the lean decode path; ``convert``: DeepSeek's
original format -> the transformers format. What the rest of ear-dist imports from the
family is re-exported here (``from ear_dist.models.janus import load_janus``).
"""

from ear_dist.models.janus.bundle import (
    PROMPT_FORMAT_FILE,
    JanusBundle,
    ModelLoadError,
    PromptTooLongError,
    build_preset,
    check_tokenizer,
    grid_side,
    image_token_count,
    is_original_format,
    load_janus,
    position_ids_from_mask,
    read_config_json,
    resolve_device,
    resolve_dtype,
    save_janus,
    save_tiny_checkpoint,
    teacher_forced,
    unconditional_ids,
)

__all__ = [
    "PROMPT_FORMAT_FILE", "JanusBundle", "ModelLoadError", "PromptTooLongError", "build_preset", "check_tokenizer", "grid_side",
    "image_token_count", "is_original_format", "load_janus", "position_ids_from_mask", "read_config_json",
    "resolve_device", "resolve_dtype", "save_janus", "save_tiny_checkpoint", "teacher_forced", "unconditional_ids",
]
