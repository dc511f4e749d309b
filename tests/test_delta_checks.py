"""A delta is checked before it is written and before it is applied: no tensors, a tensor that is not floating
point, or a NaN/infinity is refused (``check_finite_delta``), so a diverged run never writes a delta that looks
complete and a merge never writes a NaN model."""

import pytest
import torch

from ear_dist.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILURE
from ear_dist.models.delta import DeltaError, NonFiniteDeltaError, check_finite_delta, save_delta


def _save(path, tensors):
    return save_delta(path, tensors, "fp", "tiny", ["church"], {})


@pytest.mark.parametrize("bad,message", [
    ({}, r"holds no tensors"),
    ({"w": torch.ones(3, dtype=torch.int32)}, r"tensor 'w' is int32; a delta holds floating-point weights"),
    ({"a": torch.ones(4), "w": torch.tensor([1.0, float("nan"), float("inf"), 2.0])},
     r"tensor 'w' holds 2 non-finite values \(NaN or infinity; 2 of the delta's 8 values\)"),
])
def test_a_delta_that_is_no_model_is_neither_written_nor_applied(bad, message, tmp_path):
    path = tmp_path / "delta.safetensors"
    with pytest.raises(NonFiniteDeltaError, match=r"delta\.safetensors: not written: the delta " + message) as e:
        _save(path, bad)
    assert e.value.exit_code == EXIT_RUN_FAILURE
    assert not path.exists() and not list(tmp_path.iterdir())
    with pytest.raises(DeltaError, match=message + r".*; this delta cannot be applied$") as e:
        check_finite_delta(bad, "d.safetensors", writing=False)
    assert e.value.exit_code == EXIT_BAD_INPUT


def test_a_finite_delta_is_written_unchanged(tmp_path):
    from safetensors.torch import load_file

    tensors = {"w": torch.randn(3, 4), "b": torch.randn(4, dtype=torch.bfloat16)}
    check_finite_delta(tensors, "x")
    _save(tmp_path / "d.safetensors", tensors)
    back = load_file(tmp_path / "d.safetensors")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)

