"""Prompts longer than the model's context beside an image are an error naming the pair (index, id, source file),
its length and the limit, before any work (``check_prompt_lengths``); prompts that fit pass unchanged."""

import pytest

from ear_dist.data.pairs import PromptPair
from ear_dist.data.stream import check_prompt_lengths
from ear_dist.models.janus import PromptTooLongError

LONG = "a church " + "with a tall stone tower " * 120


def test_a_pair_whose_prompt_does_not_fit_is_named(tiny_bundle):
    pairs = [PromptPair("a photo of a church", "a photo of a barn", "church", "barn", source="ear-json:pairs.json"),
             PromptPair(LONG, "a barn", "church", "barn", source="ear-json:pairs.json")]
    with pytest.raises(PromptTooLongError, match=r"^pair 1 \(id \w+, source ear-json:pairs\.json\), target: prompt "
                                                 r"'a church with a tall.*' is (\d+) tokens .* at most 496: shorten it$"):
        check_prompt_lengths(pairs, tiny_bundle)
    limit = tiny_bundle.max_prompt_tokens
    assert limit == 512 - 16
    assert tiny_bundle.prompt_lengths([LONG])[0] > limit
    check_prompt_lengths(pairs[:1], tiny_bundle)  # fits: no error


def test_encoding_a_prompt_that_does_not_fit_is_refused_before_the_model_runs(tiny_bundle):
    with pytest.raises(PromptTooLongError, match=r"^prompt 'a church with a tall.*' is \d+ tokens"):
        tiny_bundle.encode_prompts(["a church", LONG])
    ids, mask = tiny_bundle.encode_prompts(["a church at night"])
    assert int(mask.sum()) == tiny_bundle.prompt_lengths(["a church at night"])[0]
