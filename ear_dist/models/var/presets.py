"""Named shapes of the VAR family: ``tiny-var`` (CPU seconds) and ``infinity-2b`` (the released 2B shape).

``infinity-2b`` builds with random weights or on the meta device, for memory and speed
figures; real weights always come from a local directory (``ear_dist.models.var.storage``).
Its text encoder is flan-t5-xl's encoder shape (width 2048, 24 layers, 32 heads,
gated-GELU FFN of 5120, vocabulary 32128).
"""

from __future__ import annotations

from ear_dist.models.var.config import DecoderConfig, VarConfig

# 1024x1024 at aspect ratio 1: the 13 scales Infinity-2B samples (10521 positions).
INFINITY_1M_SCALES = ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32),
                      (40, 40), (48, 48), (64, 64))
TINY_SCALES = ((1, 1), (2, 2), (4, 4), (8, 8))


def tiny_var_config(embed_dim: int = 64, depth: int = 4, num_heads: int = 4, block_chunks: int = 2,
                    text_channels: int = 32, bits: int = 8, scales=TINY_SCALES, ffn_hidden: int = 128,
                    text_maxlen: int = 64) -> VarConfig:
    """A few blocks over ``scales`` (default 1, 2, 4, 8 on a side: 85 tokens) of ``bits``-bit tokens."""
    return VarConfig(embed_dim=embed_dim, depth=depth, num_heads=num_heads, text_channels=text_channels, bits=bits,
                     scales=tuple(tuple(s) for s in scales), ffn_hidden=ffn_hidden, block_chunks=block_chunks,
                     text_maxlen=text_maxlen, pool_head_dim=16,
                     decoder=DecoderConfig(base_channels=32, channel_mult=(1, 1), num_res_blocks=1, upsample_levels=1))


def infinity_2b_config() -> VarConfig:
    """Infinity-2B: width 2048, 32 blocks in 8 chunks, 16 heads, 32-bit tokens, the 1024x1024 schedule."""
    return VarConfig(embed_dim=2048, depth=32, num_heads=16, text_channels=2048, bits=32, scales=INFINITY_1M_SCALES,
                     block_chunks=8, text_maxlen=512, pool_head_dim=128, rope_reference=(64, 64),
                     decoder=DecoderConfig())


def tiny_t5_config(vocab_size: int = 512, d_model: int = 32):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
                    eos_token_id=2, decoder_start_token_id=0, is_encoder_decoder=False, use_cache=False)


def flan_t5_xl_encoder_config():
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32,
                    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1, is_encoder_decoder=False,
                    use_cache=False, tie_word_embeddings=False)


VAR_PRESETS = {
    "tiny-var": (tiny_var_config, tiny_t5_config),
    "infinity-2b": (infinity_2b_config, flan_t5_xl_encoder_config),
}
