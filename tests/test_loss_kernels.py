"""The fused Triton loss kernels give the reference's numbers (values and gradients).

They run on the CPU under the Triton interpreter; the environment variable must be
set before triton creates the kernels, hence before the imports below. What a user
would notice if these broke: a GPU run that trains a different objective (or masked
windows that still move the weights) than the CPU reference it was validated on.
"""

import importlib
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import ear_dist.kernels.windowed_fused as kernels  # noqa: E402
from ear_dist.train.step_loss import resolve_backend, windowed_loss  # noqa: E402
from ear_dist.losses.windowed_reference import (  # noqa: E402
    guidance_combine,
    guided_target,
    per_token_kl,
    per_token_mse,
    window_index,
    windowed_masked_loss,
)

if type(kernels._kl_loss_kernel).__name__ != "InterpretedFunction":
    # another test module imported the kernels before the interpreter was switched on
    kernels = importlib.reload(kernels)

BATCH, TOKENS, VOCAB, WIDTH = 2, 13, 64, 32
MIXED_WINDOWS = torch.tensor([3, 5])  # per-row window lengths; 13 tokens -> partial last windows


def _inputs(mode, dtype=torch.float32, seed=0, with_uncond=False, width=None, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    width = width or (VOCAB if mode == "logit" else WIDTH)
    shape = (BATCH, TOKENS, width)
    tensors = [spread * torch.randn(shape, generator=g) for _ in range(4 if with_uncond else 3)]
    tensors = [t.to(dtype) for t in tensors]
    student, on_target, on_surrogate = tensors[:3]
    uncond = tensors[3] if with_uncond else None
    return student, on_target, on_surrogate, uncond


def _run(backend, mode, student, on_target, on_surrogate, idx, threshold, eta=1.0, uncond=None,
         guidance_weight=0.0, block_size=None, loss_multiplier=1.0):
    leaf = student.clone().requires_grad_(True)
    if backend == "triton" and block_size is not None:
        out = kernels.fused_windowed_loss(
            mode, leaf, on_target, on_surrogate, idx, threshold, eta,
            uncond=uncond, guidance_weight=guidance_weight, block_size=block_size,
        )
    else:
        out = windowed_loss(mode, leaf, on_target, on_surrogate, idx, threshold, eta,
                            uncond=uncond, guidance_weight=guidance_weight, backend=backend)
    (out.loss * loss_multiplier).backward()
    return out, leaf.grad


def _middle_threshold(mode, student, on_target, on_surrogate, idx, **kw):
    """A per-row threshold between each row's smallest and largest window sum."""
    ref = windowed_loss(mode, student, on_target, on_surrogate, idx, 0.0, 1.0, backend="torch", **kw)
    sums = ref.window_loss.masked_fill(~ref.window_exists, float("nan"))
    low = torch.stack([row[~row.isnan()].min() for row in sums])
    high = torch.stack([row[~row.isnan()].max() for row in sums])
    return (low + high) / 2


def _assert_same(ref, ref_grad, fused, fused_grad, rtol=1e-5, atol=1e-5, grad_atol=1e-7):
    torch.testing.assert_close(fused.per_token, ref.per_token, rtol=rtol, atol=atol)
    torch.testing.assert_close(fused.window_loss, ref.window_loss, rtol=rtol, atol=atol)
    assert torch.equal(fused.kept, ref.kept)
    assert torch.equal(fused.window_exists, ref.window_exists)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(fused_grad, ref_grad, rtol=rtol, atol=grad_atol)


# --------------------------------------------------------------------------- float32 parity


@pytest.mark.parametrize("with_uncond", [False, True], ids=["no-cfg", "teacher-cfg"])
def test_logit_mode_matches_reference_fp32(with_uncond):
    student, on_target, on_surrogate, uncond = _inputs("logit", with_uncond=with_uncond)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    kw = dict(uncond=uncond, guidance_weight=3.0 if with_uncond else 0.0)
    threshold = _middle_threshold("logit", student, on_target, on_surrogate, idx, **kw)
    ref, ref_grad = _run("torch", "logit", student, on_target, on_surrogate, idx, threshold, **kw)
    fused, fused_grad = _run("triton", "logit", student, on_target, on_surrogate, idx, threshold, **kw)
    assert 0 < fused.num_kept < fused.num_windows  # some windows masked, some kept
    _assert_same(ref, ref_grad, fused, fused_grad)


def test_teacher_cfg_is_applied_to_both_prompts_before_the_guidance():
    student, on_target, on_surrogate, uncond = _inputs("logit", with_uncond=True)
    idx = window_index(BATCH, TOKENS, 4)
    fused = windowed_loss("logit", student, on_target, on_surrogate, idx, 0.0, 1.5,
                          uncond=uncond, guidance_weight=5.0, backend="triton")
    written_out = guided_target(guidance_combine(on_target, uncond, 5.0), guidance_combine(on_surrogate, uncond, 5.0), 1.5)
    torch.testing.assert_close(fused.per_token, per_token_kl(student, written_out), rtol=1e-5, atol=1e-5)


def test_logit_mode_chunks_over_a_vocabulary_that_is_not_a_multiple_of_the_block():
    student, on_target, on_surrogate, uncond = _inputs("logit", width=50, with_uncond=True)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    kw = dict(uncond=uncond, guidance_weight=2.0)
    threshold = _middle_threshold("logit", student, on_target, on_surrogate, idx, **kw)
    ref, ref_grad = _run("torch", "logit", student, on_target, on_surrogate, idx, threshold, **kw)
    fused, fused_grad = _run("triton", "logit", student, on_target, on_surrogate, idx, threshold,
                             block_size=16, **kw)
    _assert_same(ref, ref_grad, fused, fused_grad)


def test_hidden_mode_matches_reference_fp32_with_per_row_guidance():
    student, on_target, on_surrogate, _ = _inputs("hidden", width=40)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    eta = torch.tensor([1.0, 0.5])
    ref0 = windowed_loss("hidden", student, on_target, on_surrogate, idx, 0.0, eta, backend="torch")
    threshold = ref0.window_loss[:, :3].median(dim=1).values
    ref, ref_grad = _run("torch", "hidden", student, on_target, on_surrogate, idx, threshold, eta=eta)
    fused, fused_grad = _run("triton", "hidden", student, on_target, on_surrogate, idx, threshold, eta=eta,
                             block_size=16)
    assert 0 < fused.num_kept < fused.num_windows
    _assert_same(ref, ref_grad, fused, fused_grad)


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_masked_windows_get_exactly_zero_gradient_and_kept_ones_do_not(mode):
    student, on_target, on_surrogate, _ = _inputs(mode, seed=4)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    threshold = _middle_threshold(mode, student, on_target, on_surrogate, idx)
    fused, grad = _run("triton", mode, student, on_target, on_surrogate, idx, threshold)
    token_kept = fused.kept.gather(1, idx)
    assert token_kept.any() and not token_kept.all()
    assert (grad[~token_kept] == 0).all()
    assert (grad[token_kept].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_tokens_outside_every_window_add_nothing_and_get_zero_gradient(mode):
    """Window id -1 (the per-window update's other tokens, the ESD baseline's unpicked ones)."""
    student, on_target, on_surrogate, uncond = _inputs(mode, seed=14, with_uncond=mode == "logit")
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    outside = torch.rand(BATCH, TOKENS, generator=torch.Generator().manual_seed(3)) < 0.4
    idx = torch.where(outside, torch.full_like(idx, -1), idx)
    kw = dict(uncond=uncond, guidance_weight=2.0) if mode == "logit" else {}
    ref, ref_grad = _run("torch", mode, student, on_target, on_surrogate, idx, 0.0, **kw)
    fused, fused_grad = _run("triton", mode, student, on_target, on_surrogate, idx, 0.0, **kw)
    _assert_same(ref, ref_grad, fused, fused_grad)
    assert (fused_grad[outside] == 0).all() and (fused_grad[~outside].abs().sum(-1) > 0).all()
    inside_sum = torch.where(outside, 0.0, ref.per_token).sum()
    torch.testing.assert_close(ref.window_loss.sum(), inside_sum)


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_all_masked_and_none_masked(mode):
    student, on_target, on_surrogate, _ = _inputs(mode, seed=5)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    fused, grad = _run("triton", mode, student, on_target, on_surrogate, idx, 1e9)
    assert fused.num_kept == 0 and fused.loss.item() == 0.0
    assert (grad == 0).all()
    ref, ref_grad = _run("torch", mode, student, on_target, on_surrogate, idx, 0.0)
    fused, fused_grad = _run("triton", mode, student, on_target, on_surrogate, idx, 0.0)
    assert torch.equal(fused.kept, fused.window_exists) and fused.num_kept == fused.num_windows
    _assert_same(ref, ref_grad, fused, fused_grad)


def test_random_window_order_and_an_outer_loss_multiplier():
    student, on_target, on_surrogate, _ = _inputs("logit", seed=6)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS, order="random", generator=torch.Generator().manual_seed(0))
    threshold = _middle_threshold("logit", student, on_target, on_surrogate, idx)
    # backward receives 2.5 instead of 1: the stored gradient is scaled by it
    ref, ref_grad = _run("torch", "logit", student, on_target, on_surrogate, idx, threshold, loss_multiplier=2.5)
    fused, fused_grad = _run("triton", "logit", student, on_target, on_surrogate, idx, threshold, loss_multiplier=2.5)
    _assert_same(ref, ref_grad, fused, fused_grad)


def test_student_without_grad_gets_the_same_loss():
    student, on_target, on_surrogate, _ = _inputs("logit", seed=7)
    idx = window_index(BATCH, TOKENS, 4)
    ref = windowed_loss("logit", student, on_target, on_surrogate, idx, 0.1, 1.0, backend="torch")
    fused = windowed_loss("logit", student, on_target, on_surrogate, idx, 0.1, 1.0, backend="triton")
    assert not fused.loss.requires_grad
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- extremes and bf16


def test_extreme_logits_stay_finite_and_match():
    student, on_target, on_surrogate, uncond = _inputs("logit", seed=8, with_uncond=True)
    g = torch.Generator().manual_seed(9)
    # entries of +-1e4 scattered over every tensor
    for t in (student, on_target, on_surrogate, uncond):
        spikes = torch.rand(t.shape, generator=g) < 0.05
        signs = torch.where(torch.rand(t.shape, generator=g) < 0.5, -1e4, 1e4)
        t[spikes] = signs[spikes]
    student[0, 0] = 1e4  # a row of ties at the extreme
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    kw = dict(uncond=uncond, guidance_weight=1.5)
    ref, ref_grad = _run("torch", "logit", student, on_target, on_surrogate, idx, 100.0, **kw)
    fused, fused_grad = _run("triton", "logit", student, on_target, on_surrogate, idx, 100.0, **kw)
    for t in (fused.per_token, fused.window_loss, fused.loss, fused_grad):
        assert torch.isfinite(t).all()
    assert fused.per_token.max() > 1e3  # the extremes really are in play
    assert torch.equal(fused.kept, ref.kept)
    # Guided logits reach ~5e4, where float32 spacing is ~4e-3: both float32 paths carry
    # errors of that size relative to float64, so compare each with float64 and require
    # the kernel to be no less accurate than the reference (within a factor 2).
    f64 = lambda t: t.double()  # noqa: E731
    truth, truth_grad = _run("torch", "logit", f64(student), f64(on_target), f64(on_surrogate), idx, 100.0,
                             uncond=f64(uncond), guidance_weight=1.5)
    for fused_value, ref_value, true_value in (
        (fused.per_token, ref.per_token, truth.per_token),
        (fused_grad, ref_grad, truth_grad),
    ):
        fused_err = (fused_value.double() - true_value).abs().max().item()
        ref_err = (ref_value.double() - true_value).abs().max().item()
        assert fused_err <= 2 * ref_err + 1e-6, (fused_err, ref_err)
    torch.testing.assert_close(fused.per_token, ref.per_token, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_bf16_inputs(mode):
    """bf16 tolerance: the kernels load bf16 and compute in float32, so per-token and
    window losses match the float32 reference on the same (upcast) values to 1e-5
    relative; gradients are stored in bf16, so they match to bf16 rounding (rtol 2^-7).
    Against the all-bf16 reference (guided target rounded to bf16 before the float32
    loss) the losses agree to 2e-2 relative."""
    student, on_target, on_surrogate, uncond = _inputs(mode, dtype=torch.bfloat16, seed=10,
                                                       with_uncond=(mode == "logit"))
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    kw = dict(uncond=uncond, guidance_weight=2.0) if mode == "logit" else {}
    up = lambda t: None if t is None else t.float()  # noqa: E731
    kw32 = dict(uncond=up(uncond), guidance_weight=2.0) if mode == "logit" else {}
    threshold = _middle_threshold(mode, up(student), up(on_target), up(on_surrogate), idx, **kw32)
    ref32, ref32_grad = _run("torch", mode, up(student), up(on_target), up(on_surrogate), idx, threshold, **kw32)
    fused, fused_grad = _run("triton", mode, student, on_target, on_surrogate, idx, threshold, **kw)
    assert fused_grad.dtype == torch.bfloat16
    torch.testing.assert_close(fused.per_token, ref32.per_token, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.kept, ref32.kept)
    torch.testing.assert_close(fused.loss, ref32.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad.float(), ref32_grad, rtol=2**-7, atol=1e-6)
    ref16 = windowed_loss(mode, student, on_target, on_surrogate, idx, threshold, 1.0, backend="torch", **kw)
    torch.testing.assert_close(fused.per_token, ref16.per_token, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- dispatch


def test_backend_resolution(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # interpreter is on here
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="erase.loss_backend: 'cuda'"):
        resolve_backend("cuda", torch.device("cpu"))


def test_dispatch_rejects_mismatched_shapes():
    student, on_target, on_surrogate, _ = _inputs("hidden")
    idx = window_index(BATCH, TOKENS, 4)
    with pytest.raises(ValueError, match="on_surrogate"):
        windowed_loss("hidden", student, on_target, on_surrogate[:, :5], idx, 0.0, 1.0, backend="torch")
    with pytest.raises(ValueError, match="window_index"):
        windowed_loss("hidden", student, on_target, on_surrogate, idx[:, :5], 0.0, 1.0, backend="triton")
    with pytest.raises(ValueError, match="only in logit mode"):
        windowed_loss("hidden", student, on_target, on_surrogate, idx, 0.0, 1.0, uncond=student, backend="torch")


def test_a_second_backward_through_the_same_graph_is_refused():
    student, on_target, on_surrogate, _ = _inputs("hidden", seed=11)
    leaf = student.clone().requires_grad_(True)
    out = windowed_loss("hidden", leaf, on_target, on_surrogate, window_index(BATCH, TOKENS, 4), 0.0, 1.0,
                        backend="triton")
    (3.0 * out.loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.loss.backward()


# --------------------------------------------------------------------------- GPU compilation

_COMPILE_FOR_HOPPER = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import ear_dist.kernels.windowed_fused as K

target = GPUTarget("cuda", 90, 32)
ptr, f32 = "*bf16", "*fp32"
logits = dict(student_ptr=ptr, target_ptr=ptr, surrogate_ptr=ptr, uncond_ptr=ptr, eta_ptr=f32)
hidden = dict(student_ptr=ptr, target_ptr=ptr, surrogate_ptr=ptr, eta_ptr=f32)
cases = [
    (K._kl_loss_kernel, dict(logits, loss_ptr=f32, lse_student_ptr=f32, lse_target_ptr=f32, guidance_weight="fp32",
                             num_tokens="i32", vocab="i32", HAS_UNCOND="constexpr", BLOCK="constexpr"),
     dict(HAS_UNCOND=True, BLOCK=4096)),
    (K._kl_grad_kernel, dict(logits, lse_student_ptr=f32, lse_target_ptr=f32, coef_ptr=f32, grad_ptr=ptr,
                             guidance_weight="fp32", num_tokens="i32", vocab="i32", HAS_UNCOND="constexpr",
                             BLOCK="constexpr"),
     dict(HAS_UNCOND=False, BLOCK=4096)),
    (K._mse_loss_kernel, dict(hidden, loss_ptr=f32, num_tokens="i32", width="i32", BLOCK="constexpr"),
     dict(BLOCK=4096)),
    (K._mse_grad_kernel, dict(hidden, coef_ptr=f32, grad_ptr=ptr, num_tokens="i32", width="i32",
                              BLOCK="constexpr"), dict(BLOCK=4096)),
    (K._scale_inplace_kernel, dict(grad_ptr=ptr, factor_ptr=f32, numel="i32", BLOCK="constexpr"),
     dict(BLOCK=4096)),
]
for fn, signature, constexprs in cases:
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                              options={"num_warps": 8})
    assert compiled.asm["cubin"], fn.__name__
    print("compiled", fn.__name__)
"""


def test_kernels_compile_for_an_h100_without_a_gpu():
    """The interpreter accepts code the GPU compiler rejects (loop-carried types, scalar
    branches); compiling ahead of time to sm_90 machine code with the ptxas that ships in
    the triton wheel catches that here, without a GPU."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled ") == 5


def test_no_gradient_pass_under_no_grad(monkeypatch):
    student, on_target, on_surrogate, _ = _inputs("logit", seed=12)
    leaf = student.clone().requires_grad_(True)
    launched = []
    real_grad_kernel = kernels._kl_grad_kernel
    monkeypatch.setattr(kernels, "_kl_grad_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (launched.append(grid), real_grad_kernel[grid])[1]})())
    idx = window_index(BATCH, TOKENS, 4)
    with torch.no_grad():
        out = windowed_loss("logit", leaf, on_target, on_surrogate, idx, 0.0, 1.0, backend="triton")
    assert not out.loss.requires_grad and launched == []
    windowed_loss("logit", leaf, on_target, on_surrogate, idx, 0.0, 1.0, backend="triton")
    assert len(launched) == 1


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_a_prebuilt_target_gives_the_reference_loss(mode):
    student, on_target, on_surrogate, _ = _inputs(mode, seed=13)
    target = guided_target(on_target, on_surrogate, 1.0)
    idx = window_index(BATCH, TOKENS, MIXED_WINDOWS)
    leaf = student.clone().requires_grad_(True)
    per_token = per_token_mse(leaf, target) if mode == "hidden" else per_token_kl(leaf, target)
    ref = windowed_masked_loss(per_token, idx, 0.3)
    ref.loss.backward()
    fused, fused_grad = _run("triton", mode, student, target, target, idx, 0.3, eta=0.0)
    _assert_same(ref, leaf.grad, fused, fused_grad)


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_erasure_step_with_the_triton_backend_trains_the_same_student(mode):
    """The step a user runs, with erase.loss_backend=triton, against the torch backend."""
    from ear_dist.config import EraseConfig, TrainableConfig
    from ear_dist.models.janus import build_preset
    from ear_dist.teacher.colocated import ColocatedTeacher
    from ear_dist.train.step import ErasureStep, PairBatch, Updater
    from ear_dist.train.student import make_student
    from ear_dist.train.trainable import select_trainable_names

    bundle = build_preset("tiny", seed=0)
    names = select_trainable_names(bundle.model, TrainableConfig(first_k_layers=2))
    teacher = ColocatedTeacher(bundle)
    tokens = torch.randint(0, bundle.codebook_size, (2, bundle.num_image_tokens),
                           generator=torch.Generator().manual_seed(0))
    batch = PairBatch(["a photo of a church", "a church at night"], ["a photo of a barn", "a castle at night"],
                      ["church", "church"], [0, 1], tokens)
    trained = {}
    for backend in ("torch", "triton"):
        student = make_student(bundle.model, names)
        opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
        # a strong guidance keeps the KL away from 0, where fp32 cancellation dominates
        cfg = EraseConfig(target_mode=mode, update_mode="sequence", window_len=5, loss_threshold=0.0,
                          loss_backend=backend, erase_guidance=50.0)
        res = ErasureStep(student, bundle, teacher, cfg, Updater(opt))(batch)
        assert res.optimizer_steps == 1 and res.windows_total == 8
        params = dict(student.named_parameters())
        trained[backend] = ({n: params[n].detach().clone() for n in names}, res.loss)
    assert trained["torch"][1] == pytest.approx(trained["triton"][1], rel=1e-5)
    for n in names:
        torch.testing.assert_close(trained["triton"][0][n], trained["torch"][0][n], rtol=1e-5, atol=1e-6)
