"""Language-model perplexity of the unified model's text side.

Janus-Pro is also a chat and understanding model, and erasure edits its first LLM
layers, so the text side can be damaged without any image metric showing it. This is
the perplexity of the model's language head on plain text, before vs after.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ear_dist.eval.metrics import MetricUnavailable
from ear_dist.models.janus import JanusBundle


def read_text_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (each scored as one passage)."""
    p = Path(path)
    if not p.is_file():
        raise MetricUnavailable(f"perplexity: eval.perplexity_text {p} does not exist; give a UTF-8 text file "
                                "with one passage per line")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise MetricUnavailable(f"perplexity: {p} has no text")
    return lines


@torch.no_grad()
def perplexity(bundle: JanusBundle, texts: Sequence[str], batch_size: int = 8) -> dict:
    """exp(mean next-token negative log-likelihood) over every predicted token of ``texts``."""
    if getattr(bundle, "family", "janus") != "janus":
        raise MetricUnavailable(f"perplexity: the {bundle.family} family has no language-model head (its prompts "
                                "go through a text encoder)")
    if bundle.tokenizer is None:
        raise MetricUnavailable(f"perplexity: model {bundle.name} has no tokenizer")
    tok = bundle.tokenizer
    tok.padding_side = "right"
    total_nll, total_tokens = 0.0, 0
    for s in range(0, len(texts), batch_size):
        enc = tok(list(texts[s : s + batch_size]), return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"].to(bundle.device), enc["attention_mask"].to(bundle.device)
        logits = bundle.model(input_ids=ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        keep = mask[:, 1:].bool()
        total_nll += float(nll[keep].sum())
        total_tokens += int(keep.sum())
    tok.padding_side = "left"
    if total_tokens == 0:
        raise MetricUnavailable("perplexity: the texts have no token to predict")
    return {"perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens, "texts": len(texts)}
