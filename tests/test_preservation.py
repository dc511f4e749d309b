"""Levers that keep everything else while erasing: each against a plain reference on small shapes."""

import pytest
import torch

from ear_dist.config import ConfigError, EraseConfig, RolloutConfig, load_config
from ear_dist.data.pairs import PromptPair
from ear_dist.losses.windowed_reference import per_token_kl
from ear_dist.models.delta import apply_deltas, load_delta
from ear_dist.models.janus import load_janus, teacher_forced, unconditional_ids
from ear_dist.teacher.base import TeacherRequest, TeacherSettings
from ear_dist.teacher.colocated import ColocatedTeacher
from ear_dist.train.adapters import EditedLinear, null_space_projector
from ear_dist.train.step_loss import windowed_loss
from ear_dist.train.preserve import AnchorSet, Preservation, anchor_prompts, surrogate_anchors
from ear_dist.train.trainer import run_erase

TARGETS = ["a photo of a church", "a church at night"]
SURROGATES = ["a photo of a barn", "a castle at night"]
ANCHORS = ["a photo of a barn", "a castle at night", "a red windmill in snow", "a house near a lake"]


def test_null_space_edit_keeps_outputs_on_preserved_inputs_and_changes_others():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(16, 8)
    preserved = torch.randn(40, 16, generator=g) @ torch.randn(16, 16, generator=g)[:, :16]
    preserved[:, 10:] = 0  # the preserved inputs span 10 of the 16 directions
    projector, rank = null_space_projector(preserved.double().T @ preserved.double(), energy=0.999999)
    assert rank == 10
    layer = EditedLinear(base, "full", projector=projector)
    with torch.no_grad():
        layer.weight.add_(torch.randn(8, 16, generator=g))  # any edit at all
    elsewhere = torch.randn(5, 16, generator=g)
    torch.testing.assert_close(layer(preserved), base(preserved), rtol=0, atol=1e-4)
    assert (layer(elsewhere) - base(elsewhere)).abs().max() > 0.1


def test_lora_merged_equals_lora_applied():
    g = torch.Generator().manual_seed(1)
    base = torch.nn.Linear(12, 6)
    layer = EditedLinear(base, "lora", rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(6, 3, generator=g))
    merged = torch.nn.Linear(12, 6)
    with torch.no_grad():
        merged.weight.copy_(layer.effective_weight())
        merged.bias.copy_(base.bias)
    x = torch.randn(4, 12, generator=g)
    manual = base(x) + (6.0 / 3) * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged(x), manual, rtol=1e-5, atol=1e-6)


def test_uncond_anchored_target_equals_its_formula(tiny_bundle):
    """reference_prompt=unconditional: the target is softmax(u - eta (c - u)) on the target prompt's own rollout."""
    teacher = ColocatedTeacher(tiny_bundle)
    settings = TeacherSettings.from_config(
        EraseConfig(target_mode="logit", rollout_from="target", reference_prompt="unconditional"), RolloutConfig())
    assert settings.reference == "unconditional" and settings.rollout_from == "target"
    tokens = torch.randint(0, tiny_bundle.codebook_size, (2, tiny_bundle.num_image_tokens),
                           generator=torch.Generator().manual_seed(0))
    out = teacher.forward_targets(TeacherRequest(settings, TARGETS, SURROGATES, [0, 1]), tokens)
    ids, mask = tiny_bundle.encode_prompts(TARGETS)
    _, c = teacher_forced(tiny_bundle.model, ids, mask, tokens)
    _, u = teacher_forced(tiny_bundle.model, unconditional_ids(ids, tiny_bundle.prompt_format), mask, tokens)
    torch.testing.assert_close(out.on_target, c, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.on_surrogate, u, rtol=1e-4, atol=1e-5)
    student = torch.randn_like(c)
    windows = torch.zeros(c.shape[:2], dtype=torch.long)
    loss = windowed_loss("logit", student, out.on_target, out.on_surrogate, windows, 0.0, 1.5, backend="torch")
    torch.testing.assert_close(loss.per_token, per_token_kl(student, u - 1.5 * (c - u)), rtol=1e-4, atol=1e-5)


def test_drift_weighted_anchors_move_weight_toward_the_most_drifted(tiny_bundle):
    from ear_dist.train.student import make_student
    from ear_dist.train.trainable import select_trainable_names
    from ear_dist.config import TrainableConfig

    anchors = AnchorSet.snapshot(tiny_bundle, ANCHORS, 5.0, seed=0, branches=["guided", "uncond"])
    names = select_trainable_names(tiny_bundle.model, TrainableConfig(first_k_layers=2))
    student = make_student(tiny_bundle.model, names)
    pres = Preservation(anchors, weight=1.0, per_step=1, drift_power=1.0, refresh_every=1000, seed=0)
    pres.maybe_refresh(student, tiny_bundle)
    assert pres.drift.abs().max() < 1e-5  # an unchanged student has not drifted
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    pres.steps = 0
    drift = pres.maybe_refresh(student, tiny_bundle)
    assert drift is not None and (drift > 1e-4).all()
    pres.drift = torch.tensor([8.0, 1.0, 0.5, 0.5])  # anchor 0 drifted most
    counts = torch.zeros(4)
    for _ in range(400):
        counts[pres.draw()] += 1
    assert counts[0] > 0.6 * 400 and counts.argmax() == 0
    pres.drift_power = 0.0  # uniform
    counts = torch.zeros(4)
    for _ in range(400):
        counts[pres.draw()] += 1
    assert counts.min() > 60
    loss, stats = pres.loss(student, tiny_bundle, [0, 1])
    loss.backward()
    assert loss > 0 and set(stats) == {"preserve_kl/guided", "preserve_kl/uncond"}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)


def _run(tmp_path, model, name, *extra):
    pairs = [PromptPair(t, s, "church") for t, s in zip(TARGETS, SURROGATES)]
    cfg = load_config(overrides=[f"model.path={model}", f"train.out_dir={tmp_path / name}", "train.steps=3",
                                 "erase.window_len=4", "optim.lr=1e-2", "erase.loss_threshold=0",
                                 "trainable.first_k_layers=2", *extra])
    return run_erase(cfg, pairs, progress=False)


ANCHOR_SETS = f"preserve.prompts=[{', '.join(ANCHORS)}]"


@pytest.mark.parametrize("anchor_sets, anchor_prompts", [([ANCHOR_SETS], ANCHORS),
                                                          (["preserve.surrogates=8"], SURROGATES)],
                         ids=["prompts", "surrogates"])
def test_a_null_space_run_leaves_the_first_layer_outputs_on_anchors_unchanged(tmp_path, tiny_checkpoint,
                                                                              anchor_sets, anchor_prompts):
    """The whole job with preserve.nullspace: the delta moves layer 0's attention projections as much as a plain
    run does, yet their outputs on the anchors (prompt and image positions) move a thousand times less. The
    anchors are given (preserve.prompts) or are the training pairs' own surrogates (preserve.surrogates)."""
    projected = _run(tmp_path, tiny_checkpoint, "ns", *anchor_sets, "preserve.nullspace=true",
                     "preserve.nullspace_energy=0.999999")["delta"]
    plain = _run(tmp_path, tiny_checkpoint, "plain")["delta"]
    base = load_janus(str(tiny_checkpoint), device="cpu", dtype="float32")
    anchors = AnchorSet.snapshot(base, anchor_prompts, 5.0, seed=0, branches=["cond"])
    ids, mask = base.encode_prompts(anchor_prompts)
    layer0 = "model.language_model.layers.0.self_attn.q_proj"

    def layer0_out(delta):
        bundle = load_janus(str(tiny_checkpoint), device="cpu", dtype="float32")
        if delta:
            apply_deltas(bundle.model, [delta])
        seen = []
        h = bundle.model.get_submodule(layer0).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        with torch.no_grad():
            teacher_forced(bundle.model, ids, mask, anchors.tokens)
        h.remove()
        weight = bundle.model.get_submodule(layer0).weight.detach()
        return seen[0], weight

    (out0, w0), (out_ns, w_ns), (out_plain, w_plain) = layer0_out(None), layer0_out(projected), layer0_out(plain)
    assert (w_ns - w0).norm() > 0.2 * (w_plain - w0).norm()  # the projected update is not small
    assert (out_ns - out0).abs().max() < 1e-3 * (out_plain - out0).abs().max()


def test_surrogate_anchors_follow_the_given_ones_distinct_and_capped():
    from types import SimpleNamespace

    def anchors(cfg, pairs, erased=()):  # as build_preserving_parts composes them
        given = anchor_prompts(cfg)
        return given + surrogate_anchors(cfg, pairs, erased, given)

    pairs = [PromptPair("a church", "a barn"), PromptPair("an old church", "a castle"),
             PromptPair("a small church", "a barn"), PromptPair("a church at night", "a red windmill in snow"),
             PromptPair("a church by the sea", "a house by the sea")]
    cfg = SimpleNamespace(prompts=["a red windmill in snow"], prompts_file="", surrogates=2)
    assert anchors(cfg, pairs) == ["a red windmill in snow", "a barn", "a castle"]
    cfg.surrogates = 10  # the repeated barn and the surrogate already an anchor come once
    assert anchors(cfg, pairs) == ["a red windmill in snow", "a barn", "a castle", "a house by the sea"]
    cfg.surrogates = 0
    assert anchors(cfg, pairs) == ["a red windmill in snow"]
    # a joint run erases church and barn: church -> barn sentences, and a style pair's sentence with a church in it,
    # would protect what the run removes, so they stay out
    joint = [PromptPair("an old church", "an old barn", "church"),
             PromptPair("a church at night", "a castle at night", "church"),
             PromptPair("a big barn", "a big Windmill", "barn"),
             PromptPair("a church, by Monet", "a church", "monet")]
    cfg.surrogates = 10
    assert anchors(cfg, joint) == ["a red windmill in snow", "a castle at night", "a big Windmill"]
    # an array task of a job erasing church and windmill (slurm.concepts): the other task's concept stays out too
    assert anchors(cfg, joint[:2], erased=["church", "windmill"]) == ["a red windmill in snow",
                                                                                   "an old barn", "a castle at night"]


def test_surrogate_anchors_are_validated_with_the_levers_that_use_them():
    assert load_config(overrides=["preserve.nullspace=true", "preserve.surrogates=16"]).preserve.surrogates == 16
    with pytest.raises(ConfigError, match="preserve.surrogates: must be >= 0"):
        load_config(overrides=["preserve.nullspace=true", "preserve.surrogates=-1"])
    with pytest.raises(ConfigError, match="preserve.surrogates: anchors are used only by"):
        load_config(overrides=["preserve.surrogates=16"])
    with pytest.raises(ConfigError, match="needs anchor prompts"):
        load_config(overrides=["preserve.weight=1.0"])


def test_a_later_layer_null_space_run_leaves_the_first_layer_as_it_was(tmp_path, tiny_checkpoint):
    """trainable.skip_first_layers=1 with null-space updates (the world's later-layer preserving method): the delta
    holds layer 1's projected linear weights, moved, and nothing of layer 0."""
    summary = _run(tmp_path, tiny_checkpoint, "later", ANCHOR_SETS, "preserve.nullspace=true",
                   "trainable.modules=all", "trainable.skip_first_layers=1")
    tensors, _ = load_delta(summary["delta"])
    base = dict(load_janus(str(tiny_checkpoint), device="cpu", dtype="float32").model.named_parameters())
    assert tensors and not any(".layers.0." in n for n in tensors), sorted(tensors)
    assert {n.split(".layers.1.")[1] for n in tensors} >= {"self_attn.q_proj.weight", "mlp.down_proj.weight"}
    assert all((tensors[n] - base[n].detach()).abs().max() > 0 for n in tensors if n.endswith("proj.weight"))


def test_lora_run_writes_a_merged_delta_and_resumes(tmp_path, tiny_checkpoint):
    summary = _run(tmp_path, tiny_checkpoint, "lora", "trainable.adapter=lora", "trainable.lora_rank=2")
    tensors, _ = load_delta(summary["delta"])
    base = load_janus(str(tiny_checkpoint), device="cpu", dtype="float32").model
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    change = tensors[name] - dict(base.named_parameters())[name]
    assert 0 < torch.linalg.matrix_rank(change) <= 2  # the merged update is low-rank
    assert summary["trainable_parameters"] == 8 * 2 * (64 + 64)  # 8 layers x rank 2 x (in + out)
    # stopped after 2 steps, resumed: the same delta as the uninterrupted run
    stop = {"n": 0}

    def should_stop():
        stop["n"] += 1
        return stop["n"] == 2

    pairs = [PromptPair(t, s, "church") for t, s in zip(TARGETS, SURROGATES)]
    cfg = load_config(overrides=[f"model.path={tiny_checkpoint}", f"train.out_dir={tmp_path / 'lora2'}",
                                 "train.steps=3", "erase.window_len=4", "optim.lr=1e-2", "erase.loss_threshold=0",
                                 "trainable.first_k_layers=2", "trainable.adapter=lora", "trainable.lora_rank=2"])
    assert run_erase(cfg, pairs, progress=False, should_stop=should_stop)["stopped"]
    resumed = run_erase(cfg, pairs, progress=False)
    again, _ = load_delta(resumed["delta"])
    for k in tensors:
        torch.testing.assert_close(again[k], tensors[k], rtol=0, atol=1e-6)


def test_preservation_and_probes_log_their_kl(tmp_path, tiny_checkpoint):
    from ear_dist.telemetry.writer import read_jsonl

    _run(tmp_path, tiny_checkpoint, "pres", ANCHOR_SETS, "preserve.weight=1.0", "preserve.per_step=2",
         f"preserve.probe_prompts=[{ANCHORS[2]}, {ANCHORS[3]}]", "preserve.probe_every=1",
         "erase.update_mode=sequence")
    rows = list(read_jsonl(tmp_path / "pres" / "metrics.jsonl"))
    assert len(rows) == 3
    for r in rows:  # measured after each step's update: the drift the update caused
        assert r["probe_kl/guided"] > 0 and r["probe_kl/uncond"] > 0 and r["probe_kl/cond"] > 0
    assert all("preserve_kl/guided" in r and "preserve_kl/uncond" in r for r in rows)


def test_student_guidance_matches_a_guided_teacher(tiny_bundle):
    """teacher_guidance_weight > 0: the student's conditional and unconditional logits are combined the same way,
    so a student equal to the teacher has zero loss (an unguided student would not)."""
    from ear_dist.train.step import ErasureStep, PairBatch, Updater
    from ear_dist.train.student import make_student
    from ear_dist.train.trainable import select_trainable_names
    from ear_dist.config import TrainableConfig

    teacher = ColocatedTeacher(tiny_bundle)
    student = make_student(tiny_bundle.model, select_trainable_names(tiny_bundle.model, TrainableConfig()))
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.0)
    tokens = torch.randint(0, tiny_bundle.codebook_size, (2, tiny_bundle.num_image_tokens),
                           generator=torch.Generator().manual_seed(0))
    batch = PairBatch(TARGETS, TARGETS, ["church"] * 2, [0, 1], tokens)  # anchors: the target is the teacher's
    cfg = EraseConfig(target_mode="logit", teacher_guidance_weight=4.0, update_mode="sequence", window_len=4,
                      loss_threshold=0.0)
    result = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(batch)
    assert result.loss == pytest.approx(0.0, abs=1e-6)
    step = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))
    step.settings = TeacherSettings(**{**step.settings.as_dict(), "with_uncond": False, "target_guidance_weight": 0.0})
    teach = teacher.forward_targets(TeacherRequest(TeacherSettings(mode="logit", with_uncond=True,
                                                                   target_guidance_weight=4.0),
                                                   TARGETS, TARGETS, [0, 1]), tokens)
    ids, mask = tiny_bundle.encode_prompts(TARGETS)
    windows = torch.zeros(2, tokens.shape[1], dtype=torch.long)
    unguided = windowed_loss("logit", step._student_out(ids, mask, tokens), teach.on_target, teach.on_surrogate,
                             windows, 0.0, 1.0, uncond=teach.uncond, guidance_weight=4.0, backend="torch")
    assert float(unguided.loss) > 1e-3
