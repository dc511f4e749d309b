"""Which run a ``train.out_dir`` holds, and whether this run may resume it (``train.resume``).

A run's identity is every setting that shapes its result: the base model's
fingerprint, the data's content, the method and its settings (``erase``, ``rollout``,
``preserve``), the trainable selection, the optimizer, the seed and batch, and the
checkpoint layout (DeepSpeed config, student ranks). ``train.steps`` is not part of
it: a finished run may be extended. The identity is a flat mapping of dotted keys,
hashed into ``run_hash``; it is written into ``<out_dir>/run.json``, every checkpoint
and the delta's metadata, so a refusal names the keys that differ.

``train.resume``:

- ``auto``: resume only a run of the same hash; a finished one is reported, not rerun;
  any other run in the directory stops with an error naming the keys that differ;
- ``never``: start from step 0, removing the previous run's outputs first (so no delta
  is left whose metadata belongs to another run);
- ``force``: resume the checkpoint whatever its hash (the differences are logged and
  recorded in the delta's metadata as a run segment of other settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ear_dist.errors import InputError
from ear_dist.storage import write_text_atomic
from ear_dist.train import checkpoint

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
FORMAT = "ear-dist-run/1"
# every file a run writes into train.out_dir besides checkpoints (removed by train.resume=never)
RUN_OUTPUTS = ("delta.safetensors", "summary.json", "metrics.jsonl", "config.yaml", RUN_FILE)
# whole sections that shape the result, and single keys of the others
SHAPING_SECTIONS = ("erase", "rollout", "trainable", "optim", "preserve")
SHAPING_KEYS = ("model.dtype", "model.seed", "train.seed", "train.pairs_per_step", "data.format", "data.on_error",
                "data.shuffle", "data.shuffle_buffer", "data.shards.mode", "data.shards.drop_last", "data.shards.seed",
                "data.shards.on_corrupt")


class RunStateError(InputError):
    """``train.out_dir`` holds a run this one may not resume or replace; the message names what differs."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass
class RunIdentity:
    """The settings that shape a run's result, as dotted keys; ``about`` holds context for messages only."""

    keys: dict[str, Any]
    about: dict[str, Any] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return digest(json.dumps(self.keys, sort_keys=True, default=str).encode())

    def differences(self, stored: dict[str, Any]) -> dict[str, tuple]:
        """key -> (stored value, this run's value), for every key whose value differs."""
        names = sorted(set(stored) | set(self.keys))
        return {k: (stored.get(k), self.keys.get(k)) for k in names if stored.get(k) != self.keys.get(k)}


def run_identity(cfg, model_fingerprint: str, data_digest: str, deepspeed: Optional[dict], student_ranks: int,
                 about: Optional[dict] = None) -> RunIdentity:
    """The identity of a run of ``cfg`` on this model, data and layout."""
    flat = _flatten(cfg.to_dict())
    keys = {k: v for k, v in flat.items() if k.split(".")[0] in SHAPING_SECTIONS or k in SHAPING_KEYS}
    if not keys.get("trainable.layers"):  # empty: first_k_layers decides, as in runs made before the key existed
        keys.pop("trainable.layers", None)
    keys["model.fingerprint"] = model_fingerprint
    keys["data.content"] = data_digest
    # the checkpoint layout: DeepSpeed's partitions fit only the config and rank count that wrote them
    keys["dist.deepspeed"] = digest(json.dumps(deepspeed, sort_keys=True).encode()) if deepspeed else "none"
    keys["dist.student_ranks"] = student_ranks if deepspeed else 1
    return RunIdentity(keys, {"data.pairs": cfg.data.pairs, "model.path": cfg.model.path, **(about or {})})


@dataclass
class Resume:
    """What a run does with its ``train.out_dir``: start at ``step`` (resuming a checkpoint when > 0), or nothing."""

    step: int = 0
    checkpoint: Optional[dict] = None  # the resumed checkpoint's state.json
    finished: Optional[dict] = None  # the stored summary of an identical run that already finished
    segments: list = field(default_factory=list)  # earlier parts of the run trained under other settings (force)
    cleared: list = field(default_factory=list)  # outputs of an earlier run removed (never)


def read_record(out_dir: Path) -> Optional[dict]:
    f = Path(out_dir) / RUN_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunStateError(f"{f}: unreadable run record: {e}; use train.resume=never to start over") from None


def _describe(diff: dict[str, tuple], limit: int = 8) -> str:
    def short(v):
        text = json.dumps(v, default=str)
        return text if len(text) <= 40 else text[:37] + "..."

    parts = [f"{k} ({short(a)} there, {short(b)} now)" for k, (a, b) in list(diff.items())[:limit]]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(parts) + more


# a run's own files: found without a run record, the directory is someone else's (or an older ear-dist's)
LEFTOVERS = ("delta.safetensors", "summary.json", "config.yaml")


def _refuse_leftovers(out_dir: Path) -> None:
    """A directory holding a run's files but no run record (nor checkpoint) is refused, naming the files."""
    leftovers = [n for n in LEFTOVERS if (out_dir / n).exists()]
    if leftovers:
        raise RunStateError(f"{out_dir}: holds {', '.join(leftovers)} but no run record (written by an older "
                            "ear-dist, or by hand): use another train.out_dir, or train.resume=never to replace them")


def refuse_foreign(out_dir: Path, mode: str) -> None:
    """Before the run takes ``out_dir``'s lock (and so writes into it): a directory holding a run's file names but
    no run record is someone else's (a hand-written config.yaml), refused as ``decide`` refuses it."""
    out_dir = Path(out_dir)
    if mode == "never" or not out_dir.is_dir() or read_record(out_dir) is not None:
        return
    if checkpoint.read_state(out_dir) is None:
        _refuse_leftovers(out_dir)


def decide(out_dir: Path, mode: str, identity: RunIdentity, steps: int) -> Resume:
    """Read ``out_dir`` and decide how this run starts (no file is changed here; see ``prepare``)."""
    out_dir = Path(out_dir)
    record = read_record(out_dir)
    state = checkpoint.read_state(out_dir)
    if mode == "never":
        present = [n for n in RUN_OUTPUTS if (out_dir / n).exists()]
        if checkpoint.checkpoint_root(out_dir).exists():
            present.append(checkpoint.CKPT)
        return Resume(cleared=present)
    if record is None and state is None:
        _refuse_leftovers(out_dir)
        return Resume()
    stored = (state or {}).get("identity") or (record or {}).get("identity") or {}
    diff = identity.differences(stored)
    where = f"{out_dir} holds a run of other settings"
    if diff and mode == "auto":
        raise RunStateError(f"{where}: {_describe(diff)}. Use another train.out_dir, train.resume=never to start "
                            "over there, or train.resume=force to resume it anyway")
    segments = list((record or {}).get("segments", []))
    if diff:
        log.warning("train.resume=force: %s: %s; resuming anyway", where, _describe(diff), extra={"shared": True})
    finished_at = (record or {}).get("finished_step")
    ckpt_step = int(state["step"]) if state is not None else None
    if finished_at is not None and steps <= finished_at:
        summary_file = out_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"steps": finished_at}
        return Resume(step=finished_at, finished=summary)
    if ckpt_step is None:
        if finished_at is not None:
            raise RunStateError(f"{out_dir}: the run finished at step {finished_at} and kept no checkpoint there "
                                f"(train.checkpoint_every), so it cannot be extended to train.steps={steps}; use "
                                "train.resume=never to train from step 0")
        return Resume(segments=segments)  # stopped before its first checkpoint: nothing trained is kept
    if ckpt_step > steps:
        raise RunStateError(f"{checkpoint.latest(out_dir)}: a checkpoint at step {ckpt_step}, past train.steps="
                            f"{steps}; raise train.steps, or use train.resume=never to start over")
    if diff:
        segments.append({"to_step": ckpt_step, "run_hash": state.get("run_hash"),
                         "differs": {k: [a, b] for k, (a, b) in diff.items()}})
    return Resume(step=ckpt_step, checkpoint=state, segments=segments)


def prepare(out_dir: Path, resume: Resume, identity: RunIdentity, steps: int) -> None:
    """On the main rank: remove what ``never`` replaces, then write the run record (status running)."""
    out_dir = Path(out_dir)
    for name in resume.cleared:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if resume.cleared:
        log.warning("train.resume=never: removed the previous run's %s from %s", ", ".join(resume.cleared), out_dir,
                    extra={"shared": True})
    for events in out_dir.glob("events.out.tfevents.*") if resume.cleared else []:
        events.unlink()
    write_record(out_dir, identity, steps, resume.segments)


def write_record(out_dir: Path, identity: RunIdentity, steps: int, segments: list,
                 finished_step: Optional[int] = None) -> None:
    """Write ``run.json`` atomically (temp name, then rename)."""
    record = {"format": FORMAT, "run_hash": identity.hash, "identity": identity.keys, "about": identity.about,
              "steps": steps, "segments": segments, "finished_step": finished_step}
    write_text_atomic(Path(out_dir) / RUN_FILE, json.dumps(record, indent=1, default=str))
