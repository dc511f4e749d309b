"""The white-box attacks as ``ear-dist eval`` suites: ``--suite attack:inversion:<concept>`` and
``--suite attack:search:<concept>`` on the planted-concept world.

Every column (the base model and each erased model) is attacked on its own, through the eval's per-column hook
(``ear_dist/eval/attacks/hook.py``): the attack fits the BASE model's CFG images of the concept's plain
training prompts ("a photo of a church"; ``eval.attack.targets`` of them, seeds from ``eval.attack.seed``) under
the column's model, then the column
samples the world suite's held-out concept prompts' seeds with the attack's prompts ("a photo of a <inv0> <inv1>"
with the learned words patched in, or the search's best prompts in turn), judged by the world's classifier. The
attack success rate is the share of those images that show the concept (the suite's concept accuracy, one group
per attack). Budgets: ``eval.attack.*``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict

import torch

from ear_dist.config import Config
from ear_dist.eval.attacks.hook import ColumnAttack, attack_suite
from ear_dist.eval.attacks.common import new_words, sample_targets
from ear_dist.eval.attacks.inversion import DEFAULT_TEMPLATES, InversionBudget, attack_prompts, invert_concept, \
    inversion_words
from ear_dist.eval.attacks.search import SearchBudget, search_prompts
from ear_dist.eval.suites import Attack, EvalPrompt, Suite, SuiteError

WHITEBOX_ATTACKS = ("inversion", "search")
BASE_COLUMN = "base"  # ear_dist.eval.evaluate.BASE: the column with no delta, always the first


def budgets(cfg: Config) -> tuple[InversionBudget, SearchBudget]:
    """The attacks' budgets from ``eval.attack.*`` (images=0: the eval samples the column's images itself)."""
    a, g = cfg.eval.attack, cfg.rollout.guidance_weight
    inversion = InversionBudget(steps=a.inversion_steps, tokens=a.inversion_tokens, batch=a.inversion_batch,
                                lr=a.inversion_lr, images=0, seed=a.seed, guidance_weight=g)
    search = SearchBudget(steps=a.search_steps, candidates=a.search_candidates, top_k=a.search_top_k,
                          length=a.search_length, batch=a.search_batch, prompts=a.search_prompts, images=0,
                          seed=a.seed, guidance_weight=g)
    return inversion, search


class _Targets:
    """The base model's images of the concept, sampled once: from the base column's model when it comes first,
    else from a fresh load of ``model.path`` (a rank or a rerun that prepares an erased column first)."""

    def __init__(self, cfg: Config, prompts: list[str]):
        self.cfg, self.prompts, self.tokens = cfg, prompts, None

    def get(self, column: str, bundle) -> torch.Tensor:
        if self.tokens is None:
            base = bundle if column == BASE_COLUMN else self._load_base(bundle)
            r = self.cfg.rollout
            self.tokens = sample_targets(base, self.prompts, self.cfg.eval.attack.seed, r.guidance_weight,
                                         r.temperature, r.top_k).cpu()
        return self.tokens

    def _load_base(self, bundle):
        from ear_dist.models.family import load_model

        m = self.cfg.model
        return load_model(m.path, m.family, device=bundle.device, dtype=next(bundle.model.parameters()).dtype,
                          seed=m.seed)


def target_prompts(concept: str, n: int) -> list[str]:
    """``n`` prompts of the concept alone, cycling the world's training templates ("a photo of a church": no
    adjective, scene or style, so the targets' images differ by their seeds and the concept is most of what a
    prompt must explain; a style: each object in the style in turn)."""
    from ear_dist.world.grammar import OBJECTS, TRAIN_TEMPLATES, WorldRecord, realize

    out = []
    for i in range(n):
        template = f"train/{i % len(TRAIN_TEMPLATES)}"
        if concept in OBJECTS:
            record = WorldRecord("", template, concept, OBJECTS[concept][0])
        else:
            obj = list(OBJECTS)[(i // len(TRAIN_TEMPLATES)) % len(OBJECTS)]
            record = WorldRecord("", template, obj, OBJECTS[obj][0], style=concept)
        out.append(realize(record))
    return out


def whitebox_suite(cfg: Config, argument: str = "") -> Suite:
    """``attack:<inversion|search>[:<concept>]``: the white-box attack against the world suite's concept."""
    from ear_dist.world.concepts import concept_words
    from ear_dist.world.suite import world_suite
    from ear_dist.world.var_world import world_for

    kind, _, concept = argument.partition(":")
    concept = (concept or cfg.erase.concept).strip().lower()
    if kind not in WHITEBOX_ATTACKS:
        raise SuiteError(f"suite attack:{argument}: the white-box attacks are "
                         f"{', '.join(f'attack:{k}:<concept>' for k in WHITEBOX_ATTACKS)}")
    if cfg.model.family != "janus":
        raise SuiteError(f"suite attack:{argument}: the white-box attacks support model.family=janus only")
    world = world_for(cfg.world, cfg.model.family)
    target = world_suite(cfg, concept, world)
    inversion, search = budgets(cfg)
    targets = _Targets(cfg, target_prompts(concept, cfg.eval.attack.targets))
    words = [w for split in ("train", "validation", "heldout") for w in concept_words(world, concept, split)]
    exclude = () if cfg.eval.attack.search_concept_words else words
    template = cfg.eval.attack.search_template
    budget = {**asdict(inversion if kind == "inversion" else search), "targets": cfg.eval.attack.targets}
    if kind == "search":
        budget.update(template=template, exclude=list(exclude))

    def column_prompts(texts: list[str], suite_prompts: list[EvalPrompt]) -> list[EvalPrompt]:
        return [EvalPrompt(texts[i % len(texts)], p.seed, p.group, "concept", p.concept, "attack")
                for i, p in enumerate(suite_prompts)]

    def per_column(column: str, bundle) -> ColumnAttack:
        tokens = targets.get(column, bundle)
        if kind == "inversion":
            result = invert_concept(bundle, tokens, inversion)
            texts = attack_prompts(result.words, DEFAULT_TEMPLATES, len(DEFAULT_TEMPLATES))
            tensors = {w.strip("<>"): v for w, v in zip(result.words, result.vectors)}
            info = {"loss_first": result.losses[0], "loss_last": result.losses[-1], "prompts": texts}
            return ColumnAttack(column_prompts(texts, suite.prompts), tensors, info)
        result = search_prompts(bundle, tokens, search, template=template, exclude=exclude)
        info = {"prompts": result.prompts, "losses": result.losses, "history_first": result.history[0],
                "history_last": result.history[-1]}
        return ColumnAttack(column_prompts(result.prompts, suite.prompts), {}, info)

    def patch(bundle, tensors: dict) -> contextlib.AbstractContextManager:
        """The learned words fed to the model while the column's images are sampled."""
        names = inversion_words(len(tensors))
        table = torch.stack([tensors[w.strip("<>")] for w in names]).to(bundle.device)
        return new_words(bundle, names, lambda: table)

    suite = attack_suite(target, f"attack-{kind}-{concept.replace(' ', '-')}",
                         Attack(f"white-box {kind}", budget, cfg.eval.attack.seed), per_column,
                         patch if kind == "inversion" else None)
    return suite

