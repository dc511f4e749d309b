"""The VAR family's model: saved and loaded like a user's, sampled scale by scale, teacher-forced in one pass."""

import json
import math

import numpy as np
import pytest
import torch

from ear_dist.models.family import as_image_model, load_model
from ear_dist.models.janus import ModelLoadError
from ear_dist.models.var.bsq import (bits_to_tokens, quantize_multiscale, summed_codes, teacher_forcing_inputs,
                                     token_bits)
from ear_dist.models.var.bundle import build_var_preset, load_var, save_tiny_var_checkpoint
from ear_dist.models.var.rollout import stepwise_logits

PROMPTS = ["a church at night", "a small barn in a field", "a castle"]


@pytest.fixture(scope="module")
def var_checkpoint(tmp_path_factory):
    return save_tiny_var_checkpoint(tmp_path_factory.mktemp("var") / "model", seed=0)


@pytest.fixture()
def var_bundle(var_checkpoint):
    return load_var(str(var_checkpoint), device="cpu", dtype="float32")


def test_teacher_forcing_equals_scale_by_scale_decoding(var_bundle):
    """The erasure step's one-pass forward computes what the KV-cached sampler computed, at every position."""
    cond, mask = var_bundle.encode_prompts(PROMPTS)
    tokens = var_bundle.rollout_ids(cond, mask, guidance_weight=3.0, seeds=[0, 1, 2])
    hidden, logits = var_bundle.teacher_forced(var_bundle.model, cond, mask, tokens)
    reference = stepwise_logits(var_bundle.model, cond, mask, tokens)
    assert hidden.shape == (3, var_bundle.num_image_tokens, var_bundle.hidden_size)
    assert logits.shape == reference.shape == (3, 85, 16)
    assert (logits - reference).abs().max().item() < 1e-5
    # and a prefix of whole scales is the same prefix of the full pass
    _, first_two = var_bundle.teacher_forced(var_bundle.model, cond, mask, tokens[:, :5])
    assert (first_two - logits[:, :5]).abs().max().item() < 1e-5


def test_greedy_cfg_sampling_takes_the_likelier_bit_of_the_guided_teacher_forced_logits(var_bundle):
    cond, mask = var_bundle.encode_prompts(PROMPTS)
    w = 4.0
    tokens = var_bundle.rollout_ids(cond, mask, guidance_weight=w, greedy=True)
    _, c = var_bundle.teacher_forced(var_bundle.model, cond, mask, tokens)
    _, u = var_bundle.teacher_forced(var_bundle.model, var_bundle.unconditional(cond), mask, tokens)
    guided = (u + w * (c - u)).reshape(3, 85, 8, 2)
    assert torch.equal(bits_to_tokens((guided[..., 1] > guided[..., 0]).long()), tokens)


def test_a_seed_gives_the_same_image_in_any_batch(var_bundle):
    both = var_bundle.sample(PROMPTS[:2], guidance_weight=3.0, seeds=[11, 12])
    alone = var_bundle.sample(PROMPTS[1:2], guidance_weight=3.0, seeds=[12])
    other_seed = var_bundle.sample(PROMPTS[1:2], guidance_weight=3.0, seeds=[13])
    assert torch.equal(both[1:], alone)
    assert not torch.equal(alone, other_seed)


def test_tokens_decode_to_images_through_the_bsq_decoder(var_bundle):
    cond, mask = var_bundle.encode_prompts(PROMPTS[:2])
    tokens = var_bundle.rollout_ids(cond, mask, seeds=[0, 1])
    images = var_bundle.decode(tokens)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])


def test_bits_are_most_significant_first_and_round_trip():
    tokens = torch.tensor([[0b10000001, 0, 255]])
    bits = token_bits(tokens, 8)
    assert bits[0, 0].tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert torch.equal(bits_to_tokens(bits), tokens)


def test_multiscale_quantization_feeds_teacher_forcing_what_it_quantized():
    """The tokenizer side: residual BSQ of a latent. The summed codes approach the latent, and the
    next-scale inputs teacher forcing builds from the tokens are the running sums the quantizer saw."""
    scales = ((1, 1), (2, 2), (4, 4), (8, 8))
    latent = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = quantize_multiscale(latent, scales)
    assert tokens.shape == (2, 85)
    fine_replaced = torch.cat([tokens[:, :21], quantize_multiscale(torch.zeros(2, 8, 8, 8), scales)[:, 21:]], 1)
    err_all = (summed_codes(tokens, scales, 8) - latent).norm() / latent.norm()
    err_replaced = (summed_codes(fine_replaced, scales, 8) - latent).norm() / latent.norm()
    assert err_all < err_replaced
    inputs = teacher_forcing_inputs(tokens, scales, 8)
    assert inputs.shape == (2, 84, 8)
    # scale 2's input is the 1x1 code spread over 2x2
    code0 = (token_bits(tokens[:, 0], 8).float() * 2 - 1) / math.sqrt(8)
    assert torch.allclose(inputs[:, :4], code0[:, None, :].expand(2, 4, 8), atol=1e-6)


def test_released_state_dict_layout_loads_from_torch_files(tmp_path, var_bundle):
    """A directory in the released format: torch checkpoints read with weights_only, the transformer's zero
    buffers present, the tokenizer's decoder under "vae" with wrapped conv/norm names, T5 beside them."""
    d = tmp_path / "released"
    d.mkdir()
    state = dict(var_bundle.model.state_dict())
    for name, module in var_bundle.model.named_modules():
        if name.endswith((".sa", ".ca")):
            state[f"{name}.zero_k_bias"] = torch.zeros(var_bundle.config.embed_dim)
    torch.save(state, d / "infinity_tiny.pth")
    wrapped = {}
    for k, v in var_bundle.decoder.state_dict().items():
        if ".norm" in k or k.startswith("norm_out"):
            k = k.replace(".weight", ".norm.weight").replace(".bias", ".norm.bias")
        elif "conv" in k or "nin_shortcut" in k:
            k = k.replace(".weight", ".conv.weight").replace(".bias", ".conv.bias")
        wrapped[f"decoder.{k}"] = v
    torch.save({"vae": wrapped}, d / "infinity_vae_tiny.pth")
    var_bundle.text_encoder.save_pretrained(d / "t5")
    var_bundle.tokenizer.save_pretrained(d / "t5")
    (d / "var_config.json").write_text(json.dumps({"config": var_bundle.config.to_dict(),
                                                   "transformer": "infinity_tiny.pth",
                                                   "vae": "infinity_vae_tiny.pth", "text_encoder": "t5"}))
    loaded = load_model(str(d), "var", device="cpu", dtype="float32")
    cond, mask = var_bundle.encode_prompts(PROMPTS)
    tokens = var_bundle.rollout_ids(cond, mask, seeds=[0, 1, 2])
    _, expect = var_bundle.teacher_forced(var_bundle.model, cond, mask, tokens)
    c2, m2 = loaded.encode_prompts(PROMPTS)
    _, got = loaded.teacher_forced(loaded.model, c2, m2, tokens)
    assert torch.equal(got, expect)
    assert np.array_equal(loaded.decode(tokens), var_bundle.decode(tokens))


def test_infinity_2b_shape_has_the_released_names_and_size():
    bundle = build_var_preset("infinity-2b", meta=True)
    params = dict(bundle.model.named_parameters())
    expected = {
        "cfg_uncond": (512, 2048), "text_norm.weight": (2048,), "text_proj_for_sos.ca.mat_q": (1, 16, 128),
        "text_proj_for_sos.ca.mat_kv.weight": (4096, 2048), "text_proj_for_ca.2.weight": (2048, 2048),
        "pos_start": (1, 1, 2048), "lvl_embed.weight": (15, 2048), "word_embed.weight": (2048, 32),
        "shared_ada_lin.1.weight": (12288, 2048), "block_chunks.7.module.3.ada_gss": (1, 1, 6, 2048),
        "block_chunks.0.module.0.sa.mat_qkv.weight": (6144, 2048), "block_chunks.0.module.0.sa.scale_mul_1H11":
        (1, 16, 1, 1), "block_chunks.0.module.0.ca.mat_kv.weight": (4096, 2048),
        "block_chunks.0.module.0.ffn.fc1.weight": (8192, 2048), "block_chunks.0.module.0.ca_norm.weight": (2048,),
        "head_nm.ada_lin.1.weight": (4096, 2048), "head.weight": (64, 2048),
    }
    for name, shape in expected.items():
        assert tuple(params[name].shape) == shape, name
    assert bundle.num_image_tokens == 10521
    total = sum(p.numel() for p in params.values())
    assert 2.0e9 < total < 2.3e9  # Infinity-2B
    decoder = dict(bundle.decoder.named_parameters())
    assert tuple(decoder["conv_in.weight"].shape) == (512, 32, 3, 3)
    assert tuple(decoder["up.1.upsample.conv.weight"].shape) == (256, 256, 3, 3)


def test_the_model_builds_under_a_device_context_with_the_same_unconditional_embedding():
    """Built under ``with torch.device(...)`` (how a GPU benchmark avoids initialising billions of parameters on
    the CPU), the seeded unconditional text embedding lands on that device and keeps the CPU build's values. On
    an H100 a CPU generator filling a CUDA tensor failed here ("Expected a 'cuda' device type for generator");
    a CPU machine can check the placement (meta) and the values, not that CUDA error."""
    from ear_dist.models.var.model import VarTransformer
    from ear_dist.models.var.presets import tiny_var_config

    cfg = tiny_var_config()
    on_cpu = VarTransformer(cfg).cfg_uncond
    with torch.device("meta"):
        elsewhere = VarTransformer(cfg).cfg_uncond
    assert on_cpu.device.type == "cpu" and elsewhere.device.type == "meta"
    drawn = torch.empty(cfg.text_maxlen, cfg.text_channels)
    torch.nn.init.trunc_normal_(drawn, std=1.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(on_cpu.detach(), drawn / cfg.text_channels ** 0.5)


def test_loading_names_the_file_and_the_problem(tmp_path, var_checkpoint):
    with pytest.raises(ValueError, match="set model.family=var"):
        load_model(str(var_checkpoint), "janus")
    with pytest.raises(ValueError, match="set model.family=janus"):
        load_model("tiny", "var")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "var_config.json").write_text(json.dumps({"preset": "tiny-var", "transformer": "missing.pth",
                                                     "vae": "vae.safetensors", "text_encoder": "t5"}))
    with pytest.raises(ModelLoadError, match="missing.pth"):
        load_var(str(bad))
    small = tmp_path / "small"
    save_tiny_var_checkpoint(small, embed_dim=32)
    meta = json.loads((small / "var_config.json").read_text())
    meta["config"]["embed_dim"] = 64
    (small / "var_config.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=r"transformer.safetensors: weights do not match.*wrong shape"):
        load_var(str(small))


def test_teacher_forcing_refuses_a_split_scale(var_bundle):
    cond, mask = var_bundle.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="whole scales"):
        var_bundle.teacher_forced(var_bundle.model, cond, mask, torch.zeros(1, 7, dtype=torch.long))


def test_trainable_layers_are_the_blocks(var_bundle):
    from ear_dist.config import TrainableConfig
    from ear_dist.train.trainable import select_trainable_names

    attention = select_trainable_names(var_bundle.model, TrainableConfig(first_k_layers=3, modules="attention"))
    assert attention and all(".sa." in n for n in attention)
    assert {n.split(".sa.")[0] for n in attention} == {"block_chunks.0.module.0", "block_chunks.0.module.1",
                                                      "block_chunks.1.module.0"}
    everything = select_trainable_names(var_bundle.model, TrainableConfig(first_k_layers=1, modules="all"))
    assert any(".ffn." in n for n in everything) and any(".ca." in n for n in everything)
    assert as_image_model(var_bundle) is var_bundle



def test_a_query_with_one_key_gets_v_and_exactly_zero_query_and_key_gradients():
    """The 1x1 scale attends only to itself: the output is v (what the fused kernel gives) and q, k get no
    rounding residue in their gradients, which Adam would magnify into updates that depend on the batch split."""
    import torch.nn.functional as F

    from ear_dist.models.var.model import SelfAttention, apply_rope

    torch.manual_seed(0)
    attn = SelfAttention(32, 4)
    with torch.no_grad():
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    x = torch.randn(3, 1, 32)
    angles = torch.rand(1, 4)
    rope = torch.stack([angles.cos(), angles.sin()])  # [2, L=1, head_dim/2]
    out = attn(x, rope)
    out.pow(2).sum().backward()
    e = 32
    assert attn.mat_qkv.weight.grad[: 2 * e].abs().max() == 0 and attn.q_bias.grad.abs().max() == 0
    assert attn.scale_mul_1H11.grad.abs().max() == 0 and attn.mat_qkv.weight.grad[2 * e:].abs().max() > 0
    # the same value as the fused attention
    with torch.no_grad():
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        q, k, v = (attn.mat_qkv(x) + bias).view(3, 1, 3, 4, 8).permute(2, 0, 3, 1, 4)
        q = apply_rope(F.normalize(q, dim=-1) * attn.scale_mul_1H11.exp(), rope)
        k = apply_rope(F.normalize(k, dim=-1), rope)
        ref = attn.proj(F.scaled_dot_product_attention(q, k, v, scale=1.0).transpose(1, 2).reshape(3, 1, 32))
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=1e-6)
