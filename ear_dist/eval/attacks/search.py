"""Discrete prompt search: a GCG-style, gradient-guided search for a prompt that brings an erased concept back.

Greedy Coordinate Gradient (Zou et al., 2023) on the text-to-image loss: a prompt of ``length`` tokens from the
tokenizer's vocabulary (inside ``template``, e.g. "a photo of a {}") is scored by the teacher-forced
cross-entropy of the BASE model's own images of the concept under the model attacked. Each step:

1. the gradient of that loss with respect to the one-hot prompt tokens (computed as the gradient at the
   input embeddings times the embedding table), giving for every position the ``top_k`` tokens whose swap
   should lower the loss most;
2. ``candidates`` random single swaps (a position, one of its top-k tokens), each turned into text and back
   through the tokenizer (a candidate whose text does not give back its tokens is dropped: the result must be
   a prompt a user can type);
3. the current prompt and the candidates scored on the step's ``batch`` of target images; the best is kept.

The concept's own words are left out of the vocabulary by default (``exclude``): a search that finds
"church" shows nothing. Returns the best prompts (text), their loss on all targets, and the loss per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ear_dist.eval.attacks.common import AttackError, check_family, frozen, generator, image_loss, pick, rows_per_pass
from ear_dist.models.interface import ImageModel


@dataclass(frozen=True)
class SearchBudget:
    """What one search may spend: ``steps`` of ``candidates`` single-token swaps drawn from the ``top_k``
    tokens per position, on prompts of ``length`` tokens, each scored on ``batch`` target images; then
    ``images`` samples with the ``prompts`` best prompts (0: none, when ``ear-dist eval`` samples them).
    ``seed`` fixes the start, the swaps and the batches."""

    steps: int = 30
    candidates: int = 48
    top_k: int = 16
    length: int = 3
    batch: int = 8
    prompts: int = 4
    images: int = 32
    seed: int = 0
    guidance_weight: float = 5.0

    def check(self) -> None:
        for name in ("steps", "candidates", "top_k", "length", "batch", "prompts", "images"):
            if getattr(self, name) < (0 if name == "images" else 1):
                raise AttackError(f"search budget: {name} must be >= 1, got {getattr(self, name)}")


@dataclass
class SearchResult:
    """The best prompts (full text, template included; best first) and their mean loss on every target, the
    current prompt's loss after each step, and the images [N, T] sampled with the best prompts in turn."""

    prompts: list[str]
    losses: list[float]
    history: list[float] = field(default_factory=list)
    images: Optional[torch.Tensor] = None
    image_prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


def _find(row: list[int], part: list[int]) -> int:
    """Where ``part`` starts in ``row`` (the last match), -1 if absent."""
    n = len(part)
    for start in range(len(row) - n, -1, -1):
        if row[start:start + n] == part:
            return start
    return -1


class _Vocabulary:
    """The token ids a search may use and the text <-> token round trip of a candidate."""

    def __init__(self, model: ImageModel, exclude: Sequence[str]):
        tok = model.tokenizer
        rows = model.model.get_input_embeddings().weight.shape[0]
        special = set(tok.all_special_ids) | {model.prompt_format.boi_token_id, model.prompt_format.pad_token_id,
                                              model.prompt_format.bos_token_id}
        banned = [w.strip().lower() for w in exclude if w.strip()]
        self.tokenizer = tok
        allowed = []
        for i in tok.get_vocab().values():
            if i in special or i >= rows:
                continue
            text = tok.decode([i]).strip().lower()
            if not text or any(_names(text, w) for w in banned):
                continue
            allowed.append(i)
        if not allowed:
            raise AttackError("search: no token of the vocabulary is left to search (every one excluded)")
        self.allowed = torch.tensor(sorted(allowed))
        self.mask = torch.ones(rows, dtype=torch.bool)
        self.mask[self.allowed] = False  # True: not allowed

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)).strip()


def _names(piece: str, word: str) -> bool:
    """Whether a token's text spells ``word`` or a 3+-character piece of it (a BPE part of "church")."""
    return piece == word or word in piece or (len(piece) >= 3 and piece in word)


def _encode(model: ImageModel, template: str, vocab: _Vocabulary, candidates: list[list[int]]):
    """Encode the candidates' prompts; keep those whose prompt gives back their tokens. -> (kept indices, ids,
    mask, start of the searched tokens per kept row)."""
    texts = [template.format(vocab.text(c)) for c in candidates]
    ids, mask = model.encode_prompts(texts)
    rows = ids.tolist()
    kept, starts = [], []
    for i, c in enumerate(candidates):
        start = _find(rows[i], list(c))
        if start >= 0:
            kept.append(i)
            starts.append(start)
    return kept, ids[kept], mask[kept], starts


def _scores(model: ImageModel, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean loss over ``targets`` [M, T] of each encoded prompt [C, S] -> [C]."""
    c, m = ids.shape[0], targets.shape[0]
    all_ids, all_mask = ids.repeat_interleave(m, 0), mask.repeat_interleave(m, 0)
    all_targets = targets.repeat(c, 1)
    out, step = [], rows_per_pass(model)
    with torch.no_grad():
        for s in range(0, c * m, step):
            out.append(image_loss(model, all_ids[s:s + step], all_mask[s:s + step], all_targets[s:s + step]))
    return torch.cat(out).reshape(c, m).mean(1)


def _token_gradient(model: ImageModel, ids: torch.Tensor, mask: torch.Tensor, start: int, length: int,
                    targets: torch.Tensor) -> torch.Tensor:
    """d loss / d one-hot prompt token [length, vocab rows]: the gradient at the input embeddings of the
    searched positions (summed over the targets) times the embedding table."""
    embedding = model.model.get_input_embeddings()
    captured = {}

    def keep(module, args, output):
        captured["x"] = output.detach().requires_grad_(True)
        return captured["x"]

    handle = embedding.register_forward_hook(keep)
    try:
        m = targets.shape[0]
        loss = image_loss(model, ids.expand(m, -1), mask.expand(m, -1), targets).mean()
        (grad,) = torch.autograd.grad(loss, [captured["x"]])
    finally:
        handle.remove()
    at = grad.sum(0)[start:start + length].float()
    return at @ embedding.weight.detach().float().T


def search_prompts(model: ImageModel, targets: torch.Tensor, budget: SearchBudget = SearchBudget(),
                   template: str = "{}", exclude: Sequence[str] = ()) -> SearchResult:
    """GCG prompt search against ``model`` as it is now (apply the erasure's delta first) for prompts under
    which ``targets`` [N, T] (the base model's images of the concept) are likely; then ``budget.images``
    samples with the best prompts. ``exclude``: words whose tokens are left out of the vocabulary (the
    concept's own words). The model's weights are as before when this returns."""
    check_family(model, "search")
    budget.check()
    if template.count("{}") != 1:
        raise AttackError(f"search template {template!r}: must hold one '{{}}' for the searched tokens")
    targets = torch.as_tensor(targets, dtype=torch.long).to(model.device)
    vocab = _Vocabulary(model, exclude)
    gen = generator(budget.seed)
    seen: dict[tuple[int, ...], float] = {}
    history = []
    with frozen(model.model):
        current = None
        for _ in range(100):  # a start whose text gives its tokens back
            start_ids = vocab.allowed[torch.randint(len(vocab.allowed), (budget.length,), generator=gen)].tolist()
            kept, ids, mask, starts = _encode(model, template, vocab, [start_ids])
            if kept:
                current, current_ids, current_mask, current_start = start_ids, ids, mask, starts[0]
                break
        if current is None:
            raise AttackError("search: no random start prompt survives the tokenizer's round trip")
        for _ in range(budget.steps):
            batch = targets[pick(len(targets), budget.batch, gen).to(targets.device)]
            grad = _token_gradient(model, current_ids, current_mask, current_start, budget.length, batch)
            grad[:, vocab.mask[:grad.shape[1]]] = float("inf")
            top = (-grad).topk(min(budget.top_k, len(vocab.allowed)), dim=1).indices
            positions = torch.randint(budget.length, (budget.candidates,), generator=gen)
            choices = torch.randint(top.shape[1], (budget.candidates,), generator=gen)
            candidates = [list(current)]
            for p, c in zip(positions.tolist(), choices.tolist()):
                swapped = list(current)
                swapped[p] = int(top[p, c])
                candidates.append(swapped)
            kept, ids, mask, starts = _encode(model, template, vocab, candidates)
            scores = _scores(model, ids, mask, batch)
            best = int(scores.argmin())
            current = candidates[kept[best]]
            current_ids, current_mask, current_start = ids[best:best + 1], mask[best:best + 1], starts[best]
            history.append(float(scores[best]))
            seen[tuple(current)] = min(seen.get(tuple(current), float("inf")), float(scores[best]))
        finalists = sorted(seen, key=seen.get)[:2 * budget.prompts]
        kept, ids, mask, _ = _encode(model, template, vocab, [list(f) for f in finalists])
        totals = _scores(model, ids, mask, targets)
        order = totals.argsort().tolist()[:budget.prompts]
        prompts = [template.format(vocab.text(finalists[kept[i]])) for i in order]
        losses = [float(totals[i]) for i in order]
        image_prompts = [prompts[i % len(prompts)] for i in range(budget.images)]
        seeds = [budget.seed * 100_000 + i for i in range(budget.images)]
        images = torch.zeros(0, model.num_image_tokens, dtype=torch.long)
        if image_prompts:
            with torch.no_grad():
                images = model.sample(image_prompts, guidance_weight=budget.guidance_weight, seeds=seeds,
                                      batch_size=64)
    return SearchResult(prompts, losses, history, images.cpu(), image_prompts, seeds)
