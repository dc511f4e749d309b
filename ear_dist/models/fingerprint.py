"""The identity of a base model's weights, whatever its family: deltas, offline teacher
directories, merges, evaluation plans and run directories record it and check it."""

from __future__ import annotations

import hashlib

import torch


# Fingerprint samples per tensor: enough that a change to any trained tensor shows, few
# enough that Janus-Pro-7B (1,018 tensors) is hashed in about a second at every run start.
FINGERPRINT_SAMPLES = 256
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_MAX = 65504.0


def model_fingerprint(model: torch.nn.Module) -> str:
    """The identity of a base model's weights, the same however and wherever it was loaded.

    Hashes every parameter's name and shape and an evenly strided sample of its values,
    rounded to bfloat16: a float32 and a bfloat16 load of the same checkpoint round to the
    same bits. Values outside float16's normal range are clamped (tiny ones to 0), so a
    float16 load of a bfloat16 or float16 checkpoint (the released Janus-Pro is bfloat16)
    agrees too; a float16 load of a float32 checkpoint rounds twice and may not.

    The config is left out: its serialisation carries the load path, the dtype and the
    transformers version, none of which change the model a delta was trained from.
    Deltas, offline teacher directories and merges record and check it.
    """
    h = hashlib.sha256()
    samples = []
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(f"{name}:{tuple(param.shape)};".encode())
        flat = param.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        samples.append(flat[::step][:FINGERPRINT_SAMPLES].to(torch.float32))
    if samples:  # one conversion over all samples: ~1000 tensors at 7B cost one small copy each
        values = torch.cat([s.to("cpu") for s in samples]).to(torch.bfloat16).float()
        values = torch.where(values.abs() < _FP16_MIN_NORMAL, torch.zeros_like(values), values)
        h.update(values.clamp(-_FP16_MAX, _FP16_MAX).numpy().tobytes())
    return h.hexdigest()[:16]
