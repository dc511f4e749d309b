"""The EAR erasure step on the tiny model, checked against loops written out by hand."""

import copy

import pytest
import torch
from transformers import DynamicCache, JanusForConditionalGeneration

from ear_dist.config import ConfigError, EraseConfig, RolloutConfig, TrainableConfig, load_config
from ear_dist.data.pairs import PromptPair
from ear_dist.losses.windowed_reference import per_token_kl, per_token_mse
from ear_dist.models.delta import DeltaError, apply_deltas, load_delta
from ear_dist.models.janus import load_janus, position_ids_from_mask, teacher_forced
from ear_dist.teacher.base import TeacherRequest, TeacherSettings
from ear_dist.teacher.colocated import ColocatedTeacher
from ear_dist.train.step_loss import windowed_loss
from ear_dist.train.step import ErasureStep, PairBatch, Updater
from ear_dist.train.student import make_student
from ear_dist.train.trainable import select_trainable_names
from ear_dist.train.trainer import TrainingError, run_erase

TARGETS = ["a photo of a church", "a church at night"]
SURROGATES = ["a photo of a barn", "a castle at night"]


def _setup(bundle, trainable_cfg=TrainableConfig(first_k_layers=2, modules="attention"), lr=1e-2):
    names = select_trainable_names(bundle.model, trainable_cfg)
    teacher = ColocatedTeacher(bundle)
    student = make_student(bundle.model, names)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    return names, teacher, student, opt


def _batch(bundle, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, bundle.codebook_size, (2, bundle.num_image_tokens), generator=g)
    return PairBatch(TARGETS, SURROGATES, ["church", "church"], [0, 1], tokens)


def _outputs(teacher, tokens, mode="hidden", with_uncond=False):
    """The teacher's raw outputs on TARGETS / SURROGATES, teacher-forced on ``tokens``."""
    settings = TeacherSettings(mode=mode, with_uncond=with_uncond)
    return teacher.forward_targets(TeacherRequest(settings, TARGETS, SURROGATES, [0, 1]), tokens)


def _median_window_sum(bundle, teacher, student, batch, window_len):
    """A threshold between the window sums, so that some windows are kept and some masked."""
    teach = _outputs(teacher, batch.surrogate_tokens)
    ids, mask = bundle.encode_prompts(TARGETS)
    with torch.no_grad():
        h, _ = teacher_forced(student, ids, mask, batch.surrogate_tokens, return_logits=False)
    per_token = ((h - (2 * teach.on_surrogate - teach.on_target)) ** 2).mean(-1)
    sums = torch.cat([per_token[:, s : s + window_len].sum(1) for s in range(0, per_token.shape[1], window_len)])
    return float(sums.median())


def _assert_same_updates(before, got, want, rel=2e-3):
    """The parameter updates agree to ``rel`` of the largest update.

    Adam divides by sqrt(v), so on elements whose gradient is ~0 the float noise of two
    equivalent computations is magnified; the comparison is scaled by the update size.
    """
    for n in before:
        d_got, d_want = got[n] - before[n], want[n] - before[n]
        scale = d_want.abs().max()
        assert scale > 0, f"{n} did not move"
        assert (d_got - d_want).abs().max() <= rel * scale, n


def _trained(student, names):
    params = dict(student.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def test_trainable_selection_by_name(tiny_bundle):
    m = tiny_bundle.model
    attn = select_trainable_names(m, TrainableConfig(first_k_layers=5, modules="attention"))
    full = select_trainable_names(m, TrainableConfig(first_k_layers=5, modules="all"))
    assert len(attn) == 5 * 4 and all("self_attn" in n and ".layers.5." not in n for n in attn)
    assert set(attn) < set(full) and any("mlp.gate_proj" in n for n in full)
    pat = select_trainable_names(m, TrainableConfig(patterns=["*generation_head*"]))
    assert pat and all("generation_head" in n for n in pat)
    with pytest.raises(ConfigError, match="match no parameter"):
        select_trainable_names(m, TrainableConfig(patterns=["nothing.*"]))
    with pytest.raises(ConfigError, match="first_k_layers: 9 > the model's 6"):
        select_trainable_names(m, TrainableConfig(first_k_layers=9))
    # skip_first_layers: layers 1-4 of the first five, every module; layer 0 (the embeddings' reader) frozen
    later = select_trainable_names(m, TrainableConfig(first_k_layers=5, modules="all", skip_first_layers=1))
    assert set(later) == {n for n in full if ".layers.0." not in n} and len(later) < len(full)
    assert not any(".layers.0." in n for n in later) and any(".layers.4.mlp" in n for n in later)


def test_skip_first_layers_is_validated_against_first_k_layers():
    from ear_dist.config import load_config

    assert load_config(overrides=["trainable.skip_first_layers=4"]).trainable.skip_first_layers == 4
    for bad in ("5", "-1"):
        with pytest.raises(ConfigError, match=r"trainable.skip_first_layers: must be in \[0, first_k_layers\)"):
            load_config(overrides=[f"trainable.skip_first_layers={bad}"])


def test_student_shares_frozen_tensors_and_owns_trained_ones(tiny_bundle):
    names, _, student, _ = _setup(tiny_bundle)
    t_params = dict(tiny_bundle.model.named_parameters())
    for n, p in student.named_parameters():
        same = p.data_ptr() == t_params[n].data_ptr()
        assert same == (n not in names), n
        assert p.requires_grad == (n in names)


def test_hidden_targets_equal_their_formula(tiny_bundle):
    """The teacher's outputs are its teacher-forced states, and the loss builds the guided target from them."""
    _, teacher, _, _ = _setup(tiny_bundle)
    batch = _batch(tiny_bundle)
    teach = _outputs(teacher, batch.surrogate_tokens)
    for prompts, got in ((TARGETS, teach.on_target), (SURROGATES, teach.on_surrogate)):
        for i, p in enumerate(prompts):  # one prompt at a time: no padding involved
            ids, mask = tiny_bundle.encode_prompts([p])
            h, _ = teacher_forced(tiny_bundle.model, ids, mask, batch.surrogate_tokens[i : i + 1])
            torch.testing.assert_close(got[i], h[0], rtol=1e-4, atol=1e-5)
    student = torch.randn_like(teach.on_target)
    windows = torch.zeros(student.shape[:2], dtype=torch.long)
    out = windowed_loss("hidden", student, teach.on_target, teach.on_surrogate, windows, 0.0, 0.7, backend="torch")
    guided = teach.on_surrogate - 0.7 * (teach.on_target - teach.on_surrogate)
    torch.testing.assert_close(out.per_token, per_token_mse(student, guided))


def test_logit_targets_with_teacher_cfg_equal_their_formula(tiny_bundle):
    _, teacher, _, _ = _setup(tiny_bundle)
    batch = _batch(tiny_bundle)
    teach = _outputs(teacher, batch.surrogate_tokens, "logit", with_uncond=True)
    assert teach.uncond is not None and teach.uncond.shape == teach.on_target.shape
    w, eta = 3.0, 1.0
    settings = TeacherSettings.from_config(EraseConfig(target_mode="logit", teacher_guidance_weight=w), RolloutConfig())
    assert settings.with_uncond and settings.target_guidance_weight == w
    student = torch.randn_like(teach.on_target)
    windows = torch.zeros(student.shape[:2], dtype=torch.long)
    out = windowed_loss("logit", student, teach.on_target, teach.on_surrogate, windows, 0.0, eta, uncond=teach.uncond,
                        guidance_weight=w, backend="torch")
    g_t = teach.uncond + w * (teach.on_target - teach.uncond)
    g_s = teach.uncond + w * (teach.on_surrogate - teach.uncond)
    torch.testing.assert_close(out.per_token, per_token_kl(student, g_s - eta * (g_t - g_s)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_target_equal_to_surrogate_gives_zero_loss_and_no_update(tiny_bundle, mode):
    names, teacher, student, opt = _setup(tiny_bundle)
    before = _trained(student, names)
    batch = PairBatch(TARGETS, TARGETS, ["church"] * 2, [0, 1], _batch(tiny_bundle).surrogate_tokens)
    for update in ("sequence", "window"):
        cfg = EraseConfig(target_mode=mode, update_mode=update, window_len=4, loss_threshold=1e-6)
        res = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(batch)
        assert res.loss == pytest.approx(0.0, abs=1e-9)
        assert res.windows_kept == 0 and res.optimizer_steps == 0
    for n, v in _trained(student, names).items():
        assert torch.equal(v, before[n])


def test_anchor_pairs_pull_a_drifted_student_back_to_the_teacher(tiny_bundle):
    """A pair whose surrogate is its target (a preservation anchor) has zero loss on an unchanged
    student; once the student drifts, training on it brings the student's output back."""
    names, teacher, student, opt = _setup(tiny_bundle, lr=3e-3)
    anchor = PromptPair("a barn at night", "a barn at night", "church")
    assert anchor.is_anchor and not PromptPair(TARGETS[0], SURROGATES[0], "church").is_anchor
    tokens = _batch(tiny_bundle).surrogate_tokens[:1]
    batch = PairBatch([anchor.target], [anchor.surrogate], ["church"], [0], tokens)
    ids, mask = tiny_bundle.encode_prompts([anchor.target])

    def drift():
        with torch.no_grad():
            h_s, _ = teacher_forced(student, ids, mask, tokens, return_logits=False)
            h_t, _ = teacher_forced(tiny_bundle.model, ids, mask, tokens, return_logits=False)
        return float(((h_s - h_t) ** 2).mean())

    assert drift() == 0.0
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    drifted = drift()
    assert drifted > 1e-3
    cfg = EraseConfig(update_mode="sequence", window_len=4, loss_threshold=0.0)
    step = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))
    for _ in range(20):
        step(batch)
    assert drift() < 0.5 * drifted, (drifted, drift())


def test_sequence_mode_equals_the_loop_written_out(tiny_bundle):
    names, teacher, student, opt = _setup(tiny_bundle)
    ref_student = copy.deepcopy(student)
    ref_opt = torch.optim.Adam([p for p in ref_student.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tiny_bundle)
    window_len = 5  # 16 tokens: windows of 5, 5, 5 and a partial one of 1
    tau = _median_window_sum(tiny_bundle, teacher, student, batch, window_len)
    cfg = EraseConfig(update_mode="sequence", window_len=window_len, loss_threshold=tau)
    before = _trained(student, names)
    res = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(batch)

    teach = _outputs(teacher, batch.surrogate_tokens)
    target = 2 * teach.on_surrogate - teach.on_target
    ids, mask = tiny_bundle.encode_prompts(TARGETS)
    h, _ = teacher_forced(ref_student, ids, mask, batch.surrogate_tokens, return_logits=False)
    per_token = ((h - target) ** 2).mean(-1)
    total, kept = 0.0, 0
    for row in range(2):
        for start in range(0, 16, window_len):
            s = per_token[row, start : start + window_len].sum()
            if s.item() >= tau:  # the median itself is kept (>=)
                total = total + s
                kept += 1
    assert res.windows_total == 8 and res.windows_kept == kept
    assert 0 < kept < 8, "pick tau so that some windows are masked and some kept"
    (total / 32).backward()
    ref_opt.step()
    _assert_same_updates(before, _trained(student, names), _trained(ref_student, names))


def test_window_mode_equals_the_loop_written_out(tiny_bundle):
    """The paper's update: a step after each kept window, later windows seen by the updated student."""
    names, teacher, student, opt = _setup(tiny_bundle)
    ref_student = copy.deepcopy(student)
    ref_opt = torch.optim.Adam([p for p in ref_student.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tiny_bundle, seed=3)
    window_len = 6
    tau = _median_window_sum(tiny_bundle, teacher, student, batch, window_len)
    cfg = EraseConfig(update_mode="window", window_len=window_len, loss_threshold=tau)
    before = _trained(student, names)
    res = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(batch)

    teach = _outputs(teacher, batch.surrogate_tokens)
    target = 2 * teach.on_surrogate - teach.on_target
    ids, mask = tiny_bundle.encode_prompts(TARGETS)
    steps, kept = 0, 0
    for start in range(0, 16, window_len):  # full-length forward each time: causality makes it equal
        h, _ = teacher_forced(ref_student, ids, mask, batch.surrogate_tokens, return_logits=False)
        sums = ((h - target) ** 2).mean(-1)[:, start : start + window_len].sum(1)
        keep = sums.detach() >= tau
        if keep.any():
            n_tok = 2 * min(window_len, 16 - start)
            (sums[keep].sum() / n_tok).backward()
            ref_opt.step()
            ref_opt.zero_grad()
            steps += 1
            kept += int(keep.sum())
    assert res.optimizer_steps == steps and res.windows_kept == kept and res.windows_total == 6
    assert 0 < kept < 6
    got, want = _trained(student, names), _trained(ref_student, names)
    _assert_same_updates(before, got, want)


class RecordingUpdater(Updater):
    """An updater that keeps the value of every loss it backpropagates."""

    def __init__(self, optimizer):
        super().__init__(optimizer)
        self.losses = []

    def backward(self, loss):
        self.losses.append(float(loss.detach()))
        super().backward(loss)


def test_cached_prefix_windows_follow_their_definition(tiny_bundle):
    """window_prefix=cached: the first window is the exact one; every later window is the updated
    student on its own tokens, attending to the keys/values of earlier tokens as the student computed
    them when it got there. Written out by hand the way generation proceeds: one token at a time
    through a KV cache, the weights changing at window ends."""
    names, teacher, student, opt = _setup(tiny_bundle)
    exact_student = copy.deepcopy(student)
    exact = RecordingUpdater(torch.optim.Adam([p for p in exact_student.parameters() if p.requires_grad], lr=1e-2))
    ref_student = copy.deepcopy(student)
    ref_opt = torch.optim.Adam([p for p in ref_student.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(tiny_bundle, seed=3)
    window_len = 6
    tau = _median_window_sum(tiny_bundle, teacher, student, batch, window_len)
    before = _trained(student, names)
    cached = RecordingUpdater(opt)
    res = ErasureStep(student, tiny_bundle, teacher, EraseConfig(update_mode="window", window_len=window_len,
                      loss_threshold=tau, window_prefix="cached"), cached)(batch)
    ErasureStep(exact_student, tiny_bundle, teacher, EraseConfig(update_mode="window", window_len=window_len,
                loss_threshold=tau), exact)(batch)
    assert cached.losses[0] == exact.losses[0]

    teach = _outputs(teacher, batch.surrogate_tokens)
    target = 2 * teach.on_surrogate - teach.on_target
    ids, mask = tiny_bundle.encode_prompts(TARGETS)
    p = ids.shape[1]
    full_mask = torch.cat([mask, torch.ones(2, 15, dtype=mask.dtype)], 1)
    positions = position_ids_from_mask(full_mask)
    lm = ref_student.model.language_model
    cache = DynamicCache()

    def forward(embeds, end):  # sequence positions end - len .. end - 1, through the cache
        out = lm(inputs_embeds=embeds, attention_mask=full_mask[:, :end],
                 position_ids=positions[:, end - embeds.shape[1]:end], past_key_values=cache, use_cache=True)
        return out.last_hidden_state[:, -1]

    steps, kept, losses = 0, 0, []
    for start in range(0, 16, window_len):
        states = []
        for i in range(start, min(start + window_len, 16)):  # image position i predicts image token i
            if i == 0:  # the prompt, ending in begin-of-image, with the first window's student
                states.append(forward(ref_student.get_input_embeddings()(ids), p))
            else:
                token = batch.surrogate_tokens[:, i - 1: i]
                states.append(forward(ref_student.prepare_embeddings_for_image_generation(token), p + i))
        h = torch.stack(states, 1)
        sums = ((h - target[:, start: start + h.shape[1]]) ** 2).mean(-1).sum(1)
        keep = sums.detach() >= tau
        if keep.any():
            loss = sums[keep].sum() / (2 * h.shape[1])
            losses.append(float(loss.detach()))
            loss.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            steps += 1
            kept += int(keep.sum())
        for layer in cache.layers:  # what later windows read is what was computed here
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    assert res.optimizer_steps == steps and res.windows_kept == kept and 0 < kept < 6
    assert cached.losses == pytest.approx(losses, rel=1e-4)
    _assert_same_updates(before, _trained(student, names), _trained(ref_student, names))
    # and it is another objective than the exact one once the student has moved
    assert cached.losses[1:] != pytest.approx(exact.losses[1:], rel=1e-2)


def test_masked_windows_change_nothing(tiny_bundle):
    names, teacher, student, opt = _setup(tiny_bundle)
    before = _trained(student, names)
    cfg = EraseConfig(update_mode="sequence", window_len=4, loss_threshold=1e9)
    res = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(_batch(tiny_bundle))
    assert res.windows_kept == 0 and res.optimizer_steps == 0 and res.windows_total == 8
    for n, v in _trained(student, names).items():
        assert torch.equal(v, before[n])
        assert dict(student.named_parameters())[n].grad is None


def test_per_concept_window_length_and_threshold(tiny_bundle):
    from ear_dist.config import ConceptOverride

    names, teacher, student, opt = _setup(tiny_bundle)
    batch = _batch(tiny_bundle)
    batch.concepts = ["church", "van gogh"]
    cfg = EraseConfig(update_mode="sequence", window_len=4, loss_threshold=0.0,
                      concepts={"van gogh": ConceptOverride(window_len=8)})
    res = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(batch)
    assert res.windows_total == 4 + 2


@pytest.mark.parametrize("method", ["svare", "esd"])
def test_svare_and_esd_baseline_train(tiny_bundle, method):
    names, teacher, student, opt = _setup(tiny_bundle)
    before = _trained(student, names)
    cfg = EraseConfig(method=method, target_mode="logit")
    res = ErasureStep(student, tiny_bundle, teacher, cfg, Updater(opt))(_batch(tiny_bundle))
    assert res.optimizer_steps == 1 and res.loss > 0
    assert any(not torch.equal(v, before[n]) for n, v in _trained(student, names).items())
    if method == "svare":
        assert 0 < res.extras["counted"] <= 32 and res.extras["preserve"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("rollout_from", ["surrogate", "target"])
def test_the_teacher_samples_from_the_prompt_the_config_names(tiny_bundle, rollout_from):
    """erase.rollout_from decides which prompt the rollout comes from, and which stored tokens a pair uses."""
    _, teacher, student, opt = _setup(tiny_bundle)
    settings = TeacherSettings.from_config(EraseConfig(rollout_from=rollout_from), RolloutConfig(greedy=True))
    batch = PairBatch(TARGETS, SURROGATES, ["church"] * 2, [0, 1])
    request = TeacherRequest.from_batch(settings, batch)
    assert request.rollout_prompts == (SURROGATES if rollout_from == "surrogate" else TARGETS)
    want = teacher.rollout(request)
    ids, mask = tiny_bundle.encode_prompts(request.rollout_prompts)
    from ear_dist.models.janus.rollout import rollout_ids

    torch.testing.assert_close(want, rollout_ids(tiny_bundle, ids, mask, 5.0, greedy=True, seeds=[0, 1]))
    assert not torch.equal(want, teacher.rollout(TeacherRequest(
        TeacherSettings(rollout_from="target" if rollout_from == "surrogate" else "surrogate", greedy=True),
        TARGETS, SURROGATES, [0, 1])))
    stored = PairBatch(TARGETS, SURROGATES, ["church"] * 2, [0, 1], surrogate_tokens=torch.zeros(2, 16).long(),
                       target_tokens=torch.ones(2, 16).long())
    got = TeacherRequest.from_batch(settings, stored).tokens
    assert int(got[0, 0]) == (0 if rollout_from == "surrogate" else 1)


def test_svare_with_target_rollouts_is_a_config_error():
    with pytest.raises(ConfigError, match="erase.rollout_from: target with erase.method=svare"):
        load_config(overrides=["erase.method=svare", "erase.rollout_from=target"])


# ----------------------------------------------------------------------------- the job


def _pairs():
    return [PromptPair(t, s, "church") for t, s in zip(TARGETS, SURROGATES)]


def _cfg(tmp_path, model, *overrides):
    return load_config(overrides=[f"model.path={model}", f"train.out_dir={tmp_path / 'run'}", "train.steps=3",
                                  "erase.window_len=4", "optim.lr=1e-2", "erase.loss_threshold=0", *overrides])


def test_delta_round_trip_and_merge_loads_in_plain_transformers(tmp_path, tiny_checkpoint):
    from ear_dist.cli import main

    summary = run_erase(_cfg(tmp_path, tiny_checkpoint), _pairs(), progress=False)
    tensors, meta = load_delta(summary["delta"])
    assert meta["concepts"] == ["church"] and meta["config"]["erase"]["window_len"] == 4
    assert all(".self_attn." in n for n in tensors) and len(tensors) == 20
    base = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert any(not torch.equal(base.state_dict()[n], t) for n, t in tensors.items())
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and list((tmp_path / "run").glob("events.out.tfevents.*"))

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_checkpoint), "--delta", summary["delta"], "--out", str(out)]) == 0
    merged = JanusForConditionalGeneration.from_pretrained(out)
    for n, t in tensors.items():  # base + (trained - base) in float32: equal to rounding
        torch.testing.assert_close(merged.state_dict()[n], t, rtol=0, atol=1e-7)
    untouched = "model.generation_head.vision_head.weight"
    assert torch.equal(merged.state_dict()[untouched], base.state_dict()[untouched])
    assert load_janus(str(out), device="cpu").tokenizer is not None


def test_delta_on_the_wrong_base_is_a_clear_error(tmp_path, tiny_checkpoint):
    from ear_dist.models.janus import build_preset

    summary = run_erase(_cfg(tmp_path, tiny_checkpoint), _pairs(), progress=False)
    other = build_preset("tiny", seed=123).model
    with pytest.raises(DeltaError, match="trained from base model"):
        apply_deltas(other, [summary["delta"]])


def test_empty_prompt_and_missing_concept(tmp_path, tiny_checkpoint):
    with pytest.raises(ValueError, match="field 'surrogate' is empty"):
        run_erase(_cfg(tmp_path, tiny_checkpoint), [PromptPair("a church", " ", "church")], progress=False)
    pairs = _pairs() + [PromptPair("a photo of a house", "a photo of a barn", "church")]
    summary = run_erase(_cfg(tmp_path, tiny_checkpoint), pairs, progress=False)
    assert summary["missing_concept"] == 1
    with pytest.raises(ValueError, match="does not contain the concept 'church'"):
        run_erase(_cfg(tmp_path, tiny_checkpoint, "erase.on_missing_concept=fail"), pairs, progress=False)
    # a preservation anchor (surrogate == target) carries no concept word and is not reported
    anchored = _pairs() + [PromptPair("a photo of a house", "a photo of a house", "church")]
    summary = run_erase(_cfg(tmp_path, tiny_checkpoint, "erase.on_missing_concept=fail",
                             f"train.out_dir={tmp_path / 'anchored'}"), anchored, progress=False)
    assert summary["missing_concept"] == 0


def test_window_len_longer_than_the_image_is_rejected(tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match="window_len: 17 > the model's 16 image tokens"):
        run_erase(_cfg(tmp_path, tiny_checkpoint, "erase.window_len=17"), _pairs(), progress=False)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    from ear_dist.models import family
    from ear_dist.models.janus import build_preset, save_janus

    bundle = build_preset("tiny", seed=0)
    with torch.no_grad():
        bundle.model.model.language_model.layers[3].mlp.down_proj.weight.fill_(float("inf"))
    # the loader refuses such a model (test_bad_inputs: generate-model-not-finite); here its losses stand for any that go non-finite
    monkeypatch.setattr(family, "check_finite_weights", lambda model, where: None)
    path = save_janus(bundle, tmp_path / "broken")
    cfg = _cfg(tmp_path, path, "train.max_nonfinite_steps=2", "train.steps=5")
    tokens = [1] * 16
    pairs = [PromptPair(t, s, "church", surrogate_tokens=tokens) for t, s in zip(TARGETS, SURROGATES)]
    with pytest.raises(TrainingError, match="2 steps with a non-finite loss"):
        run_erase(cfg, pairs, progress=False)


@pytest.mark.parametrize("update", ["sequence", "window"])
def test_joint_run_logs_per_concept_windows(tmp_path, tiny_checkpoint, update):
    from ear_dist.telemetry.writer import read_jsonl

    pairs = [PromptPair("a photo of a church", "a photo of a barn", "church"),
             PromptPair("a castle in the style of van gogh", "a castle", "van gogh")]
    cfg = _cfg(tmp_path, tiny_checkpoint, "train.pairs_per_step=2", f"erase.update_mode={update}",
               "erase.concepts={van gogh: {window_len: 8}}")
    run_erase(cfg, pairs, progress=False)
    rows = list(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert len(rows) == 3
    for r in rows:
        assert r["windows_total/church"] == 4 and r["windows_total/van gogh"] == 2  # 16 tokens / 4 and / 8
        assert r["windows_total"] == 6
        assert r["windows_kept/church"] + r["windows_kept/van gogh"] == r["windows_kept"]


def test_merge_refuses_opposing_deltas_under_conflicts_error(tmp_path, tiny_checkpoint):
    from ear_dist.cli import main
    from ear_dist.models.delta import save_delta

    summary = run_erase(_cfg(tmp_path, tiny_checkpoint), _pairs(), progress=False)
    tensors, meta = load_delta(summary["delta"])
    base = JanusForConditionalGeneration.from_pretrained(tiny_checkpoint).state_dict()
    opposite = {n: 2 * base[n] - t for n, t in tensors.items()}  # the same change, reversed
    other = save_delta(tmp_path / "opposite.safetensors", opposite, meta["base_fingerprint"], meta["base_model"],
                       ["barn"], meta["config"])
    args = ["merge", "--base", str(tiny_checkpoint), "--delta", summary["delta"], "--delta", str(other),
            "--out", str(tmp_path / "merged")]
    assert main(args + ["--conflicts", "error"]) == 2
    assert not (tmp_path / "merged").exists()
    assert main(args) == 0  # warn (default): merges, and the two changes cancel out
    merged = JanusForConditionalGeneration.from_pretrained(tmp_path / "merged").state_dict()
    for n in tensors:
        torch.testing.assert_close(merged[n], base[n], rtol=0, atol=1e-6)


class GradientRecorder(Updater):
    """Keeps every loss it backpropagates and the gradients of every update it takes."""

    def __init__(self, optimizer, names, student):
        super().__init__(optimizer)
        self.params = {n: p for n, p in student.named_parameters() if n in names}
        self.losses, self.grads = [], []

    def backward(self, loss):
        self.losses.append(float(loss.detach()))
        super().backward(loss)

    def step(self):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.params.items()})
        super().step()


def test_pairs_batched_into_each_window_update_equal_the_per_pair_path(tiny_bundle):
    """train.pairs_per_step > 1: one window update takes every pair's window at once (one forward and
    backward of B rows). In float32 it equals the plain per-pair path: each pair alone (B=1, no padding),
    its kept window's sum over the window's tokens of all pairs, gradients accumulated over the pairs,
    then one optimizer step: the same losses, gradients and updates, window after window."""
    targets = ["a photo of a church", "a gothic church with two tall towers at dawn", "a church"]
    surrogates = ["a photo of a barn", "a gothic castle with two tall towers at dawn", "a barn"]
    names, teacher, student, opt = _setup(tiny_bundle)
    ref_student = copy.deepcopy(student)
    ref_params = {n: p for n, p in ref_student.named_parameters() if n in names}
    ref_opt = torch.optim.Adam(list(ref_params.values()), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, tiny_bundle.codebook_size, (3, tiny_bundle.num_image_tokens), generator=g)
    batch = PairBatch(targets, surrogates, ["church"] * 3, [0, 1, 2], tokens)
    assert len({int(m.sum()) for m in tiny_bundle.encode_prompts(targets)[1]}) == 3  # padded rows in the batch
    window_len, n = 6, tiny_bundle.num_image_tokens

    def pair_outputs(i, student_model):
        settings = TeacherSettings(mode="hidden")
        teach = teacher.forward_targets(TeacherRequest(settings, targets[i:i + 1], surrogates[i:i + 1], [i]),
                                        tokens[i:i + 1])
        ids, mask = tiny_bundle.encode_prompts(targets[i:i + 1])
        h, _ = teacher_forced(student_model, ids, mask, tokens[i:i + 1], return_logits=False)
        return ((h - (2 * teach.on_surrogate - teach.on_target)) ** 2).mean(-1)[0]  # [T], eta = 1

    with torch.no_grad():  # a threshold between the windows' sums: some kept, some masked
        sums = torch.cat([pair_outputs(i, student).split(window_len)[w].sum().reshape(1)
                          for i in range(3) for w in range(-(-n // window_len))])
    tau = float(sums.median())
    cfg = EraseConfig(update_mode="window", window_len=window_len, loss_threshold=tau, erase_guidance=1.0)
    before = _trained(student, names)
    batched = GradientRecorder(opt, names, student)
    res = ErasureStep(student, tiny_bundle, teacher, cfg, batched)(batch)

    losses, grads, kept = [], [], 0
    for start in range(0, n, window_len):
        width = min(window_len, n - start)
        total, any_kept = 0.0, False
        for i in range(3):  # one pair at a time, gradients accumulated
            s = pair_outputs(i, ref_student)[start:start + width].sum()
            if s.item() >= tau:
                loss = s / (3 * width)
                loss.backward()
                total += float(loss.detach())
                any_kept, kept = True, kept + 1
        if any_kept:
            losses.append(total)
            grads.append({name: p.grad.detach().clone() for name, p in ref_params.items()})
            ref_opt.step()
            ref_opt.zero_grad()
    assert 0 < kept < 9 and res.windows_kept == kept and res.optimizer_steps == len(losses) >= 2
    assert batched.losses == pytest.approx(losses, rel=1e-5)
    for got, want in zip(batched.grads, grads):
        for name in names:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7)
    _assert_same_updates(before, _trained(student, names), _trained(ref_student, names))
