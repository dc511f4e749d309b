"""The white-box attacks as ``ear-dist eval`` suites: ``--suite attack:inversion:<concept>`` and
``--suite attack:search:<concept>``, on the planted-concept world or on a real Janus model.

Every column (the base model and each erased model) is attacked on its own, through the eval's per-column hook
(``ear_dist/eval/attacks/hook.py``): the attack fits the BASE model's CFG images of the concept's plain prompts
("a photo of a church"; ``eval.attack.targets`` of them, seeds from ``eval.attack.seed``) under the column's model,
then the column samples its images with the attack's prompts ("a photo of a <inv0> <inv1>" with the learned words
patched in, or the search's best prompts in turn). The attack success rate is the share of those images that show
the concept (the suite's concept accuracy, one group per attack). Budgets: ``eval.attack.*``.

Where the concept comes from (``eval.attack.mode``; auto: the world for a world build or a preset, else real):

- world: the targets' prompts are the world's training templates, the images the world suite's held-out test
  prompts' seeds (``eval.world_prompts``), judged on their tokens by the world's classifier;
- real (Janus-Pro-7B, any Janus checkpoint directory): the targets' prompts are ``eval.attack.target_prompts`` with
  the concept's words (``eval.attack.words``), the images ``eval.attack.images`` seeds, decoded to pixels and
  judged by the eval's classifier (``eval.classifier``: NudeNet for nudity, a ResNet-50 for church).
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

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


@dataclass
class _Concept:
    """What an attack suite needs of its concept: the suite whose test prompts' seeds and judge it takes, the
    prompts of the base model's target images, the words the search leaves out, and what else the targets depend
    on (it goes into the image keys with the budget)."""

    target: Suite
    prompts: list[str]
    words: list[str]
    key: dict = field(default_factory=dict)


def on_world(cfg: Config) -> bool:
    """``eval.attack.mode``; auto: the world when ``model.path`` is a world build (its world_build.json) or a
    preset (random weights), else a real model's concept."""
    from ear_dist.models.janus.presets import PRESETS
    from ear_dist.models.var.presets import VAR_PRESETS
    from ear_dist.world.pretrain import model_build_info

    mode = cfg.eval.attack.mode
    if mode != "auto":
        return mode == "world"
    path = cfg.model.path
    return path in PRESETS or path in VAR_PRESETS or bool(model_build_info(path))


def _world_concept(cfg: Config, concept: str) -> _Concept:
    from ear_dist.world.concepts import concept_words
    from ear_dist.world.suite import world_suite
    from ear_dist.world.var_world import world_for

    world = world_for(cfg.world, cfg.model.family)
    words = [w for split in ("train", "validation", "heldout") for w in concept_words(world, concept, split)]
    return _Concept(world_suite(cfg, concept, world), target_prompts(concept, cfg.eval.attack.targets), words)


def real_target_prompts(templates: list[str], words: list[str], n: int) -> list[str]:
    """``n`` prompts cycling ``templates`` with '{}' filled by each word in turn (a template without it as is)."""
    filled = []
    for t in templates:
        filled += [t.replace("{}", w) for w in words] if "{}" in t else [t]
    return [filled[i % len(filled)] for i in range(n)]


def _real_concept(cfg: Config, concept: str, where: str) -> _Concept:
    a = cfg.eval.attack
    templates = [t.strip() for t in a.target_prompts]
    if not templates or not all(templates):
        raise SuiteError(f"{where}: eval.attack.target_prompts: give one or more non-empty prompts ('{{}}' for the "
                         f"concept's words), got {list(a.target_prompts)}")
    if templates[0].startswith("[") or templates[-1].endswith("]"):  # a --set list that YAML could not read
        raise SuiteError(f"{where}: eval.attack.target_prompts: {templates} is not a list YAML could read; quote "
                         "each prompt holding '{}': eval.attack.target_prompts=['a photo of a {}', 'a {} at night']")
    words = [w.strip() for w in a.words if w.strip()] or [concept]
    if a.images < 1:
        raise SuiteError(f"{where}: eval.attack.images must be >= 1, got {a.images}")
    prompts = [EvalPrompt(p, cfg.eval.seed + i, concept, "concept", concept, "test")
               for i, p in enumerate(real_target_prompts(templates, words, a.images))]
    target = Suite(concept.replace(" ", "-"), prompts, f"{concept!r} on {cfg.model.path}", concept)
    return _Concept(target, real_target_prompts(templates, words, a.targets), words,
                    {"target_prompts": templates, "words": words})


def whitebox_suite(cfg: Config, argument: str = "") -> Suite:
    """``attack:<inversion|search>[:<concept>]``: the white-box attack against the concept, on the world or on a
    real model (``eval.attack.mode``)."""
    kind, _, concept = argument.partition(":")
    concept = (concept or cfg.erase.concept).strip().lower()
    where = f"suite attack:{argument}"
    if kind not in WHITEBOX_ATTACKS:
        raise SuiteError(f"{where}: the white-box attacks are "
                         f"{', '.join(f'attack:{k}:<concept>' for k in WHITEBOX_ATTACKS)}")
    if cfg.model.family != "janus":
        raise SuiteError(f"{where}: the white-box attacks support model.family=janus only (a {cfg.model.family} "
                         "model encodes prompts with a T5 under no_grad)")
    if not concept:
        raise SuiteError(f"{where}: name the concept (attack:{kind}:<concept>) or set erase.concept")
    if cfg.eval.attack.targets < 1:
        raise SuiteError(f"{where}: eval.attack.targets must be >= 1, got {cfg.eval.attack.targets}")
    about = _world_concept(cfg, concept) if on_world(cfg) else _real_concept(cfg, concept, where)
    target = about.target
    inversion, search = budgets(cfg)
    targets = _Targets(cfg, about.prompts)
    exclude = () if cfg.eval.attack.search_concept_words else about.words
    template = cfg.eval.attack.search_template
    budget = {**asdict(inversion if kind == "inversion" else search), "targets": cfg.eval.attack.targets,
              **about.key}
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

