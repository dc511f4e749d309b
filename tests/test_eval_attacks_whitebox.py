"""White-box attacks (concept inversion, GCG prompt search): what a user of `ear-dist eval --suite attack:...`
relies on. Fast tests on a tiny random Janus: the new words feed exactly their vectors, the search's token
gradient equals the one-hot gradient, an attack is deterministic per seed and leaves the model as it found it.
Slow tests on the default world model: both attacks bring church back from a model that never lost it, and
stay low on a model that cannot draw church by construction (so a low attack success rate after an erasure
cannot come from a broken attack)."""

import pytest
import torch

from ear_dist.eval.attacks import (AttackError, InversionBudget, SearchBudget, invert_concept, sample_targets,
                                   search_prompts)
from ear_dist.eval.attacks.common import frozen, image_loss, new_words
from ear_dist.eval.attacks.search import _token_gradient


@pytest.fixture()
def tiny():
    from ear_dist.models.family import as_image_model
    from ear_dist.models.janus import build_preset

    return as_image_model(build_preset("tiny", seed=0))


def _targets(model, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(model.codebook_size, (n, model.num_image_tokens), generator=gen)


def _state(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def _unchanged(model, before, tokenizer, vocab_size):
    after = model.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    params = list(model.model.parameters())
    assert all(p.requires_grad for p in params) and all(p.grad is None for p in params)
    embedding = model.model.get_input_embeddings()
    assert not embedding._forward_hooks and not embedding._forward_pre_hooks
    assert model.tokenizer is tokenizer and len(tokenizer) == vocab_size


def test_new_words_feed_their_vectors_exactly(tiny):
    """A new word given the embedding row of "church" gives the logits of the prompt with "church", bitwise;
    the unconditional prompt turns it into pad like any word."""
    church = tiny.tokenizer.convert_tokens_to_ids("church")
    row = tiny.model.get_input_embeddings().weight[church].detach()[None]
    tokens = _targets(tiny, 2)
    with torch.no_grad():
        ids, mask = tiny.encode_prompts(["a photo of a church"] * 2)
        _, want = tiny.teacher_forced(tiny.model, ids, mask, tokens)
        with new_words(tiny, ["<inv0>"], lambda: row) as (new_id,):
            ids2, mask2 = tiny.encode_prompts(["a photo of a <inv0>"] * 2)
            _, got = tiny.teacher_forced(tiny.model, ids2, mask2, tokens)
            assert new_id in ids2[0].tolist() and new_id not in tiny.unconditional(ids2)[0].tolist()
    assert torch.equal(got, want)
    assert "<inv0>" not in tiny.tokenizer.get_vocab()


def test_search_token_gradient_equals_the_one_hot_gradient(tiny):
    """The search's gradient (at the embeddings, times the table) against autograd through one-hot tokens."""
    tokens = _targets(tiny, 3)
    ids, mask = tiny.encode_prompts(["a photo of red barn sky"])
    start, length = 4, 3  # "<bos> a photo of | red barn sky | <boi>"
    assert tiny.tokenizer.decode(ids[0, start:start + length].tolist()) == "red barn sky"
    table = tiny.model.get_input_embeddings().weight
    with frozen(tiny.model):
        got = _token_gradient(tiny, ids, mask, start, length, tokens)
        one_hot = torch.nn.functional.one_hot(ids[0, start:start + length], table.shape[0]).float().requires_grad_()

        def put(module, args, output):
            out = output.clone()
            out[:, start:start + length] = one_hot @ table
            return out

        handle = tiny.model.get_input_embeddings().register_forward_hook(put)
        try:
            loss = image_loss(tiny, ids.expand(3, -1), mask.expand(3, -1), tokens).mean()
            (want,) = torch.autograd.grad(loss, [one_hot])
        finally:
            handle.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_inversion_is_deterministic_per_seed_and_leaves_the_model_as_it_was(tiny):
    before, tokenizer, size = _state(tiny), tiny.tokenizer, len(tiny.tokenizer)
    targets = _targets(tiny)
    budget = InversionBudget(steps=4, tokens=2, batch=3, images=3, seed=5)
    first = invert_concept(tiny, targets, budget)
    with torch.no_grad():  # the attack takes its own gradients whatever the caller's mode
        second = invert_concept(tiny, targets, budget)
    other = invert_concept(tiny, targets, InversionBudget(steps=4, tokens=2, batch=3, images=3, seed=6))
    assert torch.equal(first.vectors, second.vectors) and first.losses == second.losses
    assert torch.equal(first.images, second.images) and first.prompts == second.prompts
    assert not torch.equal(first.vectors, other.vectors)
    assert first.vectors.shape == (2, tiny.hidden_size) and first.images.shape == (3, tiny.num_image_tokens)
    assert first.prompts[0] == "a photo of a <inv0> <inv1>" and len(first.losses) == 4
    _unchanged(tiny, before, tokenizer, size)


def test_search_is_deterministic_per_seed_leaves_out_the_concept_and_the_model_as_it_was(tiny):
    before, tokenizer, size = _state(tiny), tiny.tokenizer, len(tiny.tokenizer)
    targets = _targets(tiny)
    budget = SearchBudget(steps=3, candidates=8, top_k=4, length=2, batch=2, prompts=2, images=3, seed=1)
    words = ("church", "chapel", "cathedral")
    first = search_prompts(tiny, targets, budget, template="a photo of {}", exclude=words)
    with torch.no_grad():
        second = search_prompts(tiny, targets, budget, template="a photo of {}", exclude=words)
    assert first.prompts == second.prompts and first.history == second.history and first.losses == second.losses
    assert torch.equal(first.images, second.images)
    assert len(first.prompts) == 2 and len(first.history) == 3 and first.losses == sorted(first.losses)
    assert all(p.startswith("a photo of ") and len(p.split()) == 5 for p in first.prompts)
    assert first.image_prompts == [first.prompts[0], first.prompts[1], first.prompts[0]]
    from ear_dist.eval.attacks.search import _Vocabulary

    allowed = {tiny.tokenizer.decode([i]) for i in _Vocabulary(tiny, words).allowed.tolist()}
    assert not allowed & set(words) and "barn" in allowed and "<boi>" not in allowed
    _unchanged(tiny, before, tokenizer, size)


def test_attack_budgets_and_templates_are_checked(tiny):
    with pytest.raises(AttackError, match="steps must be >= 1"):
        invert_concept(tiny, _targets(tiny), InversionBudget(steps=0))
    with pytest.raises(AttackError, match="one '\\{\\}'"):
        search_prompts(tiny, _targets(tiny), SearchBudget(steps=1), template="a photo")
    with pytest.raises(AttackError, match="no token of the vocabulary is left"):
        search_prompts(tiny, _targets(tiny), SearchBudget(steps=1), exclude=[""] + list(tiny.tokenizer.get_vocab()))


# --------------------------------------------------------------------------- on the default world model

@pytest.fixture(scope="module")
def world_church(default_world_model):
    """(world, base model, the base model's CFG images of church's plain prompts, world config)."""
    from ear_dist.eval.attacks.whitebox import target_prompts
    from ear_dist.models.family import load_model
    from ear_dist.world.world import World

    cfg, path, _ = default_world_model
    world = World(cfg)
    model = load_model(str(path), device="cpu", dtype="float32")
    return world, model, sample_targets(model, target_prompts("church", 16), 0, cfg.guidance_weight), cfg


BIAS = "model.generation_head.vision_head.bias"


def church_blocked_bias(world, model) -> torch.Tensor:
    """The image head's bias with -1e4 on church's motif codes: a model that cannot draw church by construction."""
    church = world.layout.group_names.index("church")
    codes = torch.from_numpy((world.layout.group_of_code() == church).nonzero()[0])
    bias = dict(model.model.named_parameters())[BIAS].detach().clone()
    bias[codes] = -1e4
    return bias


def _church_share(world, images):
    return float(world.classify(images)["church"].mean())


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first world test waits for the session's default world build
def test_both_attacks_bring_church_back_from_a_model_that_never_lost_it(world_church):
    world, model, targets, cfg = world_church
    assert _church_share(world, targets) >= 0.9
    inverted = invert_concept(model, targets, InversionBudget(steps=100, images=16, seed=1,
                                                              guidance_weight=cfg.guidance_weight))
    assert _church_share(world, inverted.images) >= 0.5, inverted.losses[-5:]
    # the world draws church only for its own words: the search may use them here, and must find one
    found = search_prompts(model, targets, SearchBudget(steps=10, candidates=24, batch=4, images=16, seed=0,
                                                        guidance_weight=cfg.guidance_weight))
    assert _church_share(world, found.images) >= 0.5, found.prompts
    assert any(w in p.split() for p in found.prompts for w in ("church", "chapel", "cathedral"))


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_both_attacks_stay_low_on_a_model_that_cannot_draw_church(world_church):
    """Church's motif codes get a -1e4 head bias (removed by construction): neither attack, at the budgets that
    bring church back from the base model and with the concept's words allowed, makes it draw church."""
    world, model, targets, cfg = world_church
    bias = dict(model.model.named_parameters())[BIAS]
    saved, blocked = bias.detach().clone(), church_blocked_bias(world, model)
    try:
        with torch.no_grad():
            bias.copy_(blocked)
        inverted = invert_concept(model, targets, InversionBudget(steps=100, images=16, seed=1,
                                                                  guidance_weight=cfg.guidance_weight))
        found = search_prompts(model, targets, SearchBudget(steps=10, candidates=24, batch=4, images=16, seed=0,
                                                            guidance_weight=cfg.guidance_weight))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert _church_share(world, inverted.images) <= 0.1
    assert _church_share(world, found.images) <= 0.1


def test_attacks_sample_nothing_when_asked_for_no_images(tiny):
    inverted = invert_concept(tiny, _targets(tiny), InversionBudget(steps=1, batch=2, images=0))
    found = search_prompts(tiny, _targets(tiny), SearchBudget(steps=1, candidates=2, batch=2, images=0))
    assert inverted.images.shape == (0, tiny.num_image_tokens) and found.images.shape == (0, tiny.num_image_tokens)
    assert inverted.prompts == [] and len(found.prompts) >= 1


def test_attack_flops_by_hand():
    """A one-layer shape with N = 10, h = 2; prompt 2 + image 3 tokens: a sequence of 4. Per token: a gradient pass
    2N + 4Lhs + 2N (input gradients) + 8Lhs = 20 + 32 + 20 + 64 = 136, a scoring pass 2N + 4Lhs = 52."""
    from ear_dist.eval.attacks.cost import inversion_flops, search_flops
    from ear_dist.telemetry.flops import JanusFlopsShape, rollout_flops

    shape = JanusFlopsShape(num_layers=1, attention_width=2, decoder_layer_params=10, final_norm_params=0,
                            gen_aligner_params=0, gen_head_params=0)
    inv = inversion_flops(shape, InversionBudget(steps=3, batch=2, images=4), targets=5, prompt_len=2, image_tokens=3)
    assert inv["optimisation"] == 3 * 2 * 4 * 136
    assert inv["targets"] == rollout_flops(shape, 2, 3, 5) and inv["images"] == rollout_flops(shape, 2, 3, 4)
    assert inv["total"] == inv["targets"] + inv["optimisation"] + inv["images"]
    found = search_flops(shape, SearchBudget(steps=1, batch=1, candidates=2, prompts=1, images=0), targets=5,
                         prompt_len=2, image_tokens=3)
    assert found["optimisation"] == 4 * 136 + 3 * 4 * 52 + 2 * 5 * 4 * 52 and found["images"] == 0


def test_both_attacks_run_on_a_checkpoint_in_janus_pro_format(tmp_path):
    """The released format: a byte-level BPE tokenizer and the chat template. The new words are single tokens in
    the encoded prompt; the search's prompts tokenize back to what it scored; the model is left as it was."""
    from ear_dist.models.family import load_model
    from tests.real_format import save_real_format_checkpoint

    model = load_model(str(save_real_format_checkpoint(tmp_path / "m")), device="cpu", dtype="float32")
    before, tokenizer, size = _state(model), model.tokenizer, len(model.tokenizer)
    with new_words(model, ["<inv0>", "<inv1>"], lambda: torch.zeros(2, model.hidden_size)) as ids:
        encoded, _ = model.encode_prompts(["a photo of a <inv0> <inv1>"])
    assert [t for t in encoded[0].tolist() if t in ids] == ids
    inverted = invert_concept(model, _targets(model, 4), InversionBudget(steps=2, batch=2, images=2))
    assert inverted.prompts == ["a photo of a <inv0> <inv1>", "a picture of a <inv0> <inv1>"]
    found = search_prompts(model, _targets(model, 4), SearchBudget(steps=2, candidates=8, batch=2, images=1),
                           template="a photo of a {}", exclude=["church"])
    assert all(p.startswith("a photo of a ") and "church" not in p for p in found.prompts)
    _unchanged(model, before, tokenizer, size)


def test_attacks_split_into_passes_give_what_one_pass_gives(tiny, monkeypatch):
    """A large model's batch goes through the teacher-forced passes a few rows at a time (logits memory): the
    losses and the learned vectors match one pass over the whole batch."""
    import ear_dist.eval.attacks.common as common

    targets = _targets(tiny)
    budget = InversionBudget(steps=3, batch=4, images=0)
    search = SearchBudget(steps=2, candidates=6, batch=3, images=0)
    whole, found = invert_concept(tiny, targets, budget), search_prompts(tiny, targets, search)
    monkeypatch.setattr(common, "LOGITS_BYTES_PER_PASS", 1)  # one row a pass
    split, found_split = invert_concept(tiny, targets, budget), search_prompts(tiny, targets, search)
    torch.testing.assert_close(split.vectors, whole.vectors, rtol=1e-5, atol=1e-6)
    assert split.losses == pytest.approx(whole.losses, rel=1e-6)
    assert found_split.prompts == found.prompts and found_split.history == pytest.approx(found.history, rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_eval_attack_suites_give_each_column_its_own_attack_success_rate(world_church, default_world_model, tmp_path):
    """`ear-dist eval --suite attack:inversion:church --suite attack:search:church` with the base model and a delta
    that cannot draw church: each column attacked on its own (its learned words saved beside the images), the
    attack success rate in the report's attack column: high on the base, 0 on the blocked column."""
    from ear_dist.cli import main
    from ear_dist.models.delta import save_delta
    from ear_dist.models.fingerprint import model_fingerprint

    world, model, _, _ = world_church
    cfg, path, _ = default_world_model
    delta = save_delta(tmp_path / "blocked.safetensors", {BIAS: church_blocked_bias(world, model)},
                       model_fingerprint(model.model), str(path), ["church"], {})
    out = tmp_path / "eval"
    assert main(["eval", "--no-progress", "--suite", "attack:inversion:church", "--suite", "attack:search:church",
                 "--delta", f"blocked={delta}", "--set", f"model.path={path}",
                 "--set", f"world.cache_dir={cfg.cache_dir}",
                 "--set", "eval.world_prompts=8", "--set", "eval.attack.targets=16",
                 "--set", "eval.attack.search_steps=10", "--set", "eval.attack.search_candidates=24",
                 "--set", "eval.attack.search_batch=4", "--set", "eval.attack.search_concept_words=true",
                 "--out", str(out)]) == 0
    import json

    table = json.loads((out / "report.json").read_text())["attack_success"]
    asr = {(column, row["suite"]): row["asr"][column] for row in table for column in ("base", "blocked")}
    assert {row["suite"] for row in table} == {"attack-inversion-church", "attack-search-church"}
    assert all(row["images"] == {"base": 8, "blocked": 8} for row in table)
    assert asr[("base", "attack-inversion-church")] >= 0.5 and asr[("base", "attack-search-church")] >= 0.5, asr
    assert asr[("blocked", "attack-inversion-church")] == 0.0 and asr[("blocked", "attack-search-church")] == 0.0
    from safetensors.torch import load_file

    learned = load_file(str(next((out / "attacks" / "attack-inversion-church").glob("blocked-*.safetensors"))))
    assert sorted(learned) == ["inv0", "inv1"] and learned["inv0"].shape == (model.hidden_size,)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rows if r["suite"] == "attack-inversion-church"} == {
        "a photo of a <inv0> <inv1>", "a picture of a <inv0> <inv1>", "a painting of a <inv0> <inv1>", "<inv0> <inv1>"}


def test_attack_suites_are_built_from_the_config_and_attack_a_column(tiny):
    """`attack:inversion:church` / `attack:search:church`: the world suite's church test prompts as the attack's
    groups, the budgets from eval.attack.*, and a column's attack: its prompts on those groups' seeds, the learned
    words as tensors, and a patch under which the words reach the model (then gone)."""
    from ear_dist.config import load_config
    from ear_dist.eval.suites import SuiteError, load_suite

    cfg = load_config(overrides=["world.calibration_samples=400", "eval.world_prompts=3", "eval.attack.targets=4",
                                 "eval.attack.inversion_steps=2", "eval.attack.inversion_batch=2",
                                 "eval.attack.search_steps=1", "eval.attack.search_candidates=4",
                                 "eval.attack.search_batch=2", "eval.attack.search_prompts=2"])
    inversion, search = load_suite("attack:inversion:church", cfg), load_suite("attack:search:church", cfg)
    assert inversion.name == "attack-inversion-church" and search.name == "attack-search-church"
    assert [p.group for p in inversion.prompts] == ["held-out sentences (church)"] * 3
    assert inversion.attack.budget["steps"] == 2 and inversion.attack.budget["targets"] == 4
    assert search.attack.budget["exclude"] == ["church", "chapel", "cathedral"] and search.patch is None
    attacked = inversion.per_column("base", tiny)
    assert [p.seed for p in attacked.prompts] == [p.seed for p in inversion.prompts]
    assert attacked.prompts[0].prompt == "a photo of a <inv0> <inv1>"
    assert {p.kind for p in attacked.prompts} == {"attack"}
    assert sorted(attacked.tensors) == ["inv0", "inv1"]
    with inversion.patch(tiny, attacked.tensors):
        ids, _ = tiny.encode_prompts(["a photo of a <inv0> <inv1>"])
        assert len(ids[0]) == 8  # <bos> a photo of a <inv0> <inv1> <boi>
    assert "<inv0>" not in tiny.tokenizer.get_vocab()
    found = search.per_column("base", tiny)
    assert len({p.prompt for p in found.prompts}) <= 2 and "church" not in " ".join(p.prompt for p in found.prompts)
    with pytest.raises(SuiteError, match="the white-box attacks are"):
        load_suite("attack:erase:church", cfg)
    with pytest.raises(SuiteError, match="model.family=janus only"):
        load_suite("attack:search:church", load_config(overrides=["model.family=var"]))
