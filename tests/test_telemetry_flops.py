"""MFU is only as good as its FLOPs formula: check it by hand and against real module sizes."""

import pytest
import torch
from transformers import JanusConfig, JanusForConditionalGeneration, LlamaConfig
from transformers.models.janus.configuration_janus import JanusVisionConfig, JanusVQVAEConfig

from ear_dist.telemetry.flops import (
    executed_train_flops_per_token,
    frozen_forward_flops_per_token,
    janus_flops_shape,
    mfu,
    peak_flops,
    rollout_flops,
    train_flops_per_token,
)


def tiny_config() -> JanusConfig:
    text = LlamaConfig(
        hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=4, intermediate_size=16, vocab_size=50,
    )
    vision = JanusVisionConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16,
        projection_dim=8, depth=2,
    )
    vq = JanusVQVAEConfig(
        embed_dim=4, num_embeddings=32, projection_dim=8, image_token_embed_dim=8, num_hidden_layers=2,
        base_channels=32, channel_multiplier=[1, 1], latent_channels=32, num_res_blocks=1,
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq)


def janus_pro_7b_config() -> JanusConfig:
    text = LlamaConfig(
        hidden_size=4096, num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=102400,
    )
    vision = JanusVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, projection_dim=4096, depth=2)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, projection_dim=4096, image_token_embed_dim=4096, num_hidden_layers=2)
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq)


def n_params_on_path(model) -> int:
    """Sum the real parameters of the modules that the docstring says make N."""
    inner = model.model
    lm = inner.language_model
    modules = [*lm.layers, lm.norm, inner.generation_aligner, inner.generation_head]
    return sum(p.numel() for m in modules for p in m.parameters())


def test_tiny_config_by_hand():
    shape = janus_flops_shape(tiny_config())
    # one decoder layer: q 8*(2*4)=64, k 8*(1*4)=32, v 32, o 64          -> 192
    #                    gate 8*16=128, up 128, down 16*8=128             -> 384
    #                    two RMSNorm weights 2*8                          ->  16   = 592
    assert shape.decoder_layer_params == 192 + 384 + 16 == 592
    # two layers + final norm 8                                           -> 1192
    assert shape.decoder_params == 2 * 592 + 8 == 1192
    # aligner: fc1 4*8+8 = 40, one hidden layer 8*8+8 = 72                -> 112
    assert shape.gen_aligner_params == 40 + 72 == 112
    # head: proj_out 8*8+8 = 72, vision_head 8*32+32 = 288                -> 360
    assert shape.gen_head_params == 72 + 288 == 360
    assert shape.n_params == 1192 + 112 + 360 == 1664
    assert shape.num_layers == 2 and shape.attention_width == 8

    # training, s = 10: 6*1664 + 12*2*8*10 = 9984 + 1920
    assert train_flops_per_token(shape, seq_len=10) == 9984 + 1920 == 11904
    # frozen forward, s = 10: 2*1664 + 4*2*8*10 = 3328 + 640
    assert frozen_forward_flops_per_token(shape, seq_len=10) == 3328 + 640 == 3968

    # rollout, prompt 3 tokens, 4 image tokens, one prompt, CFG:
    #   decode: 2*1664*4 = 13312; cached contexts 3+4+5+6 = 18 -> 4*(2*8)*18 = 1152
    #   prefill: 3 * (2*1664 + 4*2*8*3) = 3 * 3520 = 10560
    #   one row 13312 + 1152 + 10560 = 25024, two rows (CFG) 50048
    assert rollout_flops(shape, prompt_len=3, num_image_tokens=4, batch_size=1, guided=True) == 50048
    assert rollout_flops(shape, prompt_len=3, num_image_tokens=4, guided=False, include_prefill=False) == 13312 + 1152
    assert rollout_flops(shape, prompt_len=3, num_image_tokens=4, batch_size=3, guided=False) == 3 * 25024

    # only layer 1's attention trainable (192 params), s = 10:
    #   forward 2*1664 + 4*2*8*10 = 3968
    #   input grads through layer 1, final norm and head: 2*(592 + 8 + 360) = 1920
    #   weight grads 2*192 = 384; attention backward of layer 1: 8*8*10 = 640
    assert executed_train_flops_per_token(shape, 10, trainable_params=192, lowest_trainable_layer=1) == (
        3968 + 1920 + 384 + 640
    )
    # everything trainable: the 6N formula minus the aligner's unneeded input gradient 2*112
    assert executed_train_flops_per_token(shape, 10, trainable_params=1664, lowest_trainable_layer=0) == 11904 - 224
    with pytest.raises(ValueError, match="lowest_trainable_layer"):
        executed_train_flops_per_token(shape, 10, trainable_params=1, lowest_trainable_layer=2)


def test_tiny_analytic_count_matches_the_built_model():
    model = JanusForConditionalGeneration(tiny_config())
    assert janus_flops_shape(model.config).n_params == n_params_on_path(model) == 1664


def test_janus_pro_7b_shape_on_meta_device():
    config = janus_pro_7b_config()
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - 6.99e9) / 6.99e9 < 0.005, total

    shape = janus_flops_shape(config)
    assert shape.n_params == n_params_on_path(model)
    # per layer 4*4096^2 + 3*4096*11008 + 2*4096 = 202,383,360; x30 + 4096 = 6,071,504,896
    # aligner 8*4096+4096 + 4096^2+4096 = 16,818,176; head 4096^2+4096 + 4096*16384+16384 = 83,906,560
    assert shape.n_params == 6_071_504_896 + 16_818_176 + 83_906_560 == 6_172_229_632
    # the project's janus-pro-7b preset (untied text lm_head, outside N) has the same N
    from ear_dist.models.janus.presets import preset_config

    assert janus_flops_shape(preset_config("janus-pro-7b")).n_params == 6_172_229_632
    # a student step on a 600-token sequence: 6N + 12*30*4096*600
    assert train_flops_per_token(shape, 600) == 6 * 6_172_229_632 + 12 * 30 * 4096 * 600


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("NVIDIA H100 NVL", "bfloat16") == 835e12
    assert peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5e12
    assert peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert peak_flops("NVIDIA L4", "fp32") == 30.3e12
    assert peak_flops("cpu", "float32") is None
    assert peak_flops("Some Future Accelerator", "bfloat16") is None
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    assert mfu(1e12, None) is None
