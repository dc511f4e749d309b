"""Adversarial erasure (erase.adversarial.*): attacks on the student during training join its pairs."""

import json

import pytest
import torch

from ear_dist.config import ConfigError, load_config
from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import PairStream
from ear_dist.models.delta import load_delta
from ear_dist.train.adversarial import RECORD_FILE, SOURCE, read_records
from ear_dist.train.trainer import run_erase

TARGETS = ["a photo of a church", "a church at night", "a painting of a church", "a church in the snow"]
SURROGATES = ["a photo of a barn", "a castle at night", "a painting of a barn", "a castle in the snow"]
ADV = ["erase.adversarial.every=2", "erase.adversarial.steps=2", "erase.adversarial.candidates=4",
       "erase.adversarial.top_k=4", "erase.adversarial.length=2", "erase.adversarial.batch=2",
       "erase.adversarial.targets=4", "erase.adversarial.prompts=2", "erase.adversarial.exclude=[chapel]"]


def _pairs():
    return [PromptPair(t, s, "church") for t, s in zip(TARGETS, SURROGATES)]


def _stop_at(n):
    """should_stop that says yes on its n-th call (after step n)."""
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return calls["n"] == n

    return should_stop


def _cfg(tmp_path, model, name, *extra):
    return load_config(overrides=[f"model.path={model}", f"train.out_dir={tmp_path / name}", "train.steps=5",
                                  "train.pairs_per_step=2", "erase.window_len=4", "optim.lr=1e-2",
                                  "erase.loss_threshold=0", "trainable.first_k_layers=2", *extra])


def test_added_pairs_train_from_the_next_batch_and_the_order_is_reproducible():
    pairs = [PromptPair(f"a photo of a church {i}", "a photo", "church") for i in range(6)]
    extra = [PromptPair("a photo of a grand many", "a photo", "church", source=SOURCE)]

    def draw(add_after):
        stream = PairStream(pairs, 2, seed=3)
        out = []
        for step in range(12):
            if step == add_after:
                stream.add(extra)
            out.append([p.target for p in stream.next().pairs])
        return out

    plain, added, again = draw(-1), draw(4), draw(4)
    assert added == again  # the same additions after the same batch: the same batches
    assert added[:4] == plain[:4]  # nothing changes before the addition
    seen = [t for batch in added[4:] for t in batch]
    assert extra[0].target in seen and all(extra[0].target not in b for b in added[:4])
    assert len(stream_pairs := PairStream(pairs, 2).pairs) == 6 and stream_pairs is not pairs


@pytest.mark.parametrize("override, message", [
    ("erase.adversarial.every=-1", "erase.adversarial.every: must be >= 0"),
    ("erase.adversarial.template=a photo", "must hold one '{}'"),
    ("dist.teacher_placement=offline", "dist.teacher_placement=colocated"),
    ("dist.deepspeed_config=zero3", "ZeRO-3"),
    ("erase.adversarial.steps=0", "erase.adversarial.steps: must be >= 1"),
])
def test_adversarial_settings_are_checked_before_a_job_starts(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        load_config(overrides=["erase.adversarial.every=5", override]).validate()


@pytest.mark.parametrize("attack", ["search", "inversion"])
def test_adversarial_run_adds_the_attacks_prompts_and_resumes_to_the_same_delta(tmp_path, tiny_checkpoint, attack):
    plain = run_erase(_cfg(tmp_path, tiny_checkpoint, "plain"), _pairs(), progress=False)
    adv = [*ADV, f"erase.adversarial.attack={attack}"]
    cfg = _cfg(tmp_path, tiny_checkpoint, "adv", *adv)
    summary = run_erase(cfg, _pairs(), progress=False)
    records = read_records(tmp_path / "adv")
    assert [r["after"] for r in records] == [2, 4]  # every 2 steps, never after the last
    for i, r in enumerate(records):
        prompts = r["attacks"]["church"]["prompts"]
        assert len(prompts) == 2 and len(r["pairs"]) == 2
        if attack == "search":
            assert all(p.startswith("a photo of a ") for p in prompts)
            assert not any(w in p.split() for p in prompts for w in ("church", "chapel"))  # the excluded words
        else:  # each attack's own learned words, their embeddings kept in the record
            words = r["attacks"]["church"]["words"]
            assert words == [f"<adv{i}_{2 * i}>", f"<adv{i}_{2 * i + 1}>"]
            assert all(" ".join(words) in p for p in prompts)
            assert torch.tensor(r["attacks"]["church"]["vectors"]).shape == (2, 64)
        for pair, prompt in zip(r["pairs"], prompts):
            assert pair["target"] == prompt and pair["surrogate"] in SURROGATES and pair["source"] == SOURCE
    delta, _ = load_delta(summary["delta"])
    other, _ = load_delta(plain["delta"])
    assert any(not torch.equal(delta[k], other[k]) for k in delta)  # the added pairs changed what trained

    # stopped after step 3 (one attack recorded), resumed: the same records and delta as the unbroken run
    cfg = _cfg(tmp_path, tiny_checkpoint, "adv-resumed", *adv)
    assert run_erase(cfg, _pairs(), progress=False, should_stop=_stop_at(3))["stopped"]
    assert [r["after"] for r in read_records(tmp_path / "adv-resumed")] == [2]
    resumed = run_erase(cfg, _pairs(), progress=False)
    assert read_records(tmp_path / "adv-resumed") == records
    again, _ = load_delta(resumed["delta"])
    for k in delta:
        torch.testing.assert_close(again[k], delta[k], rtol=0, atol=1e-6)


def test_records_made_after_the_checkpoint_are_dropped_on_resume(tmp_path, tiny_checkpoint):
    """A crash between an attack and the next checkpoint: the record that no checkpoint saw is attacked again."""
    cfg = _cfg(tmp_path, tiny_checkpoint, "adv", *ADV)
    assert run_erase(cfg, _pairs(), progress=False, should_stop=_stop_at(3))["stopped"]
    path = tmp_path / "adv" / RECORD_FILE
    stale = {"after": 4, "attacks": {"church": {"prompts": ["a photo of a stale"], "loss": 0.0}},
             "pairs": [PromptPair("a photo of a stale", SURROGATES[0], "church", source=SOURCE).__dict__]}
    path.write_text(path.read_text() + json.dumps(stale) + "\n")
    run_erase(cfg, _pairs(), progress=False)
    assert "a photo of a stale" not in path.read_text()
    assert [r["after"] for r in read_records(tmp_path / "adv")] == [2, 4]


def test_erase_many_leaves_every_word_of_the_erased_concepts_out_of_the_search():
    from ear_dist.config.schema import WorldConfig
    from ear_dist.many.job import Target, searched_out_words
    from ear_dist.many.spec import ConceptEntry
    from ear_dist.world.concepts import concept_words
    from ear_dist.world.erasure import with_anchor_prompts
    from ear_dist.world.world import World

    erased = [ConceptEntry("church"), ConceptEntry("van gogh")]
    assert searched_out_words(erased, Target("m", "janus")) == ["church", "van gogh"]
    assert searched_out_words([ConceptEntry("nudity", words=["nude", "naked"])], Target("m", "janus")) == [
        "nudity", "nude", "naked"]
    world = World(WorldConfig(calibration_samples=200))
    words = searched_out_words(erased, Target("m", "janus", world))
    held_out = list(concept_words(world, "church", "heldout")) + list(concept_words(world, "van gogh", "heldout"))
    assert held_out and all(w in words for w in held_out)
    # the world's harness does the same for its runs, and only when adversarial erasure is on
    sets = with_anchor_prompts(world, ["church"], ["erase.adversarial.every=10"])
    assert any(s.startswith("erase.adversarial.exclude=") and "cathedral" in s for s in sets)
    assert not any("adversarial.exclude" in s for s in with_anchor_prompts(world, ["church"], ["train.steps=5"]))
