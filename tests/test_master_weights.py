"""bf16/fp16 students without DeepSpeed step float32 master weights, as DeepSpeed does.

Adam directly on bfloat16 weights drops every update smaller than half a bfloat16 step of
the weight: at the paper's lr 1e-4 a large share of elements never moves, and one GPU
would train another student than N GPUs under DeepSpeed (tests/test_distributed.py
compares the two).
"""

import json

import torch

from ear_dist.config import OptimConfig, load_config
from ear_dist.train.state_io import load_tree
from ear_dist.train.student import build_optimizer
from ear_dist.train.trainer import run_erase
from ear_dist.train.updater import MasterWeightUpdater, Updater

STEPS = 20


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(steps)]


def test_master_weights_follow_float32_adam_and_plain_bf16_adam_does_not():
    torch.manual_seed(0)
    init = (torch.randn(64, 64) * 0.05).to(torch.bfloat16)
    grads = _grads(init.shape, STEPS)
    cfg = OptimConfig(name="adam", lr=1e-4)

    reference = torch.nn.Parameter(init.float())  # float32 Adam on the same bf16 gradients
    ref_opt = build_optimizer([reference], cfg)
    with_masters = torch.nn.Parameter(init.clone())
    masters = MasterWeightUpdater([with_masters], lambda ps: build_optimizer(ps, cfg))
    plain = torch.nn.Parameter(init.clone())
    plain_updater = Updater(build_optimizer([plain], cfg))
    for g in grads:
        reference.grad = g.float()
        ref_opt.step()
        with_masters.grad = g.clone()
        masters.step()
        plain.grad = g.clone()
        plain_updater.step()

    assert with_masters.dtype == torch.bfloat16
    assert torch.equal(with_masters.detach(), reference.detach().to(torch.bfloat16))
    assert with_masters.grad is None and masters.masters[0].grad is None
    moved_plain = (plain.detach() != init).float().mean().item()
    moved_reference = (reference.detach().to(torch.bfloat16) != init).float().mean().item()
    print(f"elements moved: float32 reference {moved_reference:.3f}, plain bf16 Adam {moved_plain:.3f}")
    assert moved_plain < moved_reference - 0.2


def test_a_resumed_bf16_run_trains_what_an_uninterrupted_one_does(tiny_checkpoint, tmp_path):
    """The checkpoint carries the float32 masters: without them the resumed steps would start from rounded weights."""
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([
        {"original_prompt": "a photo of a church", "modified_prompt": "a photo of a barn", "concept": "church"},
        {"original_prompt": "a church at night", "modified_prompt": "a castle at night", "concept": "church"}]))

    def cfg(out):
        return load_config(overrides=[f"model.path={tiny_checkpoint}", f"data.pairs={pairs}", f"train.out_dir={out}",
                                      "model.dtype=bfloat16", "train.steps=4", "erase.window_len=4",
                                      "erase.loss_threshold=0", "optim.lr=1e-4", "erase.update_mode=sequence"])

    straight = run_erase(cfg(tmp_path / "straight"), progress=False)
    calls = []
    stopped = run_erase(cfg(tmp_path / "resumed"), progress=False, should_stop=lambda: calls.append(1) or len(calls) == 2)
    ckpt = tmp_path / "resumed" / "checkpoint" / "step-00000002"
    assert stopped == {"stopped": True, "step": 2, "checkpoint": str(ckpt)}
    optimizer_state = load_tree(ckpt / "optimizer")
    assert optimizer_state["master_weights"][0].dtype == torch.float32
    resumed = run_erase(cfg(tmp_path / "resumed"), progress=False)
    assert resumed["resumed_from"] == 2

    from safetensors.torch import load_file

    a, b = load_file(straight["delta"]), load_file(resumed["delta"])
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.bfloat16
        assert torch.equal(a[name], b[name]), name
