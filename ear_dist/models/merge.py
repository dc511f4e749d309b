"""``ear-dist merge``: deltas + their base model -> a full model directory to load and share.

The merged directory is the base directory with new weights: every non-weight file of
the base (tokenizer, processor and image-processor configs, generation config, chat
template) is copied, so ``JanusForConditionalGeneration`` and ``JanusProcessor`` load
it as they load the base. The weights are written in ``--dtype`` (``auto``: the dtype
the base checkpoint stores, so a bfloat16 Janus-Pro-7B stays ~15 GB), and a Hugging
Face model card (README.md) says what was erased, how, and with which results. The
directory is assembled under a temp name and renamed, so a crash never leaves a
half-written model that looks complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import torch

from ear_dist.errors import InputError
from ear_dist.models.compose import ComposeSpec, apply_composition, compose_deltas
from ear_dist.models.delta import apply_deltas, compare_changes, delta_metadata
from ear_dist.models.fingerprint import model_fingerprint
from ear_dist.models.janus import JanusBundle, load_janus, save_janus
from ear_dist.paths import finish_dir, output_dir, removed_on_error, temp_sibling

# Files the merge writes itself (weights, config) or replaces (the model card); every
# other file of the base directory is copied as it is.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WRITTEN_BY_MERGE = {"config.json", "README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_dtype(base: str) -> str:
    """The floating dtype most of a base checkpoint's tensors are stored in (float32 for presets)."""
    from safetensors import safe_open

    root = Path(base)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else []
    if not files:
        return "float32"
    counts: dict[str, int] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                name = _SAFETENSORS_DTYPES.get(st.get_slice(key).get_dtype())
                if name is not None:
                    counts[name] = counts.get(name, 0) + 1
    return max(counts, key=counts.get) if counts else "float32"


def non_weight_files(base: Path) -> list[Path]:
    """Files of ``base`` (relative paths) that a merged directory carries over unchanged."""
    out = []
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(base)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue  # hidden: download caches, version control
        if path.name.endswith(WEIGHT_SUFFIXES) or str(rel) in WRITTEN_BY_MERGE:
            continue
        out.append(rel)
    return out


def check_conflicts(bundle: JanusBundle, deltas: Sequence[str], policy: str) -> list[str]:
    """Warnings for delta pairs whose changes to shared tensors oppose (cosine < 0); ``error`` raises."""
    if len(deltas) < 2 or policy == "sum":
        return []
    base_state = {k: v.detach() for k, v in bundle.model.named_parameters()}
    warnings = []
    for pair in compare_changes(base_state, list(deltas)):
        if pair.shared_tensors and pair.cosine < 0:
            msg = (f"{pair.first} and {pair.second} change {pair.shared_tensors} shared tensors in opposite "
                   f"directions (cosine {pair.cosine:.3f}); their sum erases each concept less than alone")
            if policy == "error":
                raise InputError(msg + " (use --conflicts warn or sum to merge anyway)")
            warnings.append(msg)
    return warnings


def merge(base: str, deltas: Sequence[str], out, weights: Optional[Sequence[float]] = None, dtype: str = "auto",
          check_base: bool = True, conflicts: str = "warn", eval_report: Optional[str] = None,
          base_model_id: str = "", overwrite: bool = False, compose: Optional[ComposeSpec] = None) -> dict:
    """Apply ``deltas`` to ``base`` and write the full model, its non-weight files and a model card to ``out``.

    ``out`` follows the output-path rule (``ear_dist.paths``): an existing directory that ``merge`` did not
    write is replaced only with ``overwrite``, and never when it is (or holds) the base or a delta.
    ``compose``: how the deltas combine (``ear_dist.models.compose``; None or ``sum``: summed)."""
    out = merge_output(out, base, deltas, overwrite, eval_report)
    resolved = checkpoint_dtype(base) if dtype == "auto" else dtype
    if resolved not in DTYPES:
        raise InputError(f"--dtype {dtype!r}: expected auto, {', '.join(DTYPES)}")
    report_data = _read_eval_report(eval_report) if eval_report else None
    bundle = load_janus(base, device="cpu", dtype=DTYPES[resolved])
    fingerprint = model_fingerprint(bundle.model)
    warnings = check_conflicts(bundle, deltas, conflicts)
    method = compose.method if compose is not None else "sum"
    if method == "sum":
        applied = apply_deltas(bundle.model, deltas, weights, check_base=check_base)
    else:
        composition = compose_deltas(bundle, deltas, compose.concept_prompts, compose.kept_prompts, method,
                                     compose.energy, weights, check_base, compose.guidance_weight,
                                     density=compose.density, other_concepts=compose.other_concepts,
                                     subspace=compose.subspace)
        applied = apply_composition(bundle.model, composition)

    tmp = temp_sibling(out)
    with removed_on_error(tmp):
        base_dir = Path(base)
        copied = non_weight_files(base_dir) if base_dir.is_dir() else []
        if base_dir.is_dir():
            bundle.model.save_pretrained(tmp, safe_serialization=True)
            for rel in copied:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(base_dir / rel, tmp / rel)
        else:  # a preset has no files: write ours (tokenizer, prompt format)
            save_janus(bundle, tmp)
        metas = [delta_metadata(d) for d in deltas]
        card = model_card(base, base_model_id, fingerprint, deltas, list(weights or [1.0] * len(deltas)), metas,
                          resolved, report_data, has_processor=any((tmp / f).is_file() for f in PROCESSOR_FILES),
                          compose=method)
        card.save(str(tmp / "README.md"))
    finish_dir(tmp, out, "merge")
    return {**applied, "method": method, "dtype": resolved, "warnings": warnings, "out": str(out),
            "copied": len(copied)}


def merge_output(out, base: str, deltas: Sequence[str], overwrite: bool, eval_report: Optional[str] = None) -> Path:
    """``--out`` of ``merge`` checked before any work (both families)."""
    protect = [("base model", base), *[("delta", d) for d in deltas], ("eval report", eval_report)]
    return output_dir(out, "merge", overwrite=overwrite, protect=protect)


def _read_eval_report(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--eval-report: {p} not found (the report.json that `ear-dist eval` writes)")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"--eval-report: {p} is not valid JSON ({e})") from e


# --------------------------------------------------------------------------- the model card

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Base model

{{ base_section }}

## How the concepts were erased

{{ method_section }}

## Deltas merged

{{ deltas_section }}

## Evaluation

{{ eval_section }}

## Use

{{ use_section }}

## Training configuration

{{ config_section }}
"""


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
USE_WITH_PROCESSOR = """```python
import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

model = JanusForConditionalGeneration.from_pretrained("path/to/this/directory")
processor = JanusProcessor.from_pretrained("path/to/this/directory")
messages = [{"role": "user", "content": [{"type": "text", "text": "a photo of a church at night"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, generation_mode="image", return_tensors="pt")
tokens = model.generate(**inputs, generation_mode="image", do_sample=True)
images = model.decode_image_tokens(tokens)
```"""
USE_WITHOUT_PROCESSOR = """The base model carried no processor files ({files}), so this directory has none either
and `JanusProcessor` does not load it; `JanusForConditionalGeneration.from_pretrained` and the tokenizer
do. Sample it with ear-dist, which reads its prompt format:

```bash
ear-dist generate --model path/to/this/directory --prompt "a photo of a church at night" --out images
```"""


def use_section(has_processor: bool) -> str:
    """How to load the merged model: with ``JanusProcessor`` when the base carried its processor files."""
    return USE_WITH_PROCESSOR if has_processor else USE_WITHOUT_PROCESSOR.format(files=", ".join(PROCESSOR_FILES))


def model_card(base: str, base_model_id: str, fingerprint: str, deltas: Sequence[str], weights: Sequence[float],
               metas: Sequence[dict], dtype: str, eval_report: Optional[dict], has_processor: bool = True,
               compose: str = "sum"):
    """A Hugging Face ``ModelCard`` for a merged model: base, concepts, method, settings, configs, eval results."""
    from huggingface_hub import ModelCard, ModelCardData

    concepts = list(dict.fromkeys(c for m in metas for c in m["concepts"]))
    methods = sorted({m["config"].get("erase", {}).get("method", "?") for m in metas})
    data = ModelCardData(
        base_model=base_model_id or None, library_name="transformers", pipeline_tag="text-to-image",
        tags=["ear-dist", "concept-erasure", "janus", *(f"erased-{_tag(c)}" for c in concepts)])
    base_name = base_model_id or Path(base).name or base
    return ModelCard.from_template(
        data, template_str=CARD_TEMPLATE,
        title=f"{base_name} with {', '.join(concepts) or 'no concept'} erased",
        summary=(f"{base_name} fine-tuned by ear-dist ({', '.join(m.upper() for m in methods)}) so that prompts "
                 f"naming {', '.join(repr(c) for c in concepts)} no longer produce the concept. Weights are stored "
                 f"in {dtype}; every other file is the base model's."),
        base_section=_base_section(base, base_model_id, fingerprint, metas),
        method_section=_method_section(metas),
        deltas_section=_deltas_section(deltas, weights, metas, compose),
        eval_section=_eval_section(eval_report),
        config_section=_config_section(deltas, metas),
        use_section=use_section(has_processor),
    )


def _tag(text: str) -> str:
    return "-".join("".join(ch if ch.isalnum() else " " for ch in text.lower()).split())


def _base_section(base: str, base_model_id: str, fingerprint: str, metas: Sequence[dict]) -> str:
    lines = [f"- base model: `{base_model_id}`" if base_model_id else f"- base model: `{base}`",
             f"- base fingerprint (ear-dist, independent of dtype and path): `{fingerprint}`"]
    trained_from = sorted({m["base_model"] for m in metas})
    lines.append(f"- the deltas were trained from: {', '.join(f'`{b}`' for b in trained_from)}")
    return "\n".join(lines)


def _method_section(metas: Sequence[dict]) -> str:
    rows = ["| delta | method | targets | eta | tau | window | update | trainable | optimizer | steps x pairs "
            "| model dtype |", "|" + " --- |" * 11]
    for i, meta in enumerate(metas):
        cfg = meta["config"]
        erase, optim, train = cfg.get("erase", {}), cfg.get("optim", {}), cfg.get("train", {})
        trainable = cfg.get("trainable", {})
        layers = f"layers {trainable['layers']}" if trainable.get("layers") else \
            f"the first {trainable.get('first_k_layers', '?')} layers"
        if trainable.get("skip_first_layers"):
            layers += f" less the first {trainable['skip_first_layers']}"
        modules = ", ".join(trainable.get("patterns") or []) or f"{trainable.get('modules', '?')} of {layers}"
        rows.append(f"| {i + 1} | {erase.get('method', '?')} | {erase.get('target_mode', '?')} | "
                    f"{erase.get('erase_guidance', '?')} | {erase.get('loss_threshold', '?')} | "
                    f"{erase.get('window_len', '?')} ({erase.get('window_order', '?')}) | "
                    f"{erase.get('update_mode', '?')} | {modules} | {optim.get('name', '?')} lr {optim.get('lr', '?')} | "
                    f"{train.get('steps', '?')} x {train.get('pairs_per_step', '?')} | "
                    f"{cfg.get('model', {}).get('dtype', '?')} |")
    return ("EAR: the student, conditioned on the prompt with the concept, is trained toward the frozen "
            "teacher's output on a surrogate prompt pushed away from the concept (erase guidance eta), with "
            "per-token losses summed over windows of image tokens and windows under the threshold tau "
            "skipped.\n\n" + "\n".join(rows))


COMPOSED_AS = {
    "sum": "Merged as `base + sum_i w_i (delta_i - base)`.",
    "project": ("Composed by `project`: each delta's change to a linear weight projected off the principal input "
                "subspace of the other deltas' concept prompts and the kept prompts, then summed "
                "(`base + sum_i w_i (delta_i - base) (I - P_i)`; other tensors summed)."),
    "ties": ("Composed by `ties`: per entry of each linear weight, the deltas' changes trimmed to their largest "
             "magnitudes, the sign elected, the agreeing ones averaged (other tensors summed)."),
}


def _deltas_section(deltas: Sequence[str], weights: Sequence[float], metas: Sequence[dict],
                    compose: str = "sum") -> str:
    rows = ["| delta | weight | concepts | tensors trained |", "| --- | --- | --- | --- |"]
    for d, w, meta in zip(deltas, weights, metas):
        rows.append(f"| `{Path(d).name}` | {w:g} | {', '.join(meta['concepts'])} | {meta['tensors']} |")
    return (COMPOSED_AS[compose] + "\n\n" + "\n".join(rows))


def _eval_section(report: Optional[dict]) -> str:
    if report is None:
        return "No evaluation report was given to `ear-dist merge` (`--eval-report report.json`)."
    rows = report.get("table1")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
        return "From the evaluation report (`table1`):\n\n" + "\n".join(lines)
    leaves = list(_numeric_leaves(report.get("results", report)))
    if not leaves:
        return "The evaluation report holds no numeric results."
    lines = ["| metric | value |", "| --- | --- |"] + [f"| {k} | {_cell(v)} |" for k, v in leaves[:200]]
    return "From the evaluation report:\n\n" + "\n".join(lines)


def _numeric_leaves(node, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix, node


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value).replace("|", "/")


def _config_section(deltas: Sequence[str], metas: Sequence[dict]) -> str:
    import yaml

    parts = []
    for d, meta in zip(deltas, metas):
        parts.append(f"<details><summary>{Path(d).name}</summary>\n\n```yaml\n"
                     f"{yaml.safe_dump(meta['config'], sort_keys=False).rstrip()}\n```\n\n</details>")
    return "\n\n".join(parts)
