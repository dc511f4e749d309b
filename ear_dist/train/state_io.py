"""Nested Python state (dicts, lists, tuples, numbers, strings, tensors) as safetensors + JSON.

Optimizer and RNG states are nested structures around tensors. ``torch.save`` would
pickle them, and loading a pickle can run any code the file carries, so checkpoints
store them in two plain files instead: the tensors in ``NAME.safetensors`` and the
structure in ``NAME.json``, where a tensor is ``{"__tensor__": key}``, a tuple
``{"__tuple__": [...]}`` and a dict with keys other than strings (an optimizer's
parameter ids) ``{"__items__": [[key, value], ...]}``. Loading gives back the same
types, so ``load_state_dict`` restores a bit-identical state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import torch

from ear_dist.errors import InputError
from ear_dist.storage import save_safetensors, write_text_atomic

TENSOR, TUPLE, ITEMS = "__tensor__", "__tuple__", "__items__"


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {TENSOR: key}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {TENSOR, TUPLE, ITEMS} & set(value):
            return {k: _encode(v, tensors) for k, v in value.items()}
        return {ITEMS: [[_encode(k, tensors), _encode(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} as safetensors + JSON: {value!r}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if TENSOR in value:
            return tensors[value[TENSOR]]
        if TUPLE in value:
            return tuple(_decode(v, tensors) for v in value[TUPLE])
        if ITEMS in value:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value[ITEMS]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


def save_tree(stem: Union[str, Path], tree: Any) -> None:
    """Write ``tree`` as ``STEM.safetensors`` + ``STEM.json`` (each atomically; a failure is a StorageError)."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors)
    save_safetensors(stem.with_suffix(".safetensors"), tensors)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(structure))


def load_tree(stem: Union[str, Path]) -> Any:
    """Read what ``save_tree`` wrote; a missing or unreadable part is an InputError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    stem = Path(stem)
    try:
        tensors = load_file(str(stem.with_suffix(".safetensors")))
        structure = json.loads(stem.with_suffix(".json").read_text())
        return _decode(structure, tensors)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise InputError(f"{stem}.(safetensors|json): unreadable checkpoint state: {e}") from None

