"""The Janus adapter: what a user loading, sampling and decoding a model would notice."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, JanusForConditionalGeneration

from ear_dist.models.images import decode_tokens, make_grid
from ear_dist.models.janus import (
    ModelLoadError,
    build_preset,
    load_janus,
    save_tiny_checkpoint,
    teacher_forced,
    unconditional_ids,
)
from ear_dist.models.janus.rollout import rollout, rollout_ids

PROMPTS = ["a photo of a church", "a red barn in a snowy field at night", "castle"]


def test_checkpoint_round_trip_loads_in_ours_and_plain_transformers(tiny_checkpoint):
    ours = load_janus(str(tiny_checkpoint), device="cpu", dtype="float32")
    plain = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    built = build_preset("tiny", seed=0)
    for (n, a), (_, b), (_, c) in zip(
        ours.model.state_dict().items(), plain.state_dict().items(), built.model.state_dict().items()
    ):
        assert torch.equal(a, b), n
        assert torch.equal(a, c), n
    assert ours.tokenizer is not None and ours.prompt_format.boi_token_id == built.prompt_format.boi_token_id


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_janus(str(tmp_path / "nope"))


def test_non_janus_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="model_type is 'llama'"):
        load_janus(str(tmp_path))


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_janus(str(tmp_path))


def test_weights_that_do_not_match_the_config_are_a_clear_error(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m", seed=0)
    cfg = json.loads((path / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96  # the saved MLP weights are 128 wide
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="weights do not match"):
        load_janus(str(path), device="cpu")


def test_missing_tensor_is_a_clear_error(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "m", seed=0)
    f = next(path.glob("*.safetensors"))
    tensors = load_file(f)
    dropped = next(k for k in tensors if "generation_head" in k)
    del tensors[dropped]
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="missing_keys"):
        load_janus(str(path), device="cpu")


def test_empty_prompt_is_rejected(tiny_bundle):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_bundle.encode_prompts(["a church", "  "])


def test_teacher_forced_pass_equals_step_by_step_decoding(tiny_bundle):
    """The parallel pass must give the logits that token-by-token decoding with a KV cache gives."""
    model = tiny_bundle.model
    ids, mask = tiny_bundle.encode_prompts(PROMPTS)  # different lengths: left padding is exercised
    tokens = rollout_ids(tiny_bundle, ids, mask, guidance_weight=1.0, temperature=1.0, seeds=[1, 2, 3])
    with torch.no_grad():
        hidden, logits = teacher_forced(model, ids, mask, tokens)
        step_logits = []
        lm = model.model.language_model
        from transformers import DynamicCache

        from ear_dist.models.janus import position_ids_from_mask

        cache = DynamicCache()
        pos = position_ids_from_mask(mask)
        out = lm(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, position_ids=pos,
                 past_key_values=cache, use_cache=True)
        cur_mask, cur_pos = mask, pos[:, -1:]
        for i in range(tokens.shape[1]):
            step_logits.append(model.model.generation_head(out.last_hidden_state[:, -1]))
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones(len(PROMPTS), 1)], 1)
            cur_pos = cur_pos + 1
            emb = model.prepare_embeddings_for_image_generation(tokens[:, i : i + 1])
            out = lm(inputs_embeds=emb, attention_mask=cur_mask, position_ids=cur_pos, past_key_values=cache,
                     use_cache=True)
    assert hidden.shape == (3, tiny_bundle.num_image_tokens, model.config.text_config.hidden_size)
    torch.testing.assert_close(logits, torch.stack(step_logits, 1), rtol=1e-4, atol=1e-5)


def test_rollout_matches_transformers_generate_token_for_token(tiny_bundle):
    ids, mask = tiny_bundle.encode_prompts(PROMPTS)
    ours = rollout_ids(tiny_bundle, ids, mask, guidance_weight=5.0, greedy=True)
    gc = GenerationConfig(
        bos_token_id=tiny_bundle.prompt_format.bos_token_id, pad_token_id=tiny_bundle.prompt_format.pad_token_id,
        generation_kwargs={"boi_token_id": tiny_bundle.prompt_format.boi_token_id}, do_sample=False,
        max_new_tokens=tiny_bundle.num_image_tokens, guidance_scale=5,
    )
    ref = tiny_bundle.model.generate(ids, attention_mask=mask, generation_mode="image", generation_config=gc)
    assert torch.equal(ours, ref)


def test_unconditional_rows_keep_only_bos_and_boi(tiny_bundle):
    ids, _ = tiny_bundle.encode_prompts(["a church"])
    fmt = tiny_bundle.prompt_format
    uncond = unconditional_ids(ids, fmt)
    assert uncond[0, 0] == fmt.bos_token_id and uncond[0, -1] == fmt.boi_token_id
    assert (uncond[0, 1:-1] == fmt.pad_token_id).all()


def test_a_seed_gives_the_same_image_whatever_the_batch(tiny_bundle):
    alone = rollout(tiny_bundle, ["a photo of a church"], seeds=[7], top_k=8)
    batched = rollout(tiny_bundle, ["a red barn in a snowy field at night", "a photo of a church"], seeds=[3, 7], top_k=8)
    assert torch.equal(alone[0], batched[1])
    other_seed = rollout(tiny_bundle, ["a photo of a church"] * 4, seeds=[8, 9, 10, 11], top_k=8)
    assert not all(torch.equal(alone[0], t) for t in other_seed)


def test_top_k_one_is_greedy(tiny_bundle):
    greedy = rollout(tiny_bundle, PROMPTS, greedy=True)
    top1 = rollout(tiny_bundle, PROMPTS, top_k=1, seeds=[0, 1, 2], temperature=0.7)
    assert torch.equal(greedy, top1)
    assert greedy.min() >= 0 and greedy.max() < tiny_bundle.codebook_size


def test_decode_and_grid(tiny_bundle):
    tokens = rollout(tiny_bundle, PROMPTS[:2], greedy=True)
    images = decode_tokens(tiny_bundle.model, tokens)
    assert images.dtype.name == "uint8" and images.shape[0] == 2 and images.shape[-1] == 3
    grid = make_grid(images, cols=2, cell=32, labels=PROMPTS[:2])
    assert grid.size[0] > 64


def test_7b_preset_has_the_published_shape_on_meta():
    b = build_preset("janus-pro-7b", meta=True)
    cfg = b.model.config
    assert cfg.text_config.hidden_size == 4096 and cfg.text_config.num_hidden_layers == 30
    assert cfg.text_config.intermediate_size == 11008 and cfg.text_config.vocab_size == 102400
    assert b.model.model.generation_head.vision_head.weight.shape == (16384, 4096)
    assert b.num_image_tokens == 576
    assert b.model.model.generation_embeddings.weight.is_meta
    n = sum(p.numel() for p in b.model.parameters())
    assert 6.5e9 < n < 7.6e9, n
