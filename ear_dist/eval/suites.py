"""Evaluation suites: which prompts are sampled, with which seeds, and what each image should show.

A suite is a list of prompts, each with a seed, a group (a row of the report), a role
and the concept its classifier looks for:

- ``concept``: the image should show the concept before erasure and not after
  (the concept's test prompts, its synonyms, paraphrases and attack prompts, Six-CD for
  nudity); each concept group has a ``kind`` (``test``, ``synonym``, ``paraphrase``,
  ``attack``): Table 1's Acc. is taken over the ``test`` groups alone, the others have their
  own columns (``ear_dist/eval/figures.py``);
- ``preservation``: prompts of OTHER concepts, each judged on its own concept
  (castle prompts should still show castles);
- ``unrelated``: prompts whose image-token histogram should not move (TV / KL);
- ``caption``: captions for FID and CLIP score (COCO-30k); their token histogram too.

Where suites come from (``--suite`` / ``eval.suites``):

- a suite file (YAML/JSON mapping; paths inside are relative to it)::

      name: church
      concept: church
      prompts: test_church.json          # any prompt file the readers know, or a list of strings
      synonyms: [chapel, cathedral]      # one more group per word: the concept word replaced
      paraphrases: {naked: naked.txt}    # more concept groups, each its own prompts
      attacks: {ring-a-bell: rab.csv}    # adversarial prompts for the concept, each its own group
      preservation: {castle: castle.txt, barn: ["a red barn in a field"]}
      unrelated: ["a bowl of fruit on a table"]
      limit: 0                           # the first N prompts of each list; 0 = all
      classifier: {kind: resnet50, path: /models/resnet-50, class_ids: {church: [497], castle: [483]}, top_k: 5}

- a prompt file alone (``test_church.json``, ``test_van_gogh.csv``, ``Six-CD_Nudity.csv``):
  one ``concept`` group; the concept comes from the file's concept column or
  ``erase.concept``; a COCO CSV becomes a ``caption`` suite;
- ``coco``: the first ``eval.coco_size`` captions of ``eval.coco_prompts``;
- ``attack:inversion:<concept>``, ``attack:search:<concept>``: the white-box attacks against the concept (the
  world's, or a real Janus model's judged by ``eval.classifier``), each column attacked on its own
  (``ear_dist.eval.attacks.whitebox``);
- ``module:function`` (``world`` and ``world:<concept>`` are built-in names of
  ``ear_dist.world.suite:world_suite``): ``function(cfg, argument) -> Suite``.

A prompt keeps the file's ``evaluation_seed`` when it has one, else ``eval.seed`` + its
position; a synonym's prompt keeps the seed of the sentence it was made from, so the
two images differ by the word alone.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from ear_dist.config import Config, read_file
from ear_dist.data.readers import PairReadError, attack_layout, read_attack_prompts, read_pairs
from ear_dist.errors import InputError

ROLES = ("concept", "preservation", "unrelated", "caption")
CONCEPT_KINDS = ("test", "synonym", "paraphrase", "attack")  # kinds of concept groups, Table 1's order
BUILTIN_PLUGINS = {"world": "ear_dist.world.suite:world_suite", "guidance": "ear_dist.eval.attacks:guidance_suite",
                   "attack": "ear_dist.eval.attacks.whitebox:whitebox_suite"}
SUITE_KEYS = {"name", "concept", "prompts", "synonyms", "paraphrases", "attacks", "preservation", "unrelated", "captions",
              "limit", "classifier", "format"}


class SuiteError(InputError, ValueError):
    """A suite that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of a suite: its text, seed, group (report row), role and the concept it is judged on."""

    prompt: str
    seed: int
    group: str
    role: str = "concept"
    concept: str = ""
    kind: str = ""  # a concept group's kind (CONCEPT_KINDS); empty: "test"
    guidance: Optional[float] = None  # its own CFG weight (an attack file's, the guidance sweep's); None: rollout's
    negative: str = ""  # the CFG unconditional branch's prompt (negative prompt); empty: the pad prompt


@dataclass(frozen=True)
class Attack:
    """What an attack suite's images depend on beyond prompt and seed (part of every image key with the column):
    the attack's name, its budget (steps, candidates...: any JSON value) and the seed its preparation runs under."""

    name: str
    budget: Any = None
    seed: int = 0


@dataclass
class Suite:
    """Prompts plus how their images are judged.

    ``classifier`` holds ``eval.classifier`` keys that this suite overrides. A suite
    judged on image tokens rather than pixels (the planted-concept world) sets
    ``classify_tokens(tokens, concepts) -> bools`` and ``render(tokens) -> uint8 images``
    (the pictures of the report), and describes its classifier in ``classifier_info``.
    """

    name: str
    prompts: list[EvalPrompt]
    source: str = ""
    concept: str = ""
    classifier: dict = field(default_factory=dict)
    classify_tokens: Optional[Callable[[np.ndarray, Sequence[str]], Sequence[bool]]] = None
    render: Optional[Callable[[np.ndarray], np.ndarray]] = None
    render_id: str = "vq"
    classifier_info: dict = field(default_factory=dict)
    # a suite judged on image tokens: the (image tokens, codebook size) of the models it can judge
    token_shape: Optional[tuple[int, int]] = None
    # an attack suite (ear_dist/eval/attacks/hook.py, docs/attacks.md): ``attack`` goes into every image key with the
    # column; ``per_column(column_name, model) -> ColumnAttack`` gives each column its own prompts (and tensors),
    # ``patch(model, tensors)`` is a context manager applied while that column's prompts of the suite are sampled
    attack: Optional[Attack] = None
    per_column: Optional[Callable[[str, Any], Any]] = None
    patch: Optional[Callable[[Any, dict], Any]] = None

    def check_model(self, num_image_tokens: int, codebook_size: int, model: str) -> None:
        """Refuse a model whose images this suite cannot judge (a token-grid suite on another model)."""
        if self.token_shape is not None and tuple(self.token_shape) != (num_image_tokens, codebook_size):
            tokens, codes = self.token_shape
            raise SuiteError(f"suite {self.name} ({self.source}): judges images of {tokens} tokens from {codes} codes, "
                             f"but model {model} makes {num_image_tokens} tokens from {codebook_size} codes; evaluate "
                             "the world model that `ear-dist world build` prints (same world.* settings)")

    def groups(self) -> dict[str, dict]:
        """Group name -> its role, concept, kind (concept groups) and prompt count, in first-seen order."""
        out: dict[str, dict] = {}
        for p in self.prompts:
            g = out.setdefault(p.group, {"role": p.role, "concept": p.concept, "prompts": 0})
            if p.role == "concept":
                g["kind"] = p.kind or "test"
            g["prompts"] += 1
        return out

    def roles(self) -> set[str]:
        return {p.role for p in self.prompts}


# --------------------------------------------------------------------------- reading prompt lists


def _prompt_list(value: Any, base_dir: Path, where: str, concept: str = "", fmt: str = "auto") -> list[tuple[str, int]]:
    """(prompt, seed or -1) from a list of strings or a prompt file the readers know."""
    if isinstance(value, str):
        path = (base_dir / value) if not Path(value).is_absolute() else Path(value)
        if path.suffix.lower() == ".txt":
            if not path.is_file():
                raise SuiteError(f"{where}: file not found: {path}")
            return [(ln.strip(), -1) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            return [(p.target, p.seed) for p in read_pairs(path, format=fmt, concept=concept)]
        except PairReadError as e:
            raise SuiteError(f"{where}: {e}") from None
    if isinstance(value, list):
        bad = [i for i, v in enumerate(value) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise SuiteError(f"{where}: item {bad[0]} is not a non-empty string")
        return [(v.strip(), -1) for v in value]
    raise SuiteError(f"{where}: expected a prompt file or a list of prompts, got {type(value).__name__}")


ATTACK_FILE_KEYS = {"file", "column", "categories", "min_nudity_percentage"}


def _attack_list(value: Any, base_dir: Path, where: str) -> list[tuple[str, int, Optional[float]]]:
    """(prompt, seed or -1, guidance or None) of an attack group: a list of prompts, a .txt file (one a line), an
    attack prompt file as its public release lays it out (Ring-A-Bell, MMA-Diffusion, UnlearnDiff, I2P: see
    ``read_attack_prompts``), or a mapping ``{file, column, categories, min_nudity_percentage}`` of one."""
    options: dict = {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - ATTACK_FILE_KEYS)
        if unknown or "file" not in value:
            raise SuiteError(f"{where}: an attack file mapping has keys {', '.join(sorted(ATTACK_FILE_KEYS))} "
                             f"(file required){'; unknown: ' + ', '.join(unknown) if unknown else ''}")
        options = {k: v for k, v in value.items() if k != "file"}
        if isinstance(options.get("categories"), str):
            options["categories"] = [options["categories"]]
        value = value["file"]
    if isinstance(value, str) and Path(value).suffix.lower() in (".csv", ".tsv", ".json"):
        path = (base_dir / value) if not Path(value).is_absolute() else Path(value)
        try:
            _, pairs = read_attack_prompts(path, **options)
        except PairReadError as e:  # it names the file; ``where`` empty: the file is the suite
            raise SuiteError(f"{where}: {e}" if where else str(e)) from None
        if not pairs:
            raise SuiteError(f"{where}: {path}: no prompt is left (after the categories / min_nudity_percentage "
                             "selection)")
        return [(p.target, p.seed, p.extra.get("guidance")) for p in pairs]
    if options:
        raise SuiteError(f"{where}: column / categories / min_nudity_percentage apply to a CSV or JSON attack file")
    return [(p, s, None) for p, s in _prompt_list(value, base_dir, where)]


def _seeded(rows: list[tuple[str, int]], base_seed: int, limit: int) -> list[tuple[str, int]]:
    rows = rows[:limit] if limit else rows
    return [(p, s if s >= 0 else base_seed + i) for i, (p, s) in enumerate(rows)]


def replace_word(prompt: str, word: str, replacement: str) -> Optional[str]:
    """``prompt`` with the whole word ``word`` replaced (case-insensitive, capitals kept); None if absent."""
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    if not pattern.search(prompt):
        return None

    def repl(m: re.Match) -> str:
        return replacement[:1].upper() + replacement[1:] if m.group(0)[:1].isupper() else replacement

    return pattern.sub(repl, prompt)


def suite_from_mapping(spec: dict, cfg: Config, source: str, base_dir: Path) -> Suite:
    """A suite from a parsed suite file (see the module docstring)."""
    unknown = sorted(set(spec) - SUITE_KEYS)
    if unknown:
        raise SuiteError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(SUITE_KEYS))})")
    name = str(spec.get("name") or Path(source).stem)
    concept = str(spec.get("concept") or cfg.erase.concept)
    limit = int(spec.get("limit", 0))
    fmt = str(spec.get("format", "auto"))
    seed = cfg.eval.seed
    prompts: list[EvalPrompt] = []
    if "prompts" in spec:
        rows = _seeded(_prompt_list(spec["prompts"], base_dir, f"{source}: prompts", concept, fmt), seed, limit)
        prompts += [EvalPrompt(p, s, concept, "concept", concept) for p, s in rows]
        for word in spec.get("synonyms") or []:
            made = [(replace_word(p, concept, word), s) for p, s in rows]
            made = [(p, s) for p, s in made if p]
            if not made:
                raise SuiteError(f"{source}: synonyms: no prompt contains the concept word {concept!r} to replace "
                                 f"with {word!r}")
            prompts += [EvalPrompt(p, s, f"{concept} -> {word}", "concept", concept, "synonym") for p, s in made]
    for key, role, kind in (("paraphrases", "concept", "paraphrase"), ("attacks", "concept", "attack"),
                            ("preservation", "preservation", "")):
        groups = spec.get(key) or {}
        if not isinstance(groups, dict):
            raise SuiteError(f"{source}: {key}: expected a mapping group -> prompt file or list")
        for group, value in groups.items():
            judged_on = concept if role == "concept" else str(group)
            where = f"{source}: {key}.{group}"
            if key == "attacks":
                rows3 = _attack_list(value, base_dir, where)
                seeds = _seeded([(p, s) for p, s, _ in rows3], seed, limit)
                prompts += [EvalPrompt(p, s, str(group), role, judged_on, kind, g)
                            for (p, s), (_, _, g) in zip(seeds, rows3)]
                continue
            rows = _seeded(_prompt_list(value, base_dir, where, judged_on), seed, limit)
            prompts += [EvalPrompt(p, s, str(group), role, judged_on, kind) for p, s in rows]
    for key, role in (("unrelated", "unrelated"), ("captions", "caption")):
        if key in spec:
            rows = _seeded(_prompt_list(spec[key], base_dir, f"{source}: {key}", concept, fmt), seed, limit)
            prompts += [EvalPrompt(p, s, key, role) for p, s in rows]
    classifier = spec.get("classifier") or {}
    if not isinstance(classifier, dict):
        raise SuiteError(f"{source}: classifier: expected a mapping of eval.classifier keys")
    if not prompts:
        raise SuiteError(f"{source}: the suite has no prompts (give prompts, paraphrases, attacks, preservation, "
                         "unrelated or captions)")
    return Suite(name, prompts, source, concept, dict(classifier))


def attack_file_layout(path: Path) -> str:
    """The attack layout of a CSV whose columns mark one (Ring-A-Bell, MMA-Diffusion, UnlearnDiff, I2P), else ''."""
    if path.suffix.lower() not in (".csv", ".tsv"):
        return ""
    import csv

    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        header = [h.strip() for h in next(csv.reader(f), [])]
    try:
        layout, _ = attack_layout(header)
    except ValueError:
        return ""
    return "" if layout == "prompts" else layout


def suite_from_prompt_file(path: Path, cfg: Config) -> Suite:
    """A prompt file alone: one concept group (a COCO CSV: captions; an attack release's CSV: one attack group named
    after its layout, judged on ``erase.concept``)."""
    layout = attack_file_layout(path)
    if layout:
        concept = cfg.erase.concept
        rows3 = _attack_list(str(path), Path("."), "")
        seeds = _seeded([(p, s) for p, s, _ in rows3], cfg.eval.seed, 0)
        return Suite(path.stem, [EvalPrompt(p, s, layout, "concept", concept, "attack", g)
                                 for (p, s), (_, _, g) in zip(seeds, rows3)], str(path), concept)
    rows = _seeded(_prompt_list(str(path), Path("."), str(path), cfg.erase.concept), cfg.eval.seed, 0)
    if not rows:
        raise SuiteError(f"{path}: the file has no prompts")
    pairs = [] if path.suffix.lower() == ".txt" else read_pairs(path, concept=cfg.erase.concept)[:1]
    if pairs and pairs[0].source.startswith("coco:"):
        return Suite(path.stem, [EvalPrompt(p, s, "captions", "caption") for p, s in rows], str(path))
    concept = (pairs[0].concept if pairs else "") or cfg.erase.concept
    return Suite(path.stem, [EvalPrompt(p, s, concept, "concept", concept) for p, s in rows], str(path), concept)


def coco_suite(cfg: Config) -> Suite:
    """The first ``eval.coco_size`` captions of the COCO-30k CSV, for FID and CLIP score."""
    if not cfg.eval.coco_prompts:
        raise SuiteError("suite coco: set eval.coco_prompts to the COCO-30k caption CSV "
                         "(columns image_id, prompt, evaluation_seed)")
    try:
        pairs = read_pairs(cfg.eval.coco_prompts, format="coco")
    except PairReadError as e:
        raise SuiteError(f"suite coco: {e}") from None
    rows = _seeded([(p.target, p.seed) for p in pairs], cfg.eval.seed, cfg.eval.coco_size)
    if not rows:
        raise SuiteError(f"suite coco: {cfg.eval.coco_prompts} has no captions")
    return Suite(f"coco-{len(rows)}", [EvalPrompt(p, s, "captions", "caption") for p, s in rows],
                 cfg.eval.coco_prompts)


def load_suite(spec: str, cfg: Config) -> Suite:
    """One suite from a ``--suite`` value: a file, ``coco``, ``world[:concept]``, ``attack:<kind>:<concept>`` or
    ``module:function[:arg]``."""
    if spec == "coco":
        return coco_suite(cfg)
    path = Path(spec)
    if path.exists():
        if path.suffix.lower() in (".yaml", ".yml") or (path.suffix.lower() == ".json" and _is_mapping(path)):
            return suite_from_mapping(read_file(path), cfg, str(path), path.parent)
        return suite_from_prompt_file(path, cfg)
    head, _, arg = spec.partition(":")
    if head in BUILTIN_PLUGINS:
        target, arg = BUILTIN_PLUGINS[head], arg
    elif ":" in spec and not spec.endswith((".json", ".csv", ".yaml", ".yml", ".txt")):
        module_name, _, rest = spec.partition(":")
        attr, _, arg = rest.partition(":")
        target = f"{module_name}:{attr}"
    else:
        raise SuiteError(f"suite {spec!r}: no such file, and not coco, world[:concept], guidance:<suite>, "
                         "attack:<kind>:<concept> or "
                         "module:function")
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SuiteError(f"suite {spec!r}: cannot import {target}: {e}") from None
    if not inspect.isfunction(fn):
        raise SuiteError(f"suite {spec!r}: {target} is not a Python function (a suite plugin is "
                         "`def f(cfg, argument) -> Suite`)")
    try:
        inspect.signature(fn).bind(cfg, arg)
    except TypeError as e:
        raise SuiteError(f"suite {spec!r}: {target} cannot be called as f(cfg, argument): {e}") from None
    suite = fn(cfg, arg)
    if not isinstance(suite, Suite) or not suite.prompts:
        raise SuiteError(f"suite {spec!r}: {target} returned no prompts")
    return suite


def _is_mapping(path: Path) -> bool:
    return path.read_text(encoding="utf-8-sig", errors="replace").lstrip().startswith("{")


def load_suites(specs: Sequence[Union[str, Suite]], cfg: Config) -> list[Suite]:
    """Every suite; two suites of one name are an error (they would share report rows)."""
    if not specs:
        raise SuiteError("no suites: pass --suite FILE|coco|world (repeatable) or set eval.suites")
    suites = [s if isinstance(s, Suite) else load_suite(s, cfg) for s in specs]
    names = [s.name for s in suites]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SuiteError(f"two suites are named {', '.join(dup)}; give each suite file its own name")
    for s in suites:
        bad = sorted({p.role for p in s.prompts} - set(ROLES))
        if bad:
            raise SuiteError(f"suite {s.name}: unknown role(s) {', '.join(bad)} (roles: {', '.join(ROLES)})")
        if (s.per_column is not None or s.patch is not None) and s.attack is None:
            raise SuiteError(f"suite {s.name}: per_column / patch need attack=Attack(name, budget, seed) (its image "
                             "keys name the attack's budget and seed)")
        if s.patch is not None and s.per_column is None:
            raise SuiteError(f"suite {s.name}: patch(model, tensors) is applied with the tensors per_column returns; "
                             "give per_column too")
    return suites
