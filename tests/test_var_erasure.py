"""S-VARE's bitwise rule and EAR's scale windows on the VAR family, through the real erasure step."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ear_dist.config import load_config
from ear_dist.losses.svare import bit_error_filter, bitwise_filtered_ce, bitwise_svare_loss
from ear_dist.losses.windowed_reference import per_token_kl, scale_window_index
from ear_dist.models.delta import apply_deltas
from ear_dist.models.var.bundle import save_tiny_var_checkpoint
from ear_dist.train.trainer import run_erase


def test_bit_error_filter_against_values_written_out_by_hand():
    # one row, three tokens of 4 bits; logits per bit are (logit of 0, logit of 1)
    logits = torch.tensor([[
        [0.0, 2.0, 0.0, 3.0, 1.0, 0.0, 2.0, 0.0],   # labels 1,1,0,0: every bit right
        [0.0, 2.0, 1.0, 0.0, 1.0, 0.0, 2.0, 0.0],   # labels 1,1,0,0: bit 1 wrong -> 1 of 4 = a quarter
        [0.5, 0.5, 0.0, 1.0, 3.0, 0.0, 0.0, 1.0],   # labels 1,1,0,0: bit 0 a tie (not wrong), bit 3 wrong -> 1/4
    ]])
    labels = torch.tensor([[[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]])
    assert bit_error_filter(logits, labels).tolist() == [[False, True, True]]
    assert bit_error_filter(logits, labels, min_error_share=0.5).tolist() == [[False, False, False]]

    def ce(l0, l1, label):  # -log p(label) of a two-way softmax, by hand
        chosen, other = (l1, l0) if label else (l0, l1)
        return math.log(math.exp(chosen) + math.exp(other)) - chosen

    token1 = (ce(0, 2, 1) + ce(1, 0, 1) + ce(1, 0, 0) + ce(2, 0, 0)) / 4
    token2 = (ce(0.5, 0.5, 1) + ce(0, 1, 1) + ce(3, 0, 0) + ce(0, 1, 0)) / 4
    student = logits.clone().requires_grad_(True)
    loss, counted = bitwise_filtered_ce(student, labels)
    assert counted == 2
    assert loss.item() == pytest.approx((token1 + token2) / 3, rel=1e-6)
    loss.backward()
    assert torch.all(student.grad[0, 0] == 0)  # a safe token gets no gradient at all
    assert student.grad[0, 1].abs().sum() > 0


def test_bitwise_svare_matches_the_per_bit_formulation_of_the_paper():
    """Filtered loss: per-bit CE [B, T, bits], a bit wrong when its CE > ln 2, tokens with >= 25% wrong bits kept,
    mean over bits, sum over tokens / T, mean over rows; preservation: per-bit KL, mean over bits, same reduction."""
    g = torch.Generator().manual_seed(0)
    b, t, bits = 2, 21, 8
    student_t = torch.randn(b, t, 2 * bits, generator=g) * 2
    student_s = torch.randn(b, t, 2 * bits, generator=g)
    teacher_s = torch.randn(b, t, 2 * bits, generator=g)
    labels = torch.randint(0, 2, (b, t, bits), generator=g)
    out = bitwise_svare_loss(student_t, labels, student_s, teacher_s, 0.25, 0.5)

    bit_ce = F.cross_entropy(student_t.reshape(b, t, bits, 2).permute(0, 3, 1, 2), labels, reduction="none")
    keep = ((bit_ce > math.log(2)).float().mean(-1) >= 0.25).float()
    erase = (bit_ce.mean(-1) * keep / t).sum(-1).mean()
    kl = F.kl_div(torch.log_softmax(student_s.reshape(b, -1, 2), -1), torch.softmax(teacher_s.reshape(b, -1, 2), -1),
                  reduction="none").sum(-1).reshape(b, t, bits).mean(-1)
    preserve = (kl / t).sum(-1).mean()
    assert out.ce.item() == pytest.approx(erase.item(), rel=1e-5)
    assert out.preserve.item() == pytest.approx(preserve.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(erase.item() + 0.5 * preserve.item(), rel=1e-5)
    assert 0 < out.num_counted < b * t


def test_grouped_kl_is_the_sum_of_the_bits_kls():
    g = torch.Generator().manual_seed(1)
    s, q = torch.randn(2, 5, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    by_bit = sum(per_token_kl(s[..., 2 * j: 2 * j + 2], q[..., 2 * j: 2 * j + 2]) for j in range(6))
    assert torch.allclose(per_token_kl(s, q, groups=6), by_bit, atol=1e-6)


def test_windows_are_whole_scales():
    sizes = [1, 4, 16, 64]
    one = scale_window_index(2, sizes, 1)
    assert one.shape == (2, 85)
    assert one[0, :1].tolist() == [0] and set(one[0, 1:5].tolist()) == {1} and set(one[0, 21:].tolist()) == {3}
    two = scale_window_index(1, sizes, 2)
    assert set(two[0, :5].tolist()) == {0} and set(two[0, 5:].tolist()) == {1}
    shuffled = scale_window_index(3, sizes, 1, "random", generator=torch.Generator().manual_seed(0))
    for row in shuffled:  # every scale stays in one window, and the windows are a permutation of the scales
        ids = [set(row[a:b].tolist()) for a, b in ((0, 1), (1, 5), (5, 21), (21, 85))]
        assert all(len(i) == 1 for i in ids)
        assert sorted(next(iter(i)) for i in ids) == [0, 1, 2, 3]


PAIRS = [
    {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
    {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"},
]


@pytest.fixture(scope="module")
def var_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("var-erase")
    model = save_tiny_var_checkpoint(d / "model", seed=0)
    pairs = d / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    return d, model, pairs


def _erase(d, model, pairs, name, *extra):
    cfg = load_config(overrides=[f"model.path={model}", "model.family=var", f"data.pairs={pairs}",
                                 f"train.out_dir={d / name}", "train.steps=2", "optim.lr=1e-2",
                                 "erase.loss_threshold=0", "trainable.first_k_layers=2", "train.tensorboard=false",
                                 *extra])
    return run_erase(cfg, progress=False)


@pytest.mark.parametrize("name, extra, windows", [
    ("ear-per-scale", [], 4),
    ("ear-two-scales-sequence", ["erase.window_scales=2", "erase.update_mode=sequence"], 2),
    ("ear-logit-guided", ["erase.target_mode=logit", "erase.teacher_guidance_weight=3"], 4),
    ("svare", ["erase.method=svare"], 0),
    ("esd", ["erase.method=esd"], 0),
])
def test_every_method_erases_on_the_var_family(var_run, name, extra, windows):
    """EAR with windows of whole scales (per window and per sequence, hidden and bitwise-logit targets), S-VARE with
    the bit filter and the naive baseline all train the student and write a delta of the chosen block tensors."""
    from safetensors.torch import load_file

    from ear_dist.models.var.bundle import load_var

    d, model, pairs = var_run
    summary = _erase(d, model, pairs, name, *extra)
    assert summary["windows_total"] == 2 * windows
    assert summary["optimizer_steps"] >= 2
    delta = load_file(summary["delta"])
    assert delta and all(k.startswith(("block_chunks.0.module.0.sa.", "block_chunks.0.module.1.sa."))
                         for k in delta)
    base = dict(load_var(str(model), device="cpu", dtype="float32").model.named_parameters())
    assert max((delta[k] - base[k].detach()).abs().max().item() for k in delta) > 1e-4


def test_svare_filter_choices_follow_the_family(var_run):
    d, model, pairs = var_run
    with pytest.raises(ValueError, match="erase.svare_filter: 'prob' does not apply to a var model"):
        _erase(d, model, pairs, "svare-prob", "erase.method=svare", "erase.svare_filter=prob")
    summary = _erase(d, model, pairs, "svare-two-scales", "erase.method=svare", "erase.svare_scales=2")
    records = [json.loads(x) for x in (d / "svare-two-scales" / "metrics.jsonl").read_text().splitlines()]
    counted = [r["counted"] for r in records]
    assert len(counted) == 2 and all(0 <= c <= 5 for c in counted)  # 1 + 4 tokens of the first two scales
    assert summary["optimizer_steps"] == 2


def test_ear_dist_eval_evaluates_a_var_model_and_its_delta(var_run, tmp_path):
    """`ear-dist eval` with model.family=var: images through the family's sampler and BSQ decoder, the delta
    applied in memory, the before/after images sharing seeds; perplexity is reported as not applicable."""
    from ear_dist.cli import main
    from ear_dist.eval.generate import read_png
    from tests.test_eval import write_suite

    d, model, pairs = var_run
    delta = _erase(d, model, pairs, "for-eval")["delta"]
    out = tmp_path / "eval"
    assert main(["eval", "--no-progress", "--set", f"model.path={model}", "--set", "model.family=var",
                 "--suite", str(write_suite(tmp_path)), "--delta", f"ear={delta}", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["columns"]] == ["base", "ear"]
    assert report["generation"]["ear"] == {"generated": 10, "reused": 0}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    by_key = {(r["column"], r["prompt"]): r for r in rows}
    before, after = by_key[("base", "a church at night")], by_key[("ear", "a church at night")]
    image, tokens = read_png(before["path"])
    assert tokens.shape == (85,) and image.ndim == 3 and before["seed"] == after["seed"]
    assert not np.array_equal(tokens, read_png(after["path"])[1])  # the delta changed the image
    assert "no language-model head" in report["perplexity"]["base"]["concept prompts"]["not_run"]
    assert 0.0 <= report["results"]["ear"]["church"]["concept_accuracy"] <= 1.0


def test_a_null_space_run_keeps_the_var_blocks_outputs_on_the_anchors(tmp_path):
    """preserve.nullspace on the VAR family: only linear weights train (the blocks' free q/v biases and attention
    scales cannot be projected and stay frozen, with a warning naming them), and the first block's attention output
    on the anchors moves a thousand times less than in a plain run while its weights move comparably."""
    import logging

    from safetensors.torch import load_file

    from ear_dist.models.var.bundle import load_var
    from ear_dist.train.preserve import AnchorSet, student_logits

    # wide enough that the anchor's inputs (cond and uncond rows, 85 tokens each) leave a null space
    model = save_tiny_var_checkpoint(tmp_path / "model", seed=0, embed_dim=256)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(PAIRS))
    anchors = ["a barn in snow"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ear_dist").addHandler(handler)
    try:
        ns = _erase(tmp_path, model, pairs, "ns", "preserve.nullspace=true", "preserve.nullspace_energy=0.999999",
                    f"preserve.prompts={json.dumps(anchors)}")["delta"]
    finally:
        logging.getLogger("ear_dist").removeHandler(handler)
    plain = _erase(tmp_path, model, pairs, "plain")["delta"]
    warned = " ".join(r.getMessage() for r in records)
    assert "stay frozen" in warned and "sa.q_bias" in warned and "sa.scale_mul_1H11" in warned
    assert set(load_file(ns)) == {f"block_chunks.0.module.{i}.sa.{w}.weight" for i in (0, 1)
                                  for w in ("mat_qkv", "proj")}
    assert any(k.endswith("q_bias") for k in load_file(plain))

    base = load_var(str(model), device="cpu", dtype="float32")
    snapshot = AnchorSet.snapshot(base, anchors, 5.0, seed=0, branches=["cond"])
    block = "block_chunks.0.module.0.sa"

    def block_out(delta):
        bundle = load_var(str(model), device="cpu", dtype="float32")
        if delta:
            apply_deltas(bundle.model, [delta])
        seen = []
        h = bundle.model.get_submodule(block).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        with torch.no_grad():
            student_logits(bundle.model, bundle, anchors, snapshot.tokens)
        h.remove()
        return torch.cat(seen), bundle.model.get_submodule(block + ".mat_qkv").weight.detach()

    (out0, w0), (out_ns, w_ns), (out_plain, w_plain) = block_out(None), block_out(ns), block_out(plain)
    assert (w_ns - w0).norm() > 0.2 * (w_plain - w0).norm()
    assert (out_ns - out0).abs().max() < 1e-3 * (out_plain - out0).abs().max()
