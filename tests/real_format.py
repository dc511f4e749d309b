"""A tiny Janus checkpoint in the format of the released transformers-format Janus-Pro.

What a user downloads (a transformers-format Janus-Pro directory) differs from ear-dist's
own tiny checkpoints in ways that break real pipelines: a byte-level BPE tokenizer whose
``tokenizer_config.json`` names ``LlamaTokenizerFast``, DeepSeek's special tokens
(``<｜begin▁of▁sentence｜>``, ``<｜▁pad▁｜>``, ``<begin_of_image>``, ...), a chat template,
the processor files that ``JanusProcessor`` loads, a generation config carrying the
begin-of-image id, and no ear-dist prompt file. ``save_real_format_checkpoint`` writes all
of that around a tiny random model, so tests load, prompt, train, merge and reload it
through the code a user runs.

``save_original_format_checkpoint`` writes the same tiny model the way DeepSeek's own
repositories store it (``pytorch_model.bin`` with the original key names and config), for
``ear-dist convert``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
IMAGE = "<image_placeholder>"
ROLES = ["<|User|>", "<|Assistant|>"]
SPECIAL_TOKENS = [BOS, EOS, PAD, BOI, EOI, IMAGE, *ROLES]

# Written for these tests from the format Janus-Pro's processor produces for text-to-image
# prompts: "<|User|>: {text}\n\n<|Assistant|>:" (the processor then appends begin-of-image).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|User|>: {% else -%}<|Assistant|>:{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '\\n\\n' }}{%- else -%}" + EOS + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|Assistant|>:{%- endif -%}"
)

# Enough text for a few hundred merges over the words the tests prompt with.
CORPUS = """
a photo of a church at night. a church in the snow, a red church on a hill.
a barn, a castle, a windmill, a lighthouse, a cinema and a theater by the river.
a painting in the style of van gogh; starry night over the village.
an oil painting of a cathedral and a chapel in the morning light.
a dog, a cat and a horse in a green field under a blue sky.
""" * 4


def build_byte_level_tokenizer(vocab_size: int = 420):
    """A byte-level BPE tokenizer with Janus's special tokens (ids first) that adds BOS, as Janus-Pro's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def save_real_format_checkpoint(path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random Janus with the tokenizer, processor and generation files of a real one."""
    from transformers import GenerationConfig, JanusForConditionalGeneration, JanusProcessor, PreTrainedTokenizerFast
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    from ear_dist.models.janus.presets import tiny_config

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_byte_level_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg = tiny_config(**config_overrides)
    text = cfg.text_config
    text.bos_token_id, text.eos_token_id, text.pad_token_id = ids[BOS], ids[EOS], ids[PAD]
    cfg.image_token_id = ids[IMAGE]
    if tok.get_vocab_size() > text.vocab_size:
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, text_config.vocab_size is {text.vocab_size}")

    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], guidance_scale=5.0,
        temperature=1.0, generation_kwargs={"boi_token_id": ids[BOI]})
    model.save_pretrained(out, safe_serialization=True)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI})
    side = cfg.vision_config.image_size
    processor = JanusProcessor(
        image_processor=JanusImageProcessorPil(size={"height": side, "width": side}), tokenizer=fast,
        chat_template=CHAT_TEMPLATE, num_image_tokens=cfg.vision_config.num_image_tokens)
    processor.save_pretrained(out)
    # The released checkpoints declare the Llama class over a byte-level tokenizer.json, the
    # combination some transformers 5.x versions load with spaces and newlines dropped.
    tc_file = out / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text())
    tc["tokenizer_class"] = "LlamaTokenizerFast"
    tc_file.write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    return out


def break_tokenizer_like_sentencepiece(directory) -> None:
    """Rewrite ``tokenizer.json`` as a LlamaTokenizer of transformers 5.0-5.21 loads a byte-level one:
    a SentencePiece (Metaspace) pre-tokenizer and decoder over the byte-level vocabulary, so spaces are lost."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    path = Path(directory) / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.save(str(path))
