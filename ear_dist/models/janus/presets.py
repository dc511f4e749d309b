"""Named Janus shapes and the tiny word-level tokenizer.

``tiny`` is a real ``JanusForConditionalGeneration`` small enough to build in a few
milliseconds on a CPU (tests, CI, the demo). ``janus-pro-1b`` / ``janus-pro-7b`` are
the published shapes, buildable with random weights or on the meta device for speed
and memory benchmarks; real weights always come from a local directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from transformers import JanusConfig, LlamaConfig
from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

# Special tokens of the tiny tokenizer, in id order.
TINY_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>", "<boi>", "<image>"]
TINY_PAD, TINY_BOS, TINY_EOS, TINY_UNK, TINY_BOI, TINY_IMAGE = range(6)

# A small general vocabulary so `ear-dist generate` on the tiny preset tokenizes
# ordinary prompts; worlds that train a tiny model pass their own word list.
BASE_WORDS = """
a an the of in on at by with and or to from for into over under near behind beside
is are this that it its his her their my your our one two three four five many some
photo picture painting image drawing sketch render portrait view scene style art
red orange yellow green blue purple pink white black grey gray brown gold silver
old new small big large tall tiny huge ancient modern dark bright quiet busy empty
beautiful famous wooden stone glass brick snowy rainy sunny foggy misty cozy grand
church chapel cathedral cinema theater barn castle lighthouse windmill tower bridge
house temple mosque school hospital museum library station market farm city town
village street road river lake sea ocean beach mountain hill forest field garden
park desert island sky cloud sun moon star night day morning evening sunset sunrise
winter summer spring autumn snow rain storm light shadow water tree flower grass
dog cat horse bird cow sheep car bus train boat ship plane bicycle man woman child
people person girl boy van gogh monet picasso rembrandt vermeer dali style oil
watercolor photograph realistic cartoon anime digital detailed high quality
""".split()


@dataclass(frozen=True)
class PromptFormat:
    """How a user prompt becomes model input text.

    ``template`` holds ``{prompt}``; the tokenizer adds BOS; the text ends with the
    begin-of-image token so the next position predicts the first image token.
    """

    template: str
    boi_token: str
    pad_token_id: int
    bos_token_id: int
    boi_token_id: int


JANUS_PRO_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>"
TINY_TEMPLATE = "{prompt} <boi>"


def tiny_vocabulary(extra_words: Optional[Iterable[str]] = None) -> list[str]:
    """Special tokens, then the base words, then ``extra_words`` (deduplicated, order kept)."""
    seen: dict[str, None] = {}
    for w in list(TINY_SPECIALS) + BASE_WORDS + [w.lower() for w in (extra_words or [])]:
        seen.setdefault(w, None)
    return list(seen)


def build_word_tokenizer(extra_words: Optional[Iterable[str]] = None):
    """A word-level ``PreTrainedTokenizerFast`` (lowercasing, punctuation split, <unk>)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(tiny_vocabulary(extra_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", TINY_BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<boi>", "<image>"],
    )
    fast.padding_side = "left"
    return fast


def tiny_config(
    text_vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 6,
    num_heads: int = 4,
    intermediate_size: int = 128,
    grid_side: int = 4,
    codebook_size: int = 64,
) -> JanusConfig:
    """A few-layer Janus: ``grid_side**2`` image tokens over ``codebook_size`` codes."""
    text = LlamaConfig(
        vocab_size=text_vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=512,
        pad_token_id=TINY_PAD,
        bos_token_id=TINY_BOS,
        eos_token_id=TINY_EOS,
        tie_word_embeddings=False,
    )
    patch = 4
    vision = JanusVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=grid_side * patch,
        patch_size=patch,
        projection_dim=hidden_size,
        num_image_tokens=grid_side * grid_side,
        depth=1,
    )
    # GroupNorm(32) in the VQ decoder needs channel counts divisible by 32.
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=codebook_size,
        latent_channels=32,
        base_channels=32,
        channel_multiplier=[1, 1, 1],
        num_res_blocks=1,
        projection_dim=hidden_size,
        image_token_embed_dim=hidden_size,
        num_hidden_layers=2,
    )
    return JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=TINY_IMAGE, tie_word_embeddings=False
    )


def janus_pro_config(size: str) -> JanusConfig:
    """The published Janus-Pro shapes (1B, 7B): 384x384 images, 24x24 = 576 tokens, codebook 16384."""
    if size == "7b":
        hidden, layers, heads, inter = 4096, 30, 32, 11008
    elif size == "1b":
        hidden, layers, heads, inter = 2048, 24, 16, 5632
    else:
        raise ValueError(f"unknown Janus-Pro size {size!r} (expected 1b or 7b)")
    text = LlamaConfig(
        vocab_size=102400,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
        pad_token_id=100015,
        bos_token_id=100000,
        eos_token_id=100001,
        tie_word_embeddings=False,
    )
    vision = JanusVisionConfig(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=384,
        patch_size=16,
        projection_dim=hidden,
        num_image_tokens=576,
        depth=2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=8,
        num_embeddings=16384,
        projection_dim=hidden,
        image_token_embed_dim=hidden,
        num_hidden_layers=2,
    )
    return JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=100581, tie_word_embeddings=False
    )


PRESETS = {
    "tiny": tiny_config,
    "janus-pro-1b": lambda: janus_pro_config("1b"),
    "janus-pro-7b": lambda: janus_pro_config("7b"),
}


def preset_config(name: str) -> JanusConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def tiny_prompt_format() -> PromptFormat:
    return PromptFormat(TINY_TEMPLATE, "<boi>", TINY_PAD, TINY_BOS, TINY_BOI)
