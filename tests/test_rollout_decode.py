"""The lean decode path of rollouts: the same tokens as the eager loop, on fixed buffers, compiled or captured.

What a user would notice: images that change when they switch ``rollout.decode`` on
(greedy must give the same tokens), a seed that gives another image in another batch,
a sampler whose draws do not follow the model's distribution, or a CUDA-graph setting
on a CPU model that fails deep inside instead of saying what to set.
"""

import pytest
import torch

from ear_dist.config import load_config
from ear_dist.models.janus.decode import _DECODERS, counter_uniform, gumbel_sample, lean_rollout_ids, resolve_decode
from ear_dist.models.janus import build_preset
from ear_dist.models.janus.presets import tiny_config
from ear_dist.models.janus.rollout import rollout_ids
from ear_dist.teacher.base import TeacherRequest, TeacherSettings
from ear_dist.teacher.colocated import ColocatedTeacher

PROMPTS = ["a photo of a church", "a red barn in a snowy field at night", "castle"]


def _lean(bundle, ids, mask, mode="uncaptured", guidance_weight=5.0, temperature=1.0, top_k=0, greedy=True,
          seeds=None):
    return lean_rollout_ids(bundle, ids, mask, mode, guidance_weight, temperature, top_k, greedy, seeds,
                            bundle.num_image_tokens)


@pytest.mark.parametrize("guidance_weight", [5.0, 1.0])
def test_the_replayed_step_gives_the_eager_loops_greedy_tokens(tiny_bundle, guidance_weight):
    """The buffers and step a CUDA graph replays, run as they are: left-padded prompts, with and without CFG."""
    ids, mask = tiny_bundle.encode_prompts(PROMPTS)
    assert not bool(mask.all()), "the prompts should need left padding"
    want = rollout_ids(tiny_bundle, ids, mask, guidance_weight, greedy=True)
    assert torch.equal(_lean(tiny_bundle, ids, mask, guidance_weight=guidance_weight), want)
    # a second batch of the same shape reuses the decoder (and its static cache) and starts clean
    decoder = _DECODERS[tiny_bundle.model]
    assert torch.equal(_lean(tiny_bundle, ids, mask, guidance_weight=guidance_weight), want)
    assert _DECODERS[tiny_bundle.model] is decoder
    # another shape replaces it
    ids2, mask2 = tiny_bundle.encode_prompts(PROMPTS[:2])
    want2 = rollout_ids(tiny_bundle, ids2, mask2, guidance_weight, greedy=True)
    assert torch.equal(_lean(tiny_bundle, ids2, mask2, guidance_weight=guidance_weight), want2)
    assert _DECODERS[tiny_bundle.model] is not decoder


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_loops_greedy_tokens():
    """``rollout.decode=compiled`` (torch.compile of the whole token step, no graph break) on the CPU."""
    bundle = build_preset("tiny", config=tiny_config(num_layers=2), seed=0)
    ids, mask = bundle.encode_prompts(PROMPTS)
    want = rollout_ids(bundle, ids, mask, 5.0, greedy=True)
    got = rollout_ids(bundle, ids, mask, 5.0, greedy=True, decode="compiled")
    assert torch.equal(got, want)
    assert _DECODERS[bundle.model].key.mode == "compiled"


def test_a_seed_gives_the_same_image_in_any_batch_and_run(tiny_bundle):
    ids, mask = tiny_bundle.encode_prompts(PROMPTS)
    kwargs = dict(greedy=False, temperature=1.0, top_k=20)
    together = _lean(tiny_bundle, ids, mask, seeds=[11, 12, 13], **kwargs)
    alone = _lean(tiny_bundle, *tiny_bundle.encode_prompts(PROMPTS[1:2]), seeds=[12], **kwargs)
    assert torch.equal(together[1], alone[0])
    assert torch.equal(_lean(tiny_bundle, ids, mask, seeds=[11, 12, 13], **kwargs), together)
    other = _lean(tiny_bundle, ids, mask, seeds=[21, 22, 23], **kwargs)
    assert not torch.equal(other, together)
    # top-k 1 is greedy, whatever the noise
    greedy = _lean(tiny_bundle, ids, mask)
    assert torch.equal(_lean(tiny_bundle, ids, mask, seeds=[5, 6, 7], greedy=False, top_k=1), greedy)


def test_counter_noise_is_uniform_and_gumbel_max_draws_follow_softmax():
    codes = torch.arange(4096)
    u = counter_uniform(torch.tensor([3, 4]), torch.tensor([7]), codes)
    assert u.shape == (2, 4096) and float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert float((u[0] - u[1]).abs().mean()) > 0.2  # seeds draw independent noise

    # 20,000 draws over 6 codes (one seed per draw): frequencies within 4 standard errors of the probabilities
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5])
    n = 20000
    draws = gumbel_sample(logits.expand(n, -1), torch.arange(n), torch.tensor([0]), torch.arange(6),
                          temperature=0.7, top_k=0, greedy=False)
    freq = torch.bincount(draws, minlength=6).double() / n
    probs = torch.softmax(logits.double() / 0.7, -1)
    assert ((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all(), (freq, probs)
    top2 = gumbel_sample(logits.expand(n, -1), torch.arange(n), torch.tensor([0]), torch.arange(6),
                         temperature=1.0, top_k=2, greedy=False)
    assert set(top2.tolist()) == {0, 5}


def test_decode_setting_reaches_the_teacher_and_is_checked(tiny_bundle):
    cfg = load_config(overrides=["rollout.decode=compiled", "rollout.greedy=true"])
    settings = TeacherSettings.from_config(cfg.erase, cfg.rollout)
    assert settings.decode == "compiled"
    assert resolve_decode("auto", torch.device("cpu")) == "eager"
    assert resolve_decode("auto", torch.device("cuda", 0)) == "cuda_graph"
    with pytest.raises(ValueError, match="rollout.decode=cuda_graph: the model is on cpu"):
        resolve_decode("cuda_graph", torch.device("cpu"))
    with pytest.raises(ValueError, match="rollout.decode: 'fast' is not one of"):
        resolve_decode("fast", torch.device("cpu"))
    # the teacher samples through the setting: cuda_graph on a CPU model is that same error
    teacher = ColocatedTeacher(tiny_bundle)
    request = TeacherRequest(TeacherSettings(greedy=True, decode="cuda_graph"), PROMPTS[:1], PROMPTS[:1], [0])
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        teacher.rollout(request)
