"""Evaluation sampling at large batch: prompts bucketed by length, batches sized by the KV-cache budget.

What a user would notice if this broke: other images when the batch size or the device's
memory changes (a seed must give the same image in any batch), an out-of-memory error where
the planner should have made batches smaller, or an eval report without its images/s.
"""

import gc
import json
import weakref

import pytest
import torch

from ear_dist.errors import InputError
from ear_dist.eval.batching import BUCKET_TOKENS, KvBudget, kv_bytes_per_prompt, plan_sampling, prompt_lengths
from ear_dist.models.janus.decode import _DECODERS, lean_rollout_ids, release_decoders
from ear_dist.models.family import as_image_model

PROMPTS = ["a church", "a red barn in a snowy field at night under a full moon with stars and a frozen pond beside it",
           "castle", "a stone church in a green field", "a boat on the river at dawn with mist over the water and "
           "two swans swimming past the reeds near the old wooden bridge", "a dog", "a tree in the wind"]


def _budget_for(bundle, prompts, n_prompts):
    """A budget holding ``n_prompts`` of the longest bucket's prompts."""
    longest = max(-(-n // BUCKET_TOKENS) * BUCKET_TOKENS for n in prompt_lengths(bundle, prompts))
    return KvBudget(n_prompts * kv_bytes_per_prompt(bundle, longest, guided=True), "test")


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded"])
def test_planned_batches_sample_the_tokens_of_one_prompt_at_a_time(tiny_bundle, greedy):
    bundle = as_image_model(tiny_bundle)
    seeds = [11 * i + 3 for i in range(len(PROMPTS))]
    budget = _budget_for(bundle, PROMPTS, 3)
    plan = plan_sampling(bundle, PROMPTS, batch_size=8, guided=True, budget=budget)
    assert sorted(i for b in plan.batches for i in b.indices) == list(range(len(PROMPTS)))
    assert [b.prompt_len for b in plan.batches] == [16, 16, 32], "5 short prompts (4 fit the budget), 2 long ones"
    assert [len(b.indices) for b in plan.batches] == [4, 1, 2]
    assert all(len(b.indices) * kv_bytes_per_prompt(bundle, b.prompt_len, True) <= budget.bytes for b in plan.batches)
    batched = torch.empty(len(PROMPTS), bundle.num_image_tokens, dtype=torch.long)
    for b in plan.batches:
        batched[b.indices] = bundle.sample([PROMPTS[i] for i in b.indices], greedy=greedy,
                                           seeds=[seeds[i] for i in b.indices])
    alone = torch.cat([bundle.sample([p], greedy=greedy, seeds=[s]) for p, s in zip(PROMPTS, seeds)])
    assert torch.equal(batched, alone)
    if not greedy:  # the seeds matter: other seeds, other images
        assert not torch.equal(bundle.sample(PROMPTS[:2], seeds=[1, 2]), alone[:2])


def test_the_planned_kv_bytes_are_what_the_decoder_allocates(tiny_bundle):
    """The planner's memory model against the static cache a sampling batch really holds."""
    bundle = as_image_model(tiny_bundle)
    ids, mask = bundle.encode_prompts(PROMPTS[:3])
    lean_rollout_ids(bundle, ids, mask, "uncaptured", 5.0, 1.0, 0, True, None, bundle.num_image_tokens)
    cache = _DECODERS[bundle.model].cache
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == 3 * kv_bytes_per_prompt(bundle, ids.shape[1], guided=True)
    alive = weakref.ref(cache)
    del cache
    assert release_decoders(bundle.model) and bundle.model not in _DECODERS
    gc.collect()
    assert alive() is None  # freed: nothing else holds the batch's KV cache


def test_a_budget_under_one_prompt_is_a_clear_error(tiny_bundle):
    bundle = as_image_model(tiny_bundle)
    with pytest.raises(InputError, match=r"eval\.kv_cache_gib: one prompt of 16 tokens needs .* GiB of KV cache; "
                                         r"the budget is 0\.00 GiB \(tiny\)"):
        plan_sampling(bundle, ["a church"], 8, True, KvBudget(1000, "tiny"))
    assert KvBudget.of(torch.device("cpu"), 0.5).bytes == 2**29  # on a CPU the configured cap is the budget


def test_eval_batch_size_changes_speed_not_images_and_the_report_says_images_per_s(tiny_checkpoint, tmp_path):
    from ear_dist.cli import main
    from ear_dist.eval.generate import read_png

    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"name": "mixed", "unrelated": PROMPTS}))
    tokens = {}
    for name, sets in {"one": ["eval.batch_size=1"], "planned": ["eval.batch_size=4", "eval.kv_cache_gib=0.0004"],
                       "sampled": ["eval.batch_size=8"]}.items():
        out = tmp_path / name
        args = ["eval", "--no-progress", "--set", f"model.path={tiny_checkpoint}", "--suite", str(suite),
                "--out", str(out), "--set", "rollout.greedy=false"]
        for s in sets:
            args += ["--set", s]
        assert main(args) == 0
        report = json.loads((out / "report.json").read_text())
        tokens[name] = {row["prompt"]: read_png(row["path"])[1].tolist()
                        for row in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
        sampling = report["run"]["sampling"]["base"]
        assert sampling["generated"] == len(PROMPTS) and sampling["images_per_s"] > 0
        assert sampling["peak_memory_gib"] > 0 and sampling["plans"][0]["batches"] >= 1
        assert "- Sampling, base: " in (out / "report.md").read_text()
        if name == "planned":  # 0.0004 GiB: 2 short prompts of the tiny model (1 long), under batch_size 4
            assert sampling["plans"][0]["largest_batch"] == 2
            assert sampling["plans"][0]["kv_budget_source"] == "eval.kv_cache_gib=0.0004 on cpu"
    assert tokens["one"] == tokens["planned"] == tokens["sampled"]
