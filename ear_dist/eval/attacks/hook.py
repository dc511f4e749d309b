"""Attack suites: prompts (and a model patch) that an attack prepares against each column.

An attack suite is a :class:`~ear_dist.eval.suites.Suite` with ``attack`` (its name, budget
and seed, part of every image key) and ``per_column``: a function called once per column
(``base`` and each delta or composed column) with the model as that column has it (its deltas
applied in memory), which returns a :class:`ColumnAttack`:

- ``prompts``: the EvalPrompts this column samples for the suite (a GCG suffix found against
  this column, a prompt holding a token the attack learned), judged by the suite's classifier;
- ``tensors``: what the attack learned that the prompts need (new token embeddings), saved as
  safetensors beside the images; the suite's ``patch(model, tensors)`` is a context manager
  applied to the model while this column's prompts of the suite are sampled;
- ``info``: JSON figures of the attack (its loss, steps), kept in the report.

Preparation runs once per (suite, column), before any image: the (suite, column) jobs are
split over the ranks like images (job ``i`` on rank ``i % world_size``), each written to
``<out>/attacks/<suite>/<column>-<id>.{safetensors,json}`` (``id``: the attack's name, budget,
seed, the column and its deltas' bytes, the base model), and every rank reads every column's
result from there once it exists. A rerun into the same ``--out`` reads it back instead of
attacking again, so resumed and distributed runs sample exactly the same prompts. The
function runs under ``torch.manual_seed(attack.seed)`` (and numpy's, Python's) with gradients
enabled, and must leave the model's weights as it found them (checked with the model's
fingerprint; requires_grad flags and train/eval mode are restored for it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import numpy as np
import torch

from ear_dist.errors import InputError, RunFailure
from ear_dist.eval.suites import Attack, EvalPrompt, Suite

ATTACK_WAIT_S = 24 * 3600.0  # how long a rank waits for another rank's preparation (a failed one says so at once)
POLL_S = 0.5


@dataclass
class ColumnAttack:
    """What an attack prepared against one column: its prompts, the tensors they need, figures for the report."""

    prompts: list[EvalPrompt]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def attack_id(attack: Attack, column: str, base_fingerprint: str, delta_digests: Sequence[str]) -> str:
    """Names one (attack, column) preparation: everything it depends on."""
    text = json.dumps([attack.name, attack.budget, int(attack.seed), column, base_fingerprint, list(delta_digests)],
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names, dtypes, shapes and bytes (first 16 hex digits); '' for none."""
    if not tensors:
        return ""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class PreparedFile:
    suite: str
    column: str
    stem: Path  # <out>/attacks/<suite>/<column>-<id>; .json (written last: complete), .safetensors, .failed

    @property
    def json(self) -> Path:
        return self.stem.with_name(self.stem.name + ".json")

    @property
    def tensors(self) -> Path:
        return self.stem.with_name(self.stem.name + ".safetensors")

    @property
    def failed(self) -> Path:
        return self.stem.with_name(self.stem.name + ".failed")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch (CPU and CUDA), numpy and Python RNGs seeded for the block, then restored."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        np.random.seed(int(seed) % 2**32)
        random.seed(int(seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _check(result, suite: Suite, column: str) -> ColumnAttack:
    where = f"suite {suite.name}: per_column({column!r})"
    if not isinstance(result, ColumnAttack):
        raise RunFailure(f"{where} returned {type(result).__name__}, not a ColumnAttack")
    if not result.prompts or not all(isinstance(p, EvalPrompt) for p in result.prompts):
        raise RunFailure(f"{where} returned no prompts, or prompts that are not EvalPrompts")
    known = suite.groups()
    stray = sorted({p.group for p in result.prompts} - set(known))
    if stray:
        raise RunFailure(f"{where} returned prompts of group(s) {', '.join(stray)} that the suite's own prompts do not "
                         f"have ({', '.join(known)}): the report's rows are the suite's groups")
    bad = [k for k, v in result.tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise RunFailure(f"{where}: tensors must map names to torch tensors (bad: {bad[:3]})")
    if result.tensors and suite.patch is None:
        raise RunFailure(f"{where} returned tensors but the suite has no patch(model, tensors) to apply them")
    try:
        json.dumps(result.info)
    except TypeError as e:
        raise RunFailure(f"{where}: info is not JSON: {e}") from None
    return result


def run_per_column(bundle, suite: Suite, column, ) -> ColumnAttack:
    """``suite.per_column`` on the model with the column's deltas applied, seeded, the model checked unchanged."""
    from ear_dist.models.delta import applied_deltas
    from ear_dist.models.fingerprint import model_fingerprint

    model = bundle.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    training = model.training
    with applied_deltas(model, list(column.deltas)):
        before = model_fingerprint(model)
        try:
            with seeded(suite.attack.seed), torch.enable_grad():
                result = suite.per_column(column.name, bundle)
        finally:
            for n, p in model.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])
            model.train(training)
        if model_fingerprint(model) != before:
            raise RunFailure(f"suite {suite.name}: per_column({column.name!r}) changed the model's weights; an "
                             "attack must restore what it changes (return tensors and a patch instead)")
    return _check(result, suite, column.name)


def _write(prepared: PreparedFile, result: ColumnAttack, suite: Suite, seconds: float) -> None:
    from safetensors.torch import save_file

    prepared.stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in result.tensors.items()}
    if tensors:
        tmp = prepared.tensors.with_name(f"{prepared.tensors.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(prepared.tensors)
    doc = {"suite": suite.name, "column": prepared.column, "attack": asdict(suite.attack),
           "prompts": [asdict(p) for p in result.prompts], "tensors": sorted(tensors),
           "tensors_digest": tensors_digest(tensors), "info": result.info, "seconds": seconds}
    tmp = prepared.json.with_name(f"{prepared.json.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(prepared.json)


def read_prepared(prepared: PreparedFile, device) -> tuple[ColumnAttack, str]:
    """(the ColumnAttack, its tensors' digest) from a preparation's files."""
    from safetensors.torch import load_file

    try:
        doc = json.loads(prepared.json.read_text(encoding="utf-8"))
        prompts = [EvalPrompt(**p) for p in doc["prompts"]]
        tensors = load_file(str(prepared.tensors), device=str(device)) if doc["tensors"] else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{prepared.json}: not a readable attack preparation ({e}); delete it to attack again") \
            from None
    if sorted(tensors) != sorted(doc["tensors"]):
        raise InputError(f"{prepared.tensors}: holds {sorted(tensors)}, {prepared.json.name} names {doc['tensors']}")
    info = dict(doc.get("info") or {}, seconds=doc.get("seconds"))
    return ColumnAttack(prompts, tensors, info), doc.get("tensors_digest", "")


def prepare_attacks(bundle, suites: Sequence[Suite], columns, base_fingerprint: str, out_dir: Path, rank: int = 0,
                    world_size: int = 1, log: Callable[[str], None] = print, wait_s: float = ATTACK_WAIT_S,
                    barrier: Optional[Callable[[], None]] = None) -> dict[tuple[str, str], tuple[ColumnAttack, str]]:
    """Every attack suite's preparation for every column: (suite, column) -> (ColumnAttack, tensors digest).

    Job ``i`` of the fixed (suite, column) list runs on rank ``i % world_size`` unless its files exist (a rerun);
    then every rank waits for and reads every job's files (a rank whose preparation failed leaves a .failed file
    with the error, so the others stop at once). ``barrier`` (several ranks): after rank 0 has removed the .failed
    files an earlier run left, before any rank looks for them."""
    from ear_dist.models.delta import file_digest

    jobs = []
    for suite in suites:
        if suite.per_column is None:
            continue
        for column in columns:
            ident = attack_id(suite.attack, column.name, base_fingerprint, [file_digest(d) for d in column.deltas])
            jobs.append((suite, column, PreparedFile(suite.name, column.name,
                                                     out_dir / "attacks" / suite.name / f"{column.name}-{ident}")))
    if rank == 0:
        for _, _, prepared in jobs:
            prepared.failed.unlink(missing_ok=True)
    if jobs and barrier is not None:
        barrier()
    for i, (suite, column, prepared) in enumerate(jobs):
        if i % world_size != rank or prepared.json.is_file():
            continue
        t0 = time.perf_counter()
        try:
            result = run_per_column(bundle, suite, column)
        except BaseException as e:
            prepared.stem.parent.mkdir(parents=True, exist_ok=True)
            prepared.failed.write_text(f"rank {rank}: {type(e).__name__}: {e}\n", encoding="utf-8")
            raise
        _write(prepared, result, suite, time.perf_counter() - t0)
        log(f"attack {suite.attack.name} (suite {suite.name}) against {column.name}: {len(result.prompts)} prompts, "
            f"{len(result.tensors)} tensors, {time.perf_counter() - t0:.1f} s")
    out = {}
    for suite, column, prepared in jobs:
        deadline = time.monotonic() + wait_s
        while not prepared.json.is_file():
            if prepared.failed.is_file():
                raise RunFailure(f"attack preparation of suite {suite.name} against column {column.name} failed: "
                                 f"{prepared.failed.read_text(encoding='utf-8').strip()}")
            if time.monotonic() > deadline:
                raise RunFailure(f"{prepared.json}: not written within {wait_s:g} s by the rank preparing it; the "
                                 "ranks must share the output directory")
            time.sleep(POLL_S)
        out[(suite.name, column.name)] = read_prepared(prepared, bundle.device)
    return out


def patch_context(suite: Suite, bundle, attack: Optional[ColumnAttack]) -> ContextManager:
    """The suite's patch with this column's tensors, or nothing."""
    if suite.patch is None or attack is None:
        return contextlib.nullcontext()
    return suite.patch(bundle, attack.tensors)


def attack_suite(target: Suite, name: str, attack: Attack, per_column: Callable[[str, object], ColumnAttack],
                 patch: Optional[Callable[[object, dict], ContextManager]] = None,
                 kinds: Sequence[str] = ("test",)) -> Suite:
    """An attack suite against ``target``'s concept prompts of ``kinds``, judged as ``target`` judges (its classifier,
    token classifier and pictures). Its ``prompts`` (those prompts as kind ``attack``) are what ``per_column`` is
    asked to attack and what the report lists as the suite's groups; ``per_column`` returns each column's own."""
    from dataclasses import replace

    prompts = [replace(p, kind="attack") for p in target.prompts
               if p.role == "concept" and (p.kind or "test") in kinds]
    if not prompts:
        raise InputError(f"attack suite {name}: suite {target.name} has no concept prompts of kind "
                         f"{', '.join(kinds)} to attack")
    return replace(target, name=name, prompts=prompts, source=f"{attack.name} against {target.source or target.name}",
                   attack=attack, per_column=per_column, patch=patch)


def guidance_groups(concept: str, weights: Sequence[float], negative: bool) -> list[tuple[str, float, str]]:
    """(group, CFG weight, negative prompt) of the guidance sweep: each weight, then each guided weight (not 1)
    with the concept word in the unconditional branch."""
    out = [(f"cfg {w:g}", float(w), "") for w in weights]
    if negative:
        out += [(f"cfg {w:g}, negative {concept!r}", float(w), concept) for w in weights if float(w) != 1.0]
    return out


def guidance_suite(cfg, arg: str = "") -> Suite:
    """``--suite guidance:<suite>`` (a suite file, a prompt file, ``world:<concept>``...): the concept's test prompts
    of that suite sampled at each of ``eval.guidance_sweep``'s CFG weights and, with ``eval.guidance_negative``,
    with the concept word as the negative prompt at each guided weight; one attack group per setting, each
    prompt keeping its seed, judged as the suite judges. The group at ``rollout.guidance_weight`` without a
    negative prompt shares its images with the suite's own test prompts."""
    from dataclasses import replace

    from ear_dist.eval.suites import SuiteError, load_suite

    if not arg:
        raise SuiteError("suite guidance: name the suite to sweep, e.g. guidance:church.yaml or guidance:world:church")
    weights = list(cfg.eval.guidance_sweep)
    bad = [w for w in weights if not float(w) > 0]
    if not weights or bad:
        raise SuiteError(f"eval.guidance_sweep: {weights}: give one or more positive CFG weights")
    target = load_suite(arg, cfg)
    tests = [p for p in target.prompts if p.role == "concept" and (p.kind or "test") == "test"]
    if not tests:
        raise SuiteError(f"suite guidance:{arg}: suite {target.name} has no concept test prompts to sweep")
    concept = target.concept or tests[0].concept
    prompts = [replace(p, group=group, kind="attack", guidance=w, negative=negative)
               for group, w, negative in guidance_groups(concept, weights, cfg.eval.guidance_negative)
               for p in tests]
    return replace(target, name=f"guidance-{target.name}", prompts=prompts, source=f"guidance sweep of {target.source}")
