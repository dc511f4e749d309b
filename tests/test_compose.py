"""Composing per-concept deltas: summed as merge always did, projected off each other's inputs, or TIES-merged."""

import math

import pytest
import torch
from safetensors.torch import load_file

from ear_dist.cli import main
from ear_dist.models.compose import (ComposeSpec, apply_composition, compose_deltas, composed_in_memory,
                                     ties_merge)
from ear_dist.models.delta import apply_deltas, applied_deltas, save_delta
from ear_dist.models.fingerprint import model_fingerprint
from ear_dist.models.janus import load_janus
from ear_dist.train.adapters import input_second_moments, principal_basis
from ear_dist.train.preserve import anchor_rollouts, student_logits, teacher_forced_feed

CONCEPTS = {
    "church": ["a photo of a church", "a church at night"],
    "barn": ["a red barn in snow", "a barn near a lake"],
    "windmill": ["a windmill at dawn", "a photo of a windmill"],
}
KEPT = ["a house near a lake", "a castle at night"]
GUIDANCE = 5.0
LAYER0 = [f"model.language_model.layers.0.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj")]
DEEP = [f"model.language_model.layers.{i}.{m}.weight" for i in (0, 1)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")]


@pytest.fixture()
def model(tiny_bundle):
    return tiny_bundle


def _save(path, model, changes, concept):
    params = dict(model.model.named_parameters())
    tensors = {n: (params[n].detach() + c).contiguous() for n, c in changes.items()}
    return str(save_delta(path, tensors, model_fingerprint(model.model), "tiny", [concept], {}))


def _sets():
    """The prompt sets in compose's order (one per concept, then the kept prompts), with compose's seeds."""
    return [*CONCEPTS.values(), KEPT]


def _tokens(model, seed=0):
    return [anchor_rollouts(model, prompts, GUIDANCE, seed + k) for k, prompts in enumerate(_sets())]


def _bases(model, names, tokens, energy):
    """Per prompt set: layer -> orthonormal basis of its inputs (the same statistics compose reads)."""
    out = []
    for prompts, tok in zip(_sets(), tokens):
        moments = input_second_moments(model.model, names, teacher_forced_feed(model, prompts, tok))
        out.append({n: principal_basis(moments[n], energy)[0] for n in names})
    return out


def _span(bases):
    stacked = sum(u @ u.T for u in bases)
    values, vectors = torch.linalg.eigh(stacked)
    return vectors[:, values > 1e-6]


def _within(a, b):
    """Basis of span(a) with span(b) removed (the part of a orthogonal to b)."""
    rest = a - b @ (b.T @ a)
    u, s, _ = torch.linalg.svd(rest, full_matrices=False)
    return u[:, s > 1e-3]


def _inside_orthogonal(a, b):
    """Basis of the vectors of span(a) that are orthogonal to span(b)."""
    _, s, vh = torch.linalg.svd(b.T @ a, full_matrices=True)
    return a @ vh[int((s > 1e-8).sum()):].T


@torch.no_grad()
def _logits(model, prompts, tokens):
    cond, uncond = student_logits(model.model, model, prompts, tokens)
    return torch.cat([cond, uncond]).float()


def _separable_deltas(model, tmp_path, tokens, energy):
    """Layer-0 attention deltas whose change on a concept's own distinctive inputs is what it erases with, plus
    a change on the OTHER concepts' and the kept prompts' distinctive inputs (interference, zero on its own).

    Layer 0 reads token embeddings, so each prompt set's inputs span exactly its tokens' directions and a concept's
    words are separable from the others'."""
    bases = _bases(model, LAYER0, tokens, energy)
    g = torch.Generator().manual_seed(0)
    params = dict(model.model.named_parameters())
    paths = []
    for i, concept in enumerate(CONCEPTS):
        changes = {}
        for n in LAYER0:
            own = bases[i][n].double()
            others = _span([b[n].double() for k, b in enumerate(bases) if k != i])
            mine, theirs = _within(own, others), _inside_orthogonal(others, own)
            w = params[n].detach().double()
            scale = 0.5 * float(w.std())
            erase = scale * torch.randn(w.shape[0], mine.shape[1], generator=g, dtype=torch.float64) @ mine.T
            interfere = scale * torch.randn(w.shape[0], theirs.shape[1], generator=g, dtype=torch.float64) @ theirs.T
            changes[n] = (erase + interfere).float()
        paths.append(_save(tmp_path / f"{concept}.safetensors", model, changes, concept))
    return paths


@pytest.mark.parametrize("subspace, tolerance", [("union", 1e-2), ("pooled", 0.5)])
def test_project_leaves_each_other_concept_and_the_kept_prompts_as_their_own_delta_leaves_them(model, tmp_path,
                                                                                              subspace, tolerance):
    """union: each other prompt set's inputs are projected off whole (to the energy share); pooled: the pooled
    subspace misses the weakest directions of each set, so some interference is left (a looser bound)."""
    energy = 0.999999
    tokens = _tokens(model)
    deltas = _separable_deltas(model, tmp_path, tokens, energy)
    base = {k: _logits(model, prompts, tok) for k, (prompts, tok) in enumerate(zip(_sets(), tokens))}
    alone = {}
    for j, d in enumerate(deltas):
        with applied_deltas(model.model, [d]):
            alone[j] = _logits(model, _sets()[j], tokens[j])
            assert (alone[j] - base[j]).abs().max() > 1e-4  # each delta changes its own concept's outputs
    with applied_deltas(model.model, deltas):
        summed = {k: _logits(model, prompts, tok) for k, (prompts, tok) in enumerate(zip(_sets(), tokens))}
    composition = compose_deltas(model, deltas, list(CONCEPTS.values()), KEPT, "project", energy,
                                 guidance_weight=GUIDANCE, subspace=subspace)
    with composed_in_memory(model, deltas, ComposeSpec("project", tuple(map(tuple, CONCEPTS.values())), tuple(KEPT),
                                                       energy, GUIDANCE, subspace=subspace)):
        projected = {k: _logits(model, prompts, tok) for k, (prompts, tok) in enumerate(zip(_sets(), tokens))}
    for j in range(len(deltas)):
        sum_error = (summed[j] - alone[j]).abs().max()
        project_error = (projected[j] - alone[j]).abs().max()
        assert sum_error > 1e-4, "the sum must interfere here, or the test proves nothing"
        assert project_error < tolerance * sum_error, (j, float(project_error), float(sum_error))
    kept = len(deltas)
    assert (summed[kept] - base[kept]).abs().max() > 1e-4
    assert (projected[kept] - base[kept]).abs().max() < tolerance * (summed[kept] - base[kept]).abs().max()
    assert set(composition.ranks) == set(deltas) and all(set(r) == set(LAYER0) for r in composition.ranks.values())


def test_project_off_the_kept_prompts_only_keeps_them_and_leaves_the_concepts_to_the_sum(model, tmp_path):
    energy = 0.999999
    tokens = _tokens(model)
    deltas = _separable_deltas(model, tmp_path, tokens, energy)
    kept, tok = KEPT, tokens[-1]
    base = _logits(model, kept, tok)
    with applied_deltas(model.model, deltas):
        summed = {j: _logits(model, CONCEPTS[c], tokens[j]) for j, c in enumerate(CONCEPTS)}
        summed_kept = _logits(model, kept, tok)
    spec = ComposeSpec("project", (), tuple(KEPT), energy, GUIDANCE, other_concepts=False)
    with composed_in_memory(model, deltas, spec) as report:
        projected = {j: _logits(model, CONCEPTS[c], tokens[j]) for j, c in enumerate(CONCEPTS)}
        projected_kept = _logits(model, kept, tok)
    assert (summed_kept - base).abs().max() > 1e-4
    assert (projected_kept - base).abs().max() < 1e-2 * (summed_kept - base).abs().max()
    # the deltas' changes on each other's concepts stay (each concept's inputs are only partly the kept prompts')
    assert all((projected[j] - summed[j]).abs().max() < (summed[j] - _logits(model, CONCEPTS[c], tokens[j])).abs().max()
               for j, c in enumerate(CONCEPTS))
    assert all(0 < v <= 1 for v in report["kept_norm"].values())


def test_each_projected_change_is_zero_on_every_other_prompt_set_at_every_layer(model, tmp_path):
    """Random deltas over two layers' attention and MLP: at every layer, delta_i projected applied to concept j's
    (and the kept prompts') inputs is ~0 relative to delta_i itself; the sum leaves it whole."""
    energy = 0.999
    g = torch.Generator().manual_seed(1)
    params = dict(model.model.named_parameters())
    deltas = [_save(tmp_path / f"{c}.safetensors", model,
                    {n: 0.02 * float(params[n].detach().std()) * torch.randn(params[n].shape, generator=g) for n in DEEP}, c)
              for c in CONCEPTS]
    composition = compose_deltas(model, deltas, list(CONCEPTS.values()), KEPT, "project", energy,
                                 guidance_weight=GUIDANCE)
    tokens = _tokens(model)
    inputs = []
    for prompts, tok in zip(_sets(), tokens):
        rows: dict = {}

        def hook(mod, args, name):
            rows.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

        handles = [model.model.get_submodule(n[: -len(".weight")]).register_forward_pre_hook(
            lambda mod, args, name=n: hook(mod, args, name)) for n in DEEP]
        with torch.no_grad():
            teacher_forced_feed(model, prompts, tok)()
        for h in handles:
            h.remove()
        inputs.append({n: torch.cat(v) for n, v in rows.items()})
    # what remains of delta i: the composed change minus every other delta's projected share, rebuilt per delta
    for i, d in enumerate(deltas):
        single = compose_deltas(model, [d], [CONCEPTS[list(CONCEPTS)[i]]], (), "project", energy)
        assert single.kept_norm[d] == 1.0  # nothing else to keep: a lone delta is not projected
        for n in DEEP:
            original = load_file(d)[n].double() - params[n].detach().double()
            shares = _projected_shares(model, deltas, n, energy)
            for j, x in enumerate(inputs):
                if j == i:
                    continue
                before = (x[n] @ original.T).norm()
                after = (x[n] @ shares[i].T).norm()
                assert after < 0.05 * before, (i, j, n, float(after / before))
    assert torch.isfinite(torch.stack([c.abs().max() for c in composition.changes.values()])).all()
    assert all(0 < v < 1 for v in composition.kept_norm.values())


def test_the_pooled_subspace_leaves_more_of_each_delta_than_the_union(model, tmp_path):
    g = torch.Generator().manual_seed(7)
    params = dict(model.model.named_parameters())
    deltas = [_save(tmp_path / f"{c}.safetensors", model,
                    {n: 0.02 * float(params[n].detach().std()) * torch.randn(params[n].shape, generator=g)
                     for n in DEEP}, c) for c in CONCEPTS]
    union, pooled = (compose_deltas(model, deltas, list(CONCEPTS.values()), KEPT, "project", 0.999,
                                    guidance_weight=GUIDANCE, subspace=s) for s in ("union", "pooled"))
    for d in deltas:
        assert 0 < union.kept_norm[d] < pooled.kept_norm[d] < 1
        assert all(pooled.ranks[d][n] < union.ranks[d][n] for n in DEEP)


_SHARES: dict = {}


def _projected_shares(model, deltas, name, energy):
    """Each delta's projected change to ``name``: compose with the others' weights set to 0 isolates delta i."""
    key = (tuple(deltas), energy)
    if key not in _SHARES:
        _SHARES.clear()
        per = []
        for i in range(len(deltas)):
            weights = [1.0 if k == i else 0.0 for k in range(len(deltas))]
            per.append(compose_deltas(model, deltas, list(CONCEPTS.values()), KEPT, "project", energy,
                                      weights=weights, guidance_weight=GUIDANCE).changes)
        _SHARES[key] = per
    return [p[name] for p in _SHARES[key]]


def _ties_reference(changes, density):
    """TIES per entry with plain Python: trim, elect, average the agreeing."""
    flat = [c.flatten().tolist() for c in changes]
    n = len(flat[0])
    k = max(1, math.ceil(density * n))
    trimmed = []
    for values in flat:
        threshold = sorted((abs(v) for v in values), reverse=True)[k - 1]
        trimmed.append([v if abs(v) >= threshold else 0.0 for v in values])
    out = []
    for e in range(n):
        total = sum(t[e] for t in trimmed)
        sign = (total > 0) - (total < 0)
        agree = [t[e] for t in trimmed if t[e] != 0 and ((t[e] > 0) - (t[e] < 0)) == sign]
        out.append(sum(agree) / len(agree) if agree and sign != 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64).reshape(changes[0].shape)


def test_ties_matches_a_plain_per_entry_reference():
    g = torch.Generator().manual_seed(2)
    changes = [torch.randn(7, 9, generator=g) for _ in range(3)]
    changes[1][0, :4] = changes[0][0, :4]  # ties at the trim threshold and agreeing entries
    for density in (0.2, 0.5, 1.0):
        torch.testing.assert_close(ties_merge(changes, density).double(), _ties_reference(changes, density),
                                   rtol=1e-6, atol=1e-7)


def test_ties_composition_matches_the_reference_and_every_method_sums_norms(model, tmp_path):
    g = torch.Generator().manual_seed(3)
    params = dict(model.model.named_parameters())
    norm = "model.language_model.layers.0.input_layernorm.weight"
    names = LAYER0[:2]
    raw = [{n: 0.01 * torch.randn(params[n].shape, generator=g) for n in [*names, norm]} for _ in range(2)]
    deltas = [_save(tmp_path / f"{c}.safetensors", model, r, c) for c, r in zip(CONCEPTS, raw)]
    composition = compose_deltas(model, deltas, method="ties", density=0.3)
    for n in names:
        exact = [load_file(d)[n].double() - params[n].detach().double() for d in deltas]
        torch.testing.assert_close(composition.changes[n], _ties_reference([e.float() for e in exact], 0.3),
                                   rtol=1e-5, atol=1e-7)
    projected = compose_deltas(model, deltas, list(CONCEPTS.values())[:2], KEPT, "project")
    exact = sum(load_file(d)[norm].double() - params[norm].detach().double() for d in deltas)
    for c in (composition, projected):  # a norm weight is no linear weight: summed, and named
        assert c.summed == [norm]
        assert torch.equal(c.changes[norm], exact)


def test_compose_sum_equals_apply_deltas_bitwise(model, tmp_path, tiny_checkpoint):
    g = torch.Generator().manual_seed(4)
    params = dict(model.model.named_parameters())
    deltas = [_save(tmp_path / f"{c}.safetensors", model,
                    {n: 0.01 * torch.randn(params[n].shape, generator=g) for n in DEEP[i:]}, c)
              for i, c in enumerate(CONCEPTS)]
    other = load_janus(str(tiny_checkpoint), device="cpu", dtype="float32")
    apply_deltas(other.model, deltas, [1.0, 0.5, 2.0])
    report = apply_composition(model.model, compose_deltas(model, deltas, method="sum", weights=[1.0, 0.5, 2.0]))
    assert report["method"] == "sum" and set(report["overlaps"]) == set(DEEP[1:])
    for (n, a), (_, b) in zip(model.model.named_parameters(), other.model.named_parameters()):
        assert torch.equal(a, b), n


def _write_prompts(tmp_path, name, prompts):
    path = tmp_path / f"{name}.txt"
    path.write_text("\n".join(prompts) + "\n")
    return str(path)


def test_merge_compose_project_via_the_cli_equals_the_library_bitwise(model, tmp_path, tiny_checkpoint):
    g = torch.Generator().manual_seed(5)
    params = dict(model.model.named_parameters())
    deltas = [_save(tmp_path / f"{c}.safetensors", model,
                    {n: 0.02 * float(params[n].detach().std()) * torch.randn(params[n].shape, generator=g) for n in LAYER0},
                    c) for c in CONCEPTS]
    argv = ["merge", "--base", str(tiny_checkpoint), "--compose", "project", "--out", str(tmp_path / "merged"),
            "--keep-prompts", _write_prompts(tmp_path, "kept", KEPT)]
    for c, prompts in CONCEPTS.items():
        argv += ["--delta", deltas[list(CONCEPTS).index(c)],
                 "--concept-prompts", f"{c}={_write_prompts(tmp_path, c, prompts)}"]
    assert main(argv) == 0
    merged = load_file(next((tmp_path / "merged").glob("*.safetensors")))
    composition = compose_deltas(model, deltas, list(CONCEPTS.values()), KEPT, "project", 0.999,
                                 guidance_weight=GUIDANCE)
    apply_composition(model.model, composition)
    changed = 0
    for n, p in model.model.named_parameters():
        assert torch.equal(merged[n], p.detach()), n
        changed += n in composition.changes
    assert changed == len(LAYER0)
    # the in-memory composed column of an evaluation gives the same weights
    fresh = load_janus(str(tiny_checkpoint), device="cpu", dtype="float32")
    spec = ComposeSpec("project", tuple(map(tuple, CONCEPTS.values())), tuple(KEPT), 0.999, GUIDANCE)
    with composed_in_memory(fresh, deltas, spec):
        for n in LAYER0:
            assert torch.equal(merged[n], dict(fresh.model.named_parameters())[n].detach()), n
    assert torch.equal(dict(fresh.model.named_parameters())[LAYER0[0]], load_file(
        next(tiny_checkpoint.glob("*.safetensors")))[LAYER0[0]])  # restored after the block


def test_merge_compose_sum_equals_todays_merge_bitwise(model, tmp_path, tiny_checkpoint):
    g = torch.Generator().manual_seed(6)
    params = dict(model.model.named_parameters())
    deltas = [_save(tmp_path / f"{c}.safetensors", model,
                    {n: 0.01 * torch.randn(params[n].shape, generator=g) for n in LAYER0}, c) for c in CONCEPTS]
    common = ["merge", "--base", str(tiny_checkpoint), *[a for d in deltas for a in ("--delta", d)]]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--compose", "sum", "--out", str(tmp_path / "summed")]) == 0
    a = load_file(next((tmp_path / "plain").glob("*.safetensors")))
    b = load_file(next((tmp_path / "summed").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[LAYER0[0]], params[LAYER0[0]].detach())


@pytest.mark.parametrize("extra, message", [
    ([], r"ear-dist: error: .*church\.safetensors: its run's config names no data\.pairs file .*--concept-prompts"),
    (["--concept-prompts", "church=missing.txt"], r"ear-dist: error: --concept-prompts church: .*missing\.txt: file not found"),
    (["--concept-prompts", "castle=x.txt"], r"ear-dist: error: --concept-prompts castle: no delta erases this concept"),
    (["--concept-prompts", "church"], r"ear-dist: error: --concept-prompts 'church': expected CONCEPT=FILE"),
    (["--project-kept-only"], r"ear-dist: error: --project-kept-only: give the prompts to keep with --keep-prompts"),
])
def test_merge_compose_project_without_prompts_is_a_one_line_error(model, tmp_path, tiny_checkpoint, capsys,
                                                                    monkeypatch, extra, message):
    import re

    monkeypatch.chdir(tmp_path)
    params = dict(model.model.named_parameters())
    d = _save(tmp_path / "church.safetensors", model, {LAYER0[0]: 0.01 * torch.ones_like(params[LAYER0[0]])},
              "church")
    capsys.readouterr()
    rc = main(["merge", "--base", str(tiny_checkpoint), "--delta", d, "--compose", "project", "--out",
               str(tmp_path / "m"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert re.match(message, err[-1]), err[-1]
    assert "Traceback" not in "\n".join(err) and not (tmp_path / "m").exists()


def test_project_reads_the_prompts_of_the_run_that_made_the_delta(model, tmp_path):
    from ear_dist.models.compose import concept_prompts_for

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"target": "a photo of a church", "surrogate": "a photo of a barn", "concept": "church"}\n'
                     '{"target": "a barn at night", "surrogate": "a house at night", "concept": "barn"}\n')
    params = dict(model.model.named_parameters())
    tensors = {LAYER0[0]: params[LAYER0[0]].detach() + 0.01}
    d = save_delta(tmp_path / "run" / "delta.safetensors", tensors, model_fingerprint(model.model), "tiny",
                   ["church"], {"data": {"pairs": str(pairs), "format": "auto"}})
    assert concept_prompts_for([str(d)]) == [["a photo of a church"]]
