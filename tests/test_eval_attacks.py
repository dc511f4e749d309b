"""Attack suites in `ear-dist eval`: the per-column hook (prompts and a model patch prepared against each column,
keyed by the attack's budget, seed and the column, prepared once and resumed), the attack prompt files of the
literature as attack groups, the guidance sweep, and the attack-success table."""

import contextlib
import json

import numpy as np
import pytest
import torch

from ear_dist.config import load_config
from ear_dist.eval.generate import read_png
from ear_dist.eval.suites import Attack, EvalPrompt, Suite
from tests.test_eval import HEAD, eval_on_two_ranks_and_one, make_delta

CALLS: list = []  # (column, sum of the image head's weights as the hook saw them, prompts it made)
PROMPTS = ["a church at night", "a stone church in a field", "the old church by the sea"]


def _head(model) -> torch.Tensor:
    return dict(model.named_parameters())[HEAD]


def toy_per_column(seed: int):
    """A deterministic toy attack: a suffix drawn from the seeded RNG and the column's own weights, and a learned
    push of the image head (the tensors its patch applies)."""

    def per_column(column: str, bundle) -> "ColumnAttack":
        from ear_dist.eval.attacks import ColumnAttack

        head = _head(bundle.model)
        CALLS.append((column, float(head.detach().double().sum())))
        word = ["alpha", "beta", "gamma", "delta"][int(torch.randint(0, 4, ()))]
        tail = int(head.detach().abs().sum() * 1000) % 97  # depends on the column's weights
        prompts = [EvalPrompt(f"{p} {word}{tail}", 500 + i, "church", "concept", "church", "attack")
                   for i, p in enumerate(PROMPTS)]
        push = 2.0 * torch.randn(head.shape)
        return ColumnAttack(prompts, {"push": push}, {"loss": float(push.abs().mean())})

    return per_column


@contextlib.contextmanager
def push_head(bundle, tensors):
    """The toy attack's patch: the learned push added to the image head while sampling, then taken away."""
    head = _head(bundle.model)
    saved = head.detach().clone()
    with torch.no_grad():
        head.add_(tensors["push"].to(head.device, head.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            head.copy_(saved)


def toy_attack_suite(cfg, arg: str = "") -> Suite:
    """A suite plugin (`--suite tests.test_eval_attacks:toy_attack_suite:SEED`): the toy attack at that seed."""
    seed = int(arg or 0)
    return Suite("toy-attack", [EvalPrompt(p, 500 + i, "church", "concept", "church", "attack")
                                for i, p in enumerate(PROMPTS)], "toy", "church",
                 {"kind": "tests.test_eval:bright", "threshold": 0.5},
                 attack=Attack("toy", {"steps": 2}, seed), per_column=toy_per_column(seed), patch=push_head)


def _eval(checkpoint, suites, deltas, out, *sets):
    from ear_dist.eval.evaluate import run_eval

    cfg = load_config(overrides=[f"model.path={checkpoint}", "eval.batch_size=3", *sets])
    return run_eval(cfg, suites, deltas, out, progress=False, log=lambda *_: None)


def _rows(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_per_column_hook_runs_once_per_column_with_its_model_and_keys_name_budget_seed_column(
        tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from ear_dist.models.janus import load_janus

    delta = make_delta(tiny_checkpoint, tmp_path / "runs" / "church" / "delta.safetensors")
    base_head = _head(load_janus(str(tiny_checkpoint), device="cpu", dtype="float32").model).detach()
    delta_head = load_file(str(delta))[HEAD]
    cfg = load_config()
    out = tmp_path / "eval"
    CALLS.clear()
    report = _eval(tiny_checkpoint, [toy_attack_suite(cfg, "7")], [str(delta)], out)
    # once per column, each with the model as its column has it (the delta applied for "church")
    assert [c for c, _ in CALLS] == ["base", "church"]
    assert CALLS[0][1] == pytest.approx(float(base_head.double().sum()), rel=1e-6)
    assert CALLS[1][1] == pytest.approx(float(delta_head.double().sum()), rel=1e-6)
    rows = _rows(out)
    by_column = {c: [r for r in rows if r["column"] == c] for c in ("base", "church")}
    # each column sampled its own prompts (the suffix depends on the column's weights), with the hook's seeds
    assert [r["prompt"] for r in by_column["base"]] != [r["prompt"] for r in by_column["church"]]
    assert [r["seed"] for r in by_column["base"]] == [500, 501, 502]
    prepared = sorted((out / "attacks" / "toy-attack").glob("*.json"))
    assert [p.name.split("-")[0] for p in prepared] == ["base", "church"]
    doc = json.loads(prepared[0].read_text())
    assert doc["attack"] == {"name": "toy", "budget": {"steps": 2}, "seed": 7} and doc["tensors"] == ["push"]
    assert report["results"]["base"]["toy-attack"]["groups"]["church"] is not None

    # the patch was applied while sampling: the same prompt and seed without it gives other tokens
    from ear_dist.models.family import load_model

    bundle = load_model(str(tiny_checkpoint), "janus", device="cpu", dtype="float32")
    first = by_column["base"][0]
    plain = bundle.sample([first["prompt"]], 5.0, 1.0, 0, False, [first["seed"]])[0].numpy()
    assert not np.array_equal(plain, read_png(first["path"])[1])
    with push_head(bundle, load_file(str(prepared[0].with_suffix(".safetensors")))):
        patched = bundle.sample([first["prompt"]], 5.0, 1.0, 0, False, [first["seed"]])[0].numpy()
    assert np.array_equal(patched, read_png(first["path"])[1])

    # a rerun into the same directory: no attack runs again, every image is reused, same keys
    CALLS.clear()
    again = _eval(tiny_checkpoint, [toy_attack_suite(cfg, "7")], [str(delta)], out)
    assert CALLS == [] and again["generation"]["base"] == {"generated": 0, "reused": 3}
    assert [r["key"] for r in _rows(out)] == [r["key"] for r in rows]

    # another seed: the attack runs again, and every key changes (the prompts' seeds are the same)
    CALLS.clear()
    other = tmp_path / "eval-seed"
    _eval(tiny_checkpoint, [toy_attack_suite(cfg, "8")], [str(delta)], other)
    assert [c for c, _ in CALLS] == ["base", "church"]
    assert not {r["key"] for r in _rows(other)} & {r["key"] for r in rows}


def test_keys_name_the_attack_budget_seed_and_column(tiny_checkpoint, tmp_path):
    """The same prompt and seed under another budget, attack seed or column name is another image key."""
    from ear_dist.eval.generate import Column, plan

    cfg = load_config(overrides=[f"model.path={tiny_checkpoint}"])
    prompts = [EvalPrompt("a church at night", 3, "church", "concept", "church", "attack")]

    def keys(attack, column="base"):
        suite = Suite("s", prompts, attack=attack)
        return [e.key for e in plan([suite], [Column(column)], cfg, "fp", tmp_path)]

    plain = keys(None)
    assert plain == [e.key for e in plan([Suite("s", prompts)], [Column("base")], cfg, "fp", tmp_path)]
    variants = [keys(Attack("a", 10, 0)), keys(Attack("a", 20, 0)), keys(Attack("a", 10, 1)),
                keys(Attack("a", 10, 0), "other"), keys(Attack("b", 10, 0))]
    assert len({k[0] for k in variants + [plain]}) == 6


def test_preparation_is_deterministic_per_seed_and_refuses_a_model_it_changed(tiny_bundle):
    from ear_dist.errors import RunFailure
    from ear_dist.eval.attacks import run_per_column, tensors_digest
    from ear_dist.eval.generate import Column
    from ear_dist.models.family import as_image_model

    bundle = as_image_model(tiny_bundle)
    suite = lambda seed: toy_attack_suite(None, str(seed))  # noqa: E731
    a, b, c = (run_per_column(bundle, suite(s), Column("base")) for s in (3, 3, 4))
    assert tensors_digest(a.tensors) == tensors_digest(b.tensors) != tensors_digest(c.tensors)
    assert [p.prompt for p in a.prompts] == [p.prompt for p in b.prompts]

    def vandal(column, bundle):
        with torch.no_grad():
            _head(bundle.model).mul_(2)
        return toy_per_column(0)(column, bundle)

    bad = Suite("bad", toy_attack_suite(None).prompts, attack=Attack("vandal"), per_column=vandal, patch=push_head)
    with pytest.raises(RunFailure, match="changed the model's weights"):
        run_per_column(bundle, bad, Column("base"))


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_prepare_the_attack_once_per_column_and_make_the_images_of_one(tiny_checkpoint, tmp_path):
    """Two ranks split the (suite, column) preparations, read each other's from the output directory, and give the
    very images of one rank."""
    delta = make_delta(tiny_checkpoint, tmp_path / "runs" / "church" / "delta.safetensors")
    common = ["--no-progress", "--set", f"model.path={tiny_checkpoint}", "--set", "eval.batch_size=2",
              "--suite", "tests.test_eval_attacks:toy_attack_suite:5", "--delta", str(delta)]
    eval_on_two_ranks_and_one(common, tmp_path / "two", tmp_path / "one")

    def images(out):
        return {(r["column"], r["prompt"], r["seed"], r["key"]): read_png(r["path"])[1].tolist() for r in _rows(out)}

    assert images(tmp_path / "two") == images(tmp_path / "one") and len(images(tmp_path / "one")) == 6
    for name in ("base", "church"):
        two = next((tmp_path / "two" / "attacks" / "toy-attack").glob(f"{name}-*.safetensors")).read_bytes()
        one = next((tmp_path / "one" / "attacks" / "toy-attack").glob(f"{name}-*.safetensors")).read_bytes()
        assert two == one


def test_attack_suite_takes_the_target_suites_test_prompts_and_judge(tmp_path):
    from ear_dist.eval.attacks import attack_suite
    from ear_dist.eval.suites import load_suite
    from tests.test_eval import write_suite

    target = load_suite(str(write_suite(tmp_path)), load_config())
    suite = attack_suite(target, "gcg-church", Attack("gcg", {"steps": 100}, 0), toy_per_column(0), push_head)
    assert [p.prompt for p in suite.prompts] == PROMPTS and {p.kind for p in suite.prompts} == {"attack"}
    assert suite.classifier == target.classifier and suite.concept == "church" and suite.attack.budget == {"steps": 100}
    assert target.per_column is None and len(target.prompts) == 10  # the target is left as it was
