"""Pretrain a tiny model on the world until it draws every concept, and cache it.

The model is a tiny Janus, or for ``model.family=var`` a tiny next-scale model on the
world's multi-scale bitwise images (``ear_dist.world.var_world``). The loss is
text-to-image cross-entropy: the head's logits at every image position
(``teacher_forced``) against the rendered tokens (per bit on a bitwise head). A share of
the prompts is dropped to the unconditional form (Janus: every token but BOS and
begin-of-image replaced by pad; VAR: the learned unconditional text states), as rollouts
do for classifier-free guidance, so CFG sampling works. Every
``eval_every`` steps the model samples held-out prompts with CFG (``rollout``) and the
world's classifier judges them (a progress log). Training runs a fixed ``max_steps``:
an early stop on the first check at the target made the model depend on the luck of
one 18-prompts-per-word draw (the lowest of eleven noisy accuracies), and builds on
other machines stopped on a lucky check or never. After training, the build is
judged once on two independent held-out sets pooled (36 prompts per word): it reaches
its target when every object (each synonym counted on its own) and style reaches
``min_accuracy`` and their mean reaches ``target_accuracy``. A third set, drawn once,
is reported beside it. Nothing the checks do touches the training's random streams, so
the weights depend only on the world, the settings and the thread count.

The training state is saved beside the cache (``<build hash>.partial``) at every progress
check and when training ends, before the judgement; a build that was stopped resumes from
it (the same weights as an uninterrupted build) and the directory goes once the model is
cached.

The result is the family's model directory (for Janus a plain transformers checkpoint)
under ``<cache>/<build hash>``; the hash covers the world and every pretraining setting, so
a second build with the same config returns the cached model at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ear_dist.config import WorldConfig
from ear_dist.storage import apply_umask
from ear_dist.world.var_world import VarWorld, world_for
from ear_dist.world.world import World

BUILD_INFO_FILE = "world_build.json"
_TRAIN_STREAM = 1_000_000  # world.sample stream of training step s is _TRAIN_STREAM + s
_EVAL_STREAMS = (0xE7A1, 0xE7A2)  # progress checks alternate between these held-out sets; the target pools both
_CONFIRM_STREAM = 0xC0F1  # a third held-out set, drawn once after training
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" of a container's CPU limit, or "max ..."

# The fields of WorldConfig that shape the model or its training (the rest shape the data).
MODEL_FIELDS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "batch_size", "lr",
                "warmup_steps", "decay_steps", "max_steps", "uncond_prob", "threads")


def cache_root(config: WorldConfig) -> Path:
    """world.cache_dir, else $EAR_DIST_CACHE/world, else ~/.cache/ear-dist/world."""
    if config.cache_dir:
        return Path(config.cache_dir).expanduser()
    if os.environ.get("EAR_DIST_CACHE"):
        return Path(os.environ["EAR_DIST_CACHE"]).expanduser() / "world"
    return Path.home() / ".cache" / "ear-dist" / "world"


def build_hash(world: World) -> str:
    """Hash of the world plus every model and pretraining setting (the thread count as the build
    runs it): the cache key."""
    settings = {k: getattr(world.config, k) for k in MODEL_FIELDS}
    settings["threads"] = pretraining_thread_count(world.config)  # the count the build runs on
    text = json.dumps({"world": world.config_hash, "model": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def required_concepts(accuracy: dict[str, float], world=None) -> dict[str, float]:
    """The entries the build must bring to target: every object and style, and each of their words
    (``church (chapel)``: train, validation and held-out words alike). ``world``: whose concepts (default:
    every entry that is not a scene of the planted world, so build infos of any world read alike)."""
    if world is not None:
        concepts = set(world.vocab.concepts)
        return {k: v for k, v in accuracy.items() if k.split(" (")[0] in concepts}
    from ear_dist.world.grammar import SCENES

    return {k: v for k, v in accuracy.items() if k not in SCENES}


def evaluation_batch(world: World, stream: int = _EVAL_STREAMS[0]):
    """Held-out prompts: for every object word (synonyms included), the same number with
    no style and with each style, so every object, synonym and style has positives; a style with
    several names takes them in turn from word to word, so every name has positives too."""
    vocab = world.vocab
    per_style = max(1, world.config.eval_prompts_per_word // (1 + len(vocab.styles)))
    records, tokens = [], []
    words = [w for ws in vocab.objects.values() for w in ws]
    for i, word in enumerate(words):
        for j, style in enumerate([None, *vocab.styles]):
            names = vocab.all_words(style) if style is not None else ()
            if len(names) <= 1:  # no style, or a style of one name (the planted world): one batch
                parts = [(per_style, {"styles": [style]}, 0)]
            else:  # prompt t of this word and style names the style by name (i + t) mod len(names)
                counts = np.bincount([(i + t) % len(names) for t in range(per_style)], minlength=len(names))
                parts = [(int(n), {"style_words": [names[k]]}, k + 1) for k, n in enumerate(counts) if n]
            for n, restrict, k in parts:
                batch = world.sample(n, "heldout", stream=stream + 16 * i + j + (k << 40), object_words=[word],
                                     **restrict)
                records += batch.records
                tokens.append(batch.tokens)
    return records, np.concatenate(tokens)


def evaluate_model(world: World, bundle, records, seed: int = 0) -> dict[str, float]:
    """The classifier's balanced accuracy per concept on the model's own CFG samples of ``records``."""
    from ear_dist.models.family import as_image_model

    bundle = as_image_model(bundle)
    was_training = bundle.model.training
    bundle.model.eval()
    prompts = [r.prompt for r in records]
    tokens = bundle.sample(prompts, guidance_weight=world.config.guidance_weight,
                           seeds=[seed + i for i in range(len(prompts))], batch_size=64)
    bundle.model.train(was_training)
    return world.accuracy(tokens, records)


def lr_factor(step: int, warmup_steps: int, decay_steps: int) -> float:
    """Linear warm-up, then a cosine decay to a tenth over ``decay_steps``, then a tenth: a constant
    rate stalls short of the target accuracy because late, rarely-seen decisions (which object to
    draw) stay noisy."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _new_model(world: World):
    c = world.config
    if isinstance(world, VarWorld):
        from ear_dist.models.var.bundle import build_var_preset
        from ear_dist.models.var.presets import tiny_var_config

        config = tiny_var_config(embed_dim=c.hidden_size, depth=c.num_layers, num_heads=c.num_heads,
                                 ffn_hidden=c.intermediate_size, bits=world.token_bits,
                                 scales=world.scales, block_chunks=2 if c.num_layers % 2 == 0 else 1)
        return build_var_preset("tiny-var", seed=c.seed, config=config, extra_words=world.vocabulary())
    from ear_dist.models.family import as_image_model
    from ear_dist.models.janus import build_preset
    from ear_dist.models.janus.presets import tiny_config

    config = tiny_config(hidden_size=c.hidden_size, num_layers=c.num_layers, num_heads=c.num_heads,
                         intermediate_size=c.intermediate_size, grid_side=c.grid_side, codebook_size=c.codebook_size)
    return as_image_model(build_preset("tiny", seed=c.seed, config=config, extra_words=world.vocabulary()))


def image_token_loss(logits: torch.Tensor, tokens: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean cross-entropy of the head toward the tokens: over the codebook, or per bit of a bitwise head."""
    if groups == 1:
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens.reshape(-1))
    from ear_dist.models.var.bsq import token_bits

    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, 2), token_bits(tokens, groups).reshape(-1))


def cpus_given() -> int:
    """The CPUs this process may run on: its affinity (taskset, Slurm's binding), lowered by a
    cgroup CPU quota (a container's ``--cpus``) when one is set."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        count = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def pretraining_thread_count(config: WorldConfig) -> int:
    """``world.threads``, capped at the CPUs this process may run on.

    The count is part of the build (float sums depend on how work is split over threads), so
    it comes from the config, never from the caller's thread setting (``OMP_NUM_THREADS``,
    ``torch.set_num_threads``): the same config gives the same weights whatever the caller
    set. More threads than CPUs only spin against each other, so a process given fewer CPUs
    builds with that many: another model, cached under its own hash.
    """
    return max(1, min(config.threads, cpus_given()))


@contextmanager
def pretraining_threads(config: WorldConfig):
    """Run the block on ``pretraining_thread_count(config)`` intra-op threads, then give the
    caller's count back; yields the count."""
    ambient = torch.get_num_threads()
    threads = pretraining_thread_count(config)
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(ambient)


def pretrain(world: World, progress: bool = True, log: Callable[[str], None] = print,
             checkpoint_dir: Path | None = None):
    """Train a fresh tiny model on the world with ``world.threads`` CPU threads; returns (bundle, info dict).

    With ``checkpoint_dir`` the training state is saved there at every progress check and when
    training ends (before the judgement), and a build that finds a state there resumes from it:
    a stopped build loses at most ``eval_every`` steps, and the resumed weights equal an
    uninterrupted build's bit for bit."""
    with pretraining_threads(world.config):
        return _pretrain(world, progress, log, checkpoint_dir)


PRETRAIN_STATE_FILE = "pretrain_state.pt"


def save_pretrain_state(directory: Path, step: int, bundle, train_step: "PretrainingStep", history: list,
                        seconds: float, build: str) -> None:
    """The training state after ``step`` (model, optimizer, schedule, the prompt-drop stream), written
    atomically: a crash while saving leaves the previous state."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {"build_hash": build, "step": step, "model": bundle.model.state_dict(),
             "optimizer": train_step.optimizer.state_dict(), "schedule": train_step.schedule.state_dict(),
             "drop_rng": train_step.drop_rng.bit_generator.state, "history": history, "seconds": seconds}
    tmp = directory / f"{PRETRAIN_STATE_FILE}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, directory / PRETRAIN_STATE_FILE)


def load_pretrain_state(directory: Path | None, build: str) -> dict | None:
    """The saved training state of this build, or None (none saved, or one of another build)."""
    if directory is None or not (directory / PRETRAIN_STATE_FILE).is_file():
        return None
    state = torch.load(directory / PRETRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    return state if state.get("build_hash") == build else None


class PretrainingStep:
    """One optimizer step of world pretraining (step ``s`` draws training batch ``s``); called by
    ``pretrain`` and timed as it is by ``benchmarks/bench_world_threads.py``."""

    def __init__(self, world: World, bundle):
        c = world.config
        self.world, self.bundle, self.batch_size, self.uncond_prob = world, bundle, c.batch_size, c.uncond_prob
        # the VQ image decoder and the understanding tower take no part in text-to-image training
        self.params = [p for n, p in bundle.model.named_parameters()
                       if not n.startswith(("model.vqmodel", "model.vision_model", "model.aligner", "lm_head"))]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, c.warmup_steps, c.decay_steps))
        self.drop_rng = np.random.default_rng(np.random.SeedSequence([c.seed, 0xD409]))

    def __call__(self, step: int) -> torch.Tensor:
        bundle = self.bundle
        batch = self.world.sample(self.batch_size, "all", stream=_TRAIN_STREAM + step)
        cond, attention_mask = bundle.encode_prompts(batch.prompts)
        dropped = torch.from_numpy(self.drop_rng.random(len(batch)) < self.uncond_prob)
        cond = torch.where(dropped.view(-1, *[1] * (cond.dim() - 1)), bundle.unconditional(cond), cond)
        image_tokens = torch.from_numpy(batch.tokens)
        _, logits = bundle.teacher_forced(bundle.model, cond, attention_mask, image_tokens)
        loss = image_token_loss(logits, image_tokens, bundle.logit_groups)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.schedule.step()
        return loss.detach()


def _pretrain(world: World, progress: bool, log: Callable[[str], None], checkpoint_dir: Path | None = None):
    c = world.config
    bundle = _new_model(world)
    model = bundle.model
    model.train()
    train_step = PretrainingStep(world, bundle)
    eval_sets = [evaluation_batch(world, stream)[0] for stream in _EVAL_STREAMS]
    history, first, earlier_seconds = [], 1, 0.0
    build = build_hash(world)
    state = load_pretrain_state(checkpoint_dir, build)
    if state is not None:
        model.load_state_dict(state["model"])
        train_step.optimizer.load_state_dict(state["optimizer"])
        train_step.schedule.load_state_dict(state["schedule"])
        train_step.drop_rng.bit_generator.state = state["drop_rng"]
        history, first, earlier_seconds = state["history"], state["step"] + 1, state["seconds"]
        log(f"world model: resuming the build after step {state['step']} of {c.max_steps} "
            f"({checkpoint_dir / PRETRAIN_STATE_FILE}, {earlier_seconds:.0f} s of training so far)")
    started = time.perf_counter() - earlier_seconds

    def checkpoint(step: int) -> None:
        if checkpoint_dir is not None:
            save_pretrain_state(checkpoint_dir, step, bundle, train_step, history, time.perf_counter() - started,
                                build)

    steps = range(first, c.max_steps + 1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(steps, desc="world pretraining", unit="step", initial=first - 1, total=c.max_steps)
        steps = bar
    for step in steps:
        loss = train_step(step)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % c.eval_every == 0 and step < c.max_steps:
            check = len(history)
            accuracy = evaluate_model(world, bundle, eval_sets[check % 2], seed=check * len(eval_sets[0]))
            required = required_concepts(accuracy, world)
            worst = min(required.items(), key=lambda kv: kv[1])
            mean = float(np.mean(list(required.values())))
            history.append({"step": step, "loss": float(loss.item()), "seconds": time.perf_counter() - started,
                            "min_accuracy": worst[1], "worst": worst[0], "mean_accuracy": mean})
            log(f"step {step}: loss {loss.item():.3f}, lowest accuracy {worst[1]:.3f} ({worst[0]}), mean {mean:.3f}")
            checkpoint(step)
    if bar is not None:
        bar.close()
    if first <= c.max_steps:  # trained in this call: keep the trained model before the (long) judgement
        checkpoint(c.max_steps)
    model.eval()
    judged = judge_build(world, bundle)
    info = {
        "build_hash": build_hash(world),
        "world_hash": world.config_hash,
        **judged,
        "steps": c.max_steps,
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "history": history,
        **({"resumed_after_step": state["step"]} if state is not None else {}),
        "world": world.describe(),
        "config": dataclasses.asdict(c),
    }
    return bundle, info


def judge_build(world: World, bundle) -> dict:
    """The built model against its target: two held-out sets pooled, and a third, unseen set reported beside."""
    c = world.config
    records = [r for stream in _EVAL_STREAMS for r in evaluation_batch(world, stream)[0]]
    accuracy = evaluate_model(world, bundle, records, seed=0)
    required = required_concepts(accuracy, world)
    reached = min(required.values()) >= c.min_accuracy and float(np.mean(list(required.values()))) >= \
        c.target_accuracy
    confirm_records, _ = evaluation_batch(world, stream=_CONFIRM_STREAM)
    confirmation = evaluate_model(world, bundle, confirm_records, seed=10_000_000)
    return {"reached_target": bool(reached), "target_accuracy": c.target_accuracy, "min_accuracy": c.min_accuracy,
            "mean_accuracy": float(np.mean(list(required.values()))), "accuracy": accuracy,
            "confirmation_accuracy": confirmation}


def build_world_model(config: WorldConfig, force: bool = False, progress: bool = True,
                      log: Callable[[str], None] = print, family: str = "janus") -> tuple[Path, dict]:
    """The cached world model of a family for this config (built when missing): (model dir, build info)."""
    world = world_for(config, family)
    out = cache_root(config) / build_hash(world)
    info_file = out / BUILD_INFO_FILE
    if info_file.is_file() and not force:
        info = json.loads(info_file.read_text())
        log(f"world model: cached at {out} (built in {info['seconds']:.0f} s, {info['steps']} steps)")
        _warn_if_short(info, log)
        return out, info
    threads = pretraining_thread_count(config)
    if threads < config.threads:
        log(f"world model: world.threads={config.threads} but this process may run on {threads} CPU(s): pretraining "
            f"on {threads} thread(s), which builds another model than {config.threads} threads do (cached apart)")
    partial = out.with_name(out.name + ".partial")  # the training state of a build that has not finished
    try:
        bundle, info = pretrain(world, progress=progress, log=log, checkpoint_dir=partial)
    except KeyboardInterrupt:
        state = load_pretrain_state(partial, build_hash(world))
        if state is not None:
            log(f"world model: stopped; the same command resumes the build after step {state['step']} ({partial})")
        raise
    _warn_if_short(info, log)
    # write beside the final directory and rename, so a crash never leaves a half model in the cache
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    bundle.save(tmp)
    (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2))
    apply_umask(tmp)  # a shared cache: readable by the other users as the umask says (safetensors writes 0600)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(partial, ignore_errors=True)
    return out, info


def missed_target_message(info: dict) -> str:
    """'' when the build reached its target; else a one-line warning naming the weakest concept or word."""
    if info.get("reached_target", False):
        return ""
    worst = min(required_concepts(info["accuracy"]).items(), key=lambda kv: kv[1])
    return (f"WARNING: this world model MISSED its pretraining target (every concept and word >= "
            f"{info.get('min_accuracy', '?')}, mean >= {info['target_accuracy']}): lowest {worst[0]} "
            f"{worst[1]:.3f}, mean {info.get('mean_accuracy', float('nan')):.3f} after {info['steps']} steps, so "
            "erasure and preservation measured on it are not the method's alone (rebuild with more steps: "
            "ear-dist world build --force --set world.max_steps=...)")


def refuse_missed_target(info: dict, config: WorldConfig, where: str = "", log: Callable[[str], None] = print
                         ) -> None:
    """Stop a command that measures with a world model which missed its pretraining target: an ``InputError``
    (one line, exit 2) naming the weakest concept or word and how to rebuild, unless
    ``world.allow_missed_target`` is set, when the WARNING line is logged instead (never silent).

    ``info`` is the build's ``world_build.json``; one without a verdict (no ``reached_target``) passes."""
    if info.get("reached_target", True):
        return
    if config.allow_missed_target:
        log(missed_target_message(info))
        return
    from ear_dist.errors import InputError

    worst = min(required_concepts(info["accuracy"]).items(), key=lambda kv: kv[1])
    place = f"{where}: " if where else ""
    raise InputError(
        f"{place}the world model missed its pretraining target: weakest {worst[0]} {worst[1]:.3f}, mean "
        f"{info.get('mean_accuracy', float('nan')):.3f} after {info['steps']} steps (wanted: every concept and word "
        f">= {info.get('min_accuracy', '?')}, mean >= {info['target_accuracy']}); rebuild it with more steps (ear-dist "
        f"world build --force, the same --recipe/--set, and --set world.max_steps={2 * int(info['steps'])}) or "
        "measure anyway with --set world.allow_missed_target=true")


def model_build_info(model_path) -> dict:
    """The ``world_build.json`` of a world model directory ({} for a model that is no world build)."""
    path = Path(str(model_path)) / BUILD_INFO_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _warn_if_short(info: dict, log: Callable[[str], None]) -> None:
    message = missed_target_message(info)
    if message:
        log(message)
