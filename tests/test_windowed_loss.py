"""The reference EAR / S-VARE losses: what a user would see if these broke is a wrong
erasure objective (wrong windows, masked windows still training, NaN steps)."""

import math

import pytest
import torch

from ear_dist.losses.svare import filtered_ce, preservation_kl, svare_loss
from ear_dist.losses.windowed_reference import (
    guidance_combine,
    guided_target,
    per_token_kl,
    per_token_mse,
    window_index,
    windowed_masked_loss,
)


# --------------------------------------------------------------------------- targets


def test_guided_target_and_cfg_follow_their_formulas():
    on_target = torch.tensor([3.0, -1.0, 0.5])
    on_surrogate = torch.tensor([1.0, 2.0, 0.5])
    # s - eta (t - s) with eta = 1 and eta = 2.5, by hand
    assert torch.equal(guided_target(on_target, on_surrogate, 1.0), torch.tensor([-1.0, 5.0, 0.5]))
    assert torch.equal(guided_target(on_target, on_surrogate, 2.5), torch.tensor([-4.0, 9.5, 0.5]))
    # per-row guidance broadcasts
    eta = torch.tensor([[1.0], [0.0]])
    out = guided_target(on_target.expand(2, 3), on_surrogate.expand(2, 3), eta)
    assert torch.equal(out[0], torch.tensor([-1.0, 5.0, 0.5]))
    assert torch.equal(out[1], on_surrogate)
    cond, uncond = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(guidance_combine(cond, uncond, 5.0), torch.tensor([6.0, -4.0]))
    assert torch.equal(guidance_combine(cond, uncond, 1.0), cond)


def test_per_token_mse_and_kl_match_their_definitions():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 8, generator=g)
    target = torch.randn(2, 3, 8, generator=g)
    expected_mse = ((student - target) ** 2).mean(-1)
    torch.testing.assert_close(per_token_mse(student, target), expected_mse, rtol=0, atol=1e-6)
    p = torch.softmax(target, -1)
    expected_kl = (p * (torch.log(p) - torch.log_softmax(student, -1))).sum(-1)
    torch.testing.assert_close(per_token_kl(student, target), expected_kl, rtol=1e-5, atol=1e-6)
    # bf16 inputs are computed in float32
    assert per_token_kl(student.bfloat16(), target.bfloat16()).dtype == torch.float32
    assert per_token_mse(student.bfloat16(), target.bfloat16()).dtype == torch.float32


def test_kl_is_finite_on_extreme_and_infinite_logits():
    student = torch.tensor([[[1e4, -1e4, 0.0, 5.0]]], requires_grad=True)
    target = torch.tensor([[[-1e4, 1e4, float("-inf"), 0.0]]])
    kl = per_token_kl(student, target)
    assert torch.isfinite(kl).all()
    # target puts all mass on code 1; student's log-prob of code 1 is -2e4
    assert kl.item() == pytest.approx(2e4, rel=1e-6)
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()


# --------------------------------------------------------------------------- windows


def test_sequential_windows_with_a_partial_last_window():
    idx = window_index(1, 7, 3)
    assert idx.tolist() == [[0, 0, 0, 1, 1, 1, 2]]
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    out = windowed_masked_loss(per_token, idx, loss_threshold=7.0)
    assert out.window_loss.tolist() == [[6.0, 15.0, 7.0]]
    # 6 < 7 masked; 15 and the partial window's 7 >= 7 kept
    assert out.kept.tolist() == [[False, True, True]]
    assert out.loss.item() == pytest.approx((15.0 + 7.0) / 7)
    assert (out.num_windows, out.num_kept) == (3, 2)


def test_per_row_window_lengths_and_thresholds():
    idx = window_index(2, 5, torch.tensor([2, 3]))
    assert idx.tolist() == [[0, 0, 1, 1, 2], [0, 0, 0, 1, 1]]
    per_token = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 2.0, 2.0]])
    out = windowed_masked_loss(per_token, idx, loss_threshold=torch.tensor([1.5, 2.0]))
    assert out.window_loss.tolist() == [[2.0, 2.0, 1.0], [1.5, 4.0, 0.0]]
    assert out.window_exists.tolist() == [[True, True, True], [True, True, False]]
    # row 0: 2, 2 >= 1.5, 1 < 1.5; row 1: 1.5 < 2, 4 >= 2, window 2 does not exist
    assert out.kept.tolist() == [[True, True, False], [False, True, False]]
    assert out.loss.item() == pytest.approx((2.0 + 2.0 + 4.0) / 10)
    assert (out.num_windows, out.num_kept) == (5, 3)
    # an absent window is never kept, even at threshold 0
    assert windowed_masked_loss(per_token, idx, 0.0).num_kept == 5


def test_explicit_scale_replaces_the_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = windowed_masked_loss(per_token, window_index(1, 4, 2), 0.0, scale=1.0)
    assert out.loss.item() == 10.0


def test_random_order_covers_every_position_once_per_row():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([5, 7, 48])
    idx = window_index(3, 23, lengths, order="random", generator=g)
    for row, window_len in enumerate(lengths.tolist()):
        counts = torch.bincount(idx[row])
        full, rest = divmod(23, window_len)
        expected = [window_len] * full + ([rest] if rest else [])
        # every position is in exactly one window, and windows have the sequential sizes
        assert counts.tolist() == expected
    # it is a shuffle, not generation order, and the generator makes it reproducible
    assert not torch.equal(idx[0], window_index(1, 23, 5)[0])
    again = window_index(3, 23, lengths, order="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, again)


def test_window_index_rejects_bad_lengths_and_orders():
    with pytest.raises(ValueError, match="row 1 has window length 0"):
        window_index(2, 8, torch.tensor([4, 0]))
    with pytest.raises(ValueError, match="one length per row"):
        window_index(3, 8, torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="sequential, random"):
        window_index(1, 8, 4, order="zigzag")


# --------------------------------------------------------------------------- gradients


def _student_and_target(batch=2, tokens=7, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, tokens, width, generator=g).requires_grad_(True)
    target = torch.randn(batch, tokens, width, generator=g)
    return student, target


def test_masked_windows_get_exactly_zero_gradient():
    student, target = _student_and_target()
    idx = window_index(2, 7, 3)
    per_token = per_token_mse(student, target)
    sums = windowed_masked_loss(per_token, idx, 0.0).window_loss
    # a threshold between the smallest and largest window sum of each row
    threshold = (sums[:, :3].min(1).values + sums[:, :3].max(1).values) / 2
    out = windowed_masked_loss(per_token, idx, threshold)
    assert 0 < out.num_kept < out.num_windows
    out.loss.backward()
    token_kept = out.kept.gather(1, idx)
    grad_norm = student.grad.abs().sum(-1)
    assert (grad_norm[~token_kept] == 0).all()
    assert (grad_norm[token_kept] > 0).all()


def test_all_masked_gives_zero_loss_and_zero_gradient():
    student, target = _student_and_target()
    logits_student = student.clone().detach().requires_grad_(True)
    for per_token, leaf in (
        (per_token_mse(student, target), student),
        (per_token_kl(logits_student, target), logits_student),
    ):
        out = windowed_masked_loss(per_token, window_index(2, 7, 3), loss_threshold=1e9)
        assert out.num_kept == 0
        assert out.loss.item() == 0.0
        out.loss.backward()
        assert torch.isfinite(leaf.grad).all()
        assert (leaf.grad == 0).all()


def test_masked_window_with_nonfinite_loss_does_not_poison_the_step():
    per_token = torch.tensor([[1.0, 2.0, float("nan"), 1.0]], requires_grad=True)
    out = windowed_masked_loss(per_token, window_index(1, 4, 2), 0.5)
    # the NaN window fails the >= comparison and is masked
    assert out.kept.tolist() == [[True, False]]
    assert out.loss.item() == pytest.approx(3.0 / 4)
    out.loss.backward()
    assert per_token.grad.tolist() == [[0.25, 0.25, 0.0, 0.0]]


@pytest.mark.parametrize("mode", ["hidden", "logit"])
def test_target_prompt_equal_to_surrogate_gives_zero_loss(mode):
    # student == teacher and c_t == c_s: every teacher output is the student's
    student, _ = _student_and_target(width=16)
    on_target = student.detach().clone()
    on_surrogate = student.detach().clone()
    target = guided_target(on_target, on_surrogate, 1.0)
    per_token = per_token_mse(student, target) if mode == "hidden" else per_token_kl(student, target)
    out = windowed_masked_loss(per_token, window_index(2, 7, 3), loss_threshold=0.0)
    assert out.loss.abs().item() < 1e-6
    assert out.window_loss.abs().max().item() < 1e-5


def test_threshold_comparison_is_on_detached_values_and_loss_is_differentiable():
    student, target = _student_and_target()
    out = windowed_masked_loss(per_token_mse(student, target), window_index(2, 7, 7), 0.0)
    assert not out.kept.requires_grad and not out.window_loss.requires_grad
    assert out.loss.requires_grad


# --------------------------------------------------------------------------- S-VARE


def _logits_with_label_probs(probs):
    """Two-code logits whose softmax puts probability ``p`` on code 1."""
    p = torch.tensor(probs, dtype=torch.float64)
    logits = torch.stack([torch.zeros_like(p), torch.log(p / (1 - p))], dim=-1)
    return logits.float().unsqueeze(0)


def test_filtered_ce_counts_only_tokens_under_the_probability_cap():
    probs = [0.2, 0.49, 0.5, 0.9]
    logits = _logits_with_label_probs(probs).requires_grad_(True)
    labels = torch.ones(1, 4, dtype=torch.long)
    loss, counted = filtered_ce(logits, labels, label_prob_max=0.5)
    assert counted == 2
    assert loss.item() == pytest.approx((-math.log(0.2) - math.log(0.49)) / 4, rel=1e-5)
    loss.backward()
    grad_norm = logits.grad.abs().sum(-1)[0]
    assert (grad_norm[:2] > 0).all()
    assert (grad_norm[2:] == 0).all()
    # ignored labels never count
    labels_ignored = torch.tensor([[-100, 1, 1, 1]])
    assert filtered_ce(logits.detach(), labels_ignored)[1] == 1


def test_filtered_ce_names_a_bad_label():
    with pytest.raises(ValueError, match="row 0, position 2 holds 7"):
        filtered_ce(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 7]]))


def test_svare_loss_combines_its_parts():
    g = torch.Generator().manual_seed(1)
    student_t = torch.randn(2, 5, 6, generator=g)
    student_s = torch.randn(2, 5, 6, generator=g)
    teacher_s = torch.randn(2, 5, 6, generator=g)
    labels = torch.randint(0, 6, (2, 5), generator=g)
    out = svare_loss(student_t, labels, student_s, teacher_s, preserve_weight=0.5)
    ce, counted = filtered_ce(student_t, labels)
    assert out.num_counted == counted
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.preserve, per_token_kl(student_s, teacher_s).mean())
    torch.testing.assert_close(out.loss, ce + 0.5 * out.preserve)
    assert preservation_kl(teacher_s, teacher_s).abs().item() < 1e-6


def test_svare_code_distance_filter_against_a_reference_written_out():
    """A token is unsafe when the student's likeliest code lies at least half the mean code-to-code distance
    from the label's code (the codebook analog of a quarter of the bits disagreeing)."""
    from ear_dist.losses.svare import code_distance_filter

    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    mean = sum(float((codebook[i] - codebook[j]).norm()) for i, j in pairs) / len(pairs)
    logits = torch.full((1, 4, 4), -5.0)
    predictions, labels = [0, 1, 0, 2], torch.tensor([[0, 0, 3, 1]])
    for t, code in enumerate(predictions):
        logits[0, t, code] = 5.0
    got = code_distance_filter(logits, labels, codebook, min_distance=0.5)
    want = [float((codebook[p] - codebook[int(l)]).norm()) / mean >= 0.5 for p, l in zip(predictions, labels[0])]
    assert got[0].tolist() == want == [False, False, True, False]
    loss, counted = filtered_ce(logits, labels, unsafe=got)
    assert counted == 1
    manual = -torch.log_softmax(logits[0, 2], -1)[3] / 4
    torch.testing.assert_close(loss, manual)
