"""A checkpoint in the released format, end to end: load, prompt, erase in bf16, merge, reload with transformers.

The fixture (tests/real_format.py) is a tiny Janus saved as the transformers-format
Janus-Pro is: a byte-level BPE tokenizer declared as LlamaTokenizerFast, DeepSeek's
special tokens, a chat template, the processor files and no ear-dist prompt file.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import JanusForConditionalGeneration, JanusProcessor

from ear_dist.cli import main
from ear_dist.models.delta import DeltaError, apply_deltas
from ear_dist.models.fingerprint import model_fingerprint
from ear_dist.models.janus import ModelLoadError, load_janus, save_tiny_checkpoint
from tests.real_format import BOI, break_tokenizer_like_sentencepiece, save_real_format_checkpoint

PAIRS = [
    {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
    {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"},
]


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    return save_real_format_checkpoint(tmp_path_factory.mktemp("real") / "Janus-Pro-tiny", seed=0)


def _fingerprint(path, dtype):
    return model_fingerprint(load_janus(str(path), device="cpu", dtype=dtype).model)


# ---------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_the_same_across_dtypes_paths_and_load_routes(real_model, tmp_path):
    """A delta trained in bf16 from an absolute path merges into the model loaded in fp32 from a copy."""
    copy = shutil.copytree(real_model, tmp_path / "elsewhere" / "copy")
    fp = _fingerprint(real_model, "float32")
    assert _fingerprint(real_model, "bfloat16") == fp
    assert _fingerprint(copy, "float32") == fp
    # a bf16 checkpoint of the same weights, loaded in any of the three dtypes
    bf16 = load_janus(str(real_model), device="cpu", dtype="bfloat16").model
    bf16.save_pretrained(tmp_path / "bf16")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(real_model / name, tmp_path / "bf16" / name)
    for dtype in ("bfloat16", "float32", "float16"):
        assert _fingerprint(tmp_path / "bf16", dtype) == fp, dtype


def test_fingerprint_differs_for_other_weights(real_model, tmp_path):
    fp = _fingerprint(real_model, "float32")
    assert _fingerprint(save_real_format_checkpoint(tmp_path / "seed1", seed=1), "float32") != fp
    model = load_janus(str(real_model), device="cpu", dtype="float32").model
    with torch.no_grad():  # one attention matrix of one layer changed, as an erasure changes them
        model.model.language_model.layers[0].self_attn.q_proj.weight.mul_(1.01)
    assert model_fingerprint(model) != fp


# ---------------------------------------------------------------------------- loading and prompting


def test_prompts_encode_as_janus_processor_encodes_them(real_model):
    """The training prompt is the chat format plus begin-of-image, token for token what JanusProcessor gives."""
    bundle = load_janus(str(real_model), device="cpu", dtype="float32")
    processor = JanusProcessor.from_pretrained(real_model)
    prompt = "a red church in the snow"
    chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True)
    assert chat == f"<|User|>: {prompt}\n\n<|Assistant|>:"
    expected = processor(text=chat, generation_mode="image", return_tensors="pt")["input_ids"]
    ids, _ = bundle.encode_prompts([prompt])
    assert ids.tolist() == expected.tolist()
    assert bundle.tokenizer.convert_ids_to_tokens(ids[0, -1].item()) == BOI


def test_a_tokenizer_that_drops_spaces_is_refused_with_the_fix(real_model, tmp_path):
    broken = shutil.copytree(real_model, tmp_path / "broken")
    break_tokenizer_like_sentencepiece(broken)
    with pytest.raises(ModelLoadError, match=r"spaces or newlines are lost.*transformers>=5\.22\.0.*TokenizersBackend"):
        load_janus(str(broken), device="cpu")


def test_a_tokenizer_from_another_checkpoint_is_refused(real_model, tmp_path):
    other = shutil.copytree(real_model, tmp_path / "other")
    gen = json.loads((other / "generation_config.json").read_text())
    gen["generation_kwargs"]["boi_token_id"] += 1
    (other / "generation_config.json").write_text(json.dumps(gen))
    with pytest.raises(ModelLoadError, match="begin-of-image id is .* generation_kwargs.boi_token_id says"):
        load_janus(str(other), device="cpu")


def test_an_original_format_checkpoint_points_at_convert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "multi_modality", "language_config": {}}))
    with pytest.raises(ModelLoadError, match=r"original Janus format.*ear-dist convert --from"):
        load_janus(str(tmp_path), device="cpu")


# ---------------------------------------------------------------------------- the chain a user runs


@pytest.mark.slow
def test_erase_in_bf16_then_merge_then_load_and_generate_with_plain_transformers(real_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    # trained from the absolute path in bf16 (what `ear-dist submit` writes on a GPU) ...
    assert main(["erase", "--no-progress", "--set", f"model.path={real_model}", "--set", "model.dtype=bfloat16",
                 "--set", "data.pairs=pairs.json", "--set", "train.out_dir=run", "--set", "train.steps=2",
                 "--set", "erase.window_len=4", "--set", "optim.lr=1e-2", "--set", "erase.loss_threshold=0"]) == 0
    delta = load_file("run/delta.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in delta.values())
    # ... merged into the base given by another path, with the eval report in the card
    shutil.copytree(real_model, "base")
    (tmp_path / "report.json").write_text(json.dumps({"table1": [
        {"model": "base", "church Acc.": 1.0, "FID": 25.4}, {"model": "erased", "church Acc.": 0.11, "FID": 29.6}]}))
    assert main(["merge", "--base", "base", "--delta", "run/delta.safetensors", "--out", "merged",
                 "--dtype", "bfloat16", "--eval-report", "report.json",
                 "--base-model-id", "deepseek-community/Janus-Pro-1B"]) == 0

    merged = tmp_path / "merged"
    base_files = {p.name for p in real_model.iterdir()} - {"model.safetensors"}
    assert base_files <= {p.name for p in merged.iterdir()}
    for name in base_files - {"config.json"}:  # every non-weight file is the base's own
        assert (merged / name).read_bytes() == (real_model / name).read_bytes(), name
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    card = (merged / "README.md").read_text()
    for text in ("base_model: deepseek-community/Janus-Pro-1B", "church erased", "| ear | hidden |",
                 "| erased | 0.11 | 29.6 |", "erase_guidance: 1.0", "library_name: transformers"):
        assert text in card, text

    model = JanusForConditionalGeneration.from_pretrained(merged)
    processor = JanusProcessor.from_pretrained(merged)
    assert model.dtype == torch.bfloat16
    params = dict(model.named_parameters())
    for name, value in delta.items():  # the merged weights are the trained ones, bit for bit
        assert torch.equal(params[name].detach(), value), name
    model = model.float()
    messages = [{"role": "user", "content": [{"type": "text", "text": "a photo of a church"}]}]
    inputs = processor(text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       generation_mode="image", return_tensors="pt")
    tokens = model.generate(**inputs, generation_mode="image", do_sample=False)
    assert tokens.shape == (1, model.config.vision_config.num_image_tokens)
    pixels = model.decode_image_tokens(tokens).permute(0, 3, 1, 2)  # the PIL image processor wants channels first
    images = processor.postprocess(list(pixels.float()), return_tensors="PIL.Image.Image")["pixel_values"]
    side = model.config.vision_config.image_size
    assert images[0].size == (side, side)

    # the erased model is also ear-dist's: it loads (tokenizer check included) and generates
    assert main(["generate", "--model", "merged", "--prompt", "a church at night", "--out", "gen",
                 "--set", "rollout.batch_size=1"]) == 0
    assert (tmp_path / "gen" / "grid.png").is_file()

    # merging again into the same directory replaces it; auto keeps the base's float32
    assert main(["merge", "--base", "base", "--delta", "run/delta.safetensors", "--out", "merged"]) == 0
    assert json.loads((merged / "config.json").read_text())["dtype"] == "float32"
    assert not list(tmp_path.glob(".merged*"))


def test_a_delta_from_other_weights_is_refused(real_model, tmp_path):
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    other = save_tiny_checkpoint(tmp_path / "other", seed=3)
    assert main(["erase", "--no-progress", "--set", f"model.path={other}", "--set", f"data.pairs={tmp_path}/pairs.json",
                 "--set", f"train.out_dir={tmp_path}/run", "--set", "train.steps=1", "--set", "erase.window_len=4",
                 "--set", "erase.loss_threshold=0"]) == 0
    model = load_janus(str(save_tiny_checkpoint(tmp_path / "seed4", seed=4)), device="cpu").model
    with pytest.raises(DeltaError, match="trained from base model .* fingerprint"):
        apply_deltas(model, [tmp_path / "run" / "delta.safetensors"])



def test_merge_auto_keeps_a_bf16_base_in_bf16(real_model, tmp_path):
    """A delta trained on the float32 copy merges into the bfloat16 copy (same fingerprint), which stays bf16."""
    (tmp_path / "pairs.json").write_text(json.dumps(PAIRS))
    assert main(["erase", "--no-progress", "--set", f"model.path={real_model}", "--set", f"data.pairs={tmp_path}/pairs.json",
                 "--set", f"train.out_dir={tmp_path}/run", "--set", "train.steps=1", "--set", "erase.window_len=4",
                 "--set", "erase.loss_threshold=0", "--set", "optim.lr=1e-2"]) == 0
    bf16 = tmp_path / "bf16"
    load_janus(str(real_model), device="cpu", dtype="bfloat16").model.save_pretrained(bf16)
    for f in real_model.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, bf16 / f.name)
    assert main(["merge", "--base", str(bf16), "--delta", f"{tmp_path}/run/delta.safetensors",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    trained = load_file(tmp_path / "run" / "delta.safetensors")
    for name, value in trained.items():  # float32 training rounded once into the bf16 base
        assert torch.equal(merged[name], value.to(torch.bfloat16)), name
