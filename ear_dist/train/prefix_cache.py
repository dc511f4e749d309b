"""Window updates from a cached prefix (``erase.window_prefix=cached``).

With ``update_mode=window`` the student steps after every kept window, and the next
window is computed by the updated student. Computed exactly (``recompute``), every
window re-runs the student over its whole prefix: 576 tokens in windows of 48 are 12
forwards over 48, 96, ..., 576 tokens, about 6.5x the tokens of one pass.

``cached`` proceeds the way generation does. The keys and values of every position are
kept, detached, from the forward that computed them, that is, from the student as it
was when it got there; a window's forward covers its own positions only and attends to
that cache. Against ``recompute`` two things change, both by construction: the prefix
is seen through older weights, and the window's loss sends no gradient into the
prefix's keys and values. Each position is computed about once per step.

Windows in generation order follow each other, so the cache always ends where the next
window starts. Where a window starts before the cache ends (per-concept window lengths,
random order), the cache is cut back to the window's start and the positions from
there are recomputed by the current student; where the cache ends before the window
starts, the gap is computed with the window (no loss on it) and cached too.

Positions: image position ``i`` is the state that predicts image token ``i``; in the
input sequence (prompt ending in begin-of-image, then image tokens 0..T-2) it is index
``prompt_len - 1 + i``. The prompt itself is computed with the first window.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ear_dist.models.janus import position_ids_from_mask


class PrefixCache:
    """The student's keys/values of one batch's sequence so far, and the forward of one window over them.

    ``ids``/``mask``: the target prompts (left-padded, ending in begin-of-image);
    ``tokens``: the image tokens [B, T] the student is teacher-forced on; ``logits``:
    return generation-head logits instead of last hidden states.
    """

    def __init__(self, student: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor,
                 logits: bool):
        self.student, self.ids, self.tokens, self.logits = student, ids, tokens, logits
        self.prompt_len = ids.shape[1]
        self.mask = torch.cat([mask, mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)], dim=1)
        self.positions = position_ids_from_mask(self.mask)
        self.cache = DynamicCache()
        self.cached = 0  # sequence indices [0, cached) are in the cache

    def span_start(self, first: int) -> int:
        """The image position a forward for a window whose first position is ``first`` starts at."""
        cached_positions = max(self.cached - (self.prompt_len - 1), 0)
        return min(first, cached_positions)

    def outputs(self, start: int, end: int) -> torch.Tensor:
        """Student outputs [B, end - start, D] at image positions ``start .. end - 1``.

        ``start`` comes from :meth:`span_start`. The cache is cut back to where the forward
        starts; afterwards it holds everything up to ``end``, detached.
        """
        seq_start = 0 if start == 0 else self.prompt_len - 1 + start
        seq_end = self.prompt_len - 1 + end
        if self.cached > seq_start:
            self.cache.crop(seq_start - self.cached)
        elif self.cached < seq_start:
            raise ValueError(f"prefix cache holds {self.cached} positions; a forward from {seq_start} would leave "
                             "a gap (take start from span_start)")
        embeds = self._embeddings(seq_start, seq_end)
        out = self.student.model.language_model(
            inputs_embeds=embeds, attention_mask=self.mask[:, :seq_end],
            position_ids=self.positions[:, seq_start:seq_end], past_key_values=self.cache, use_cache=True,
        )
        for layer in self.cache.layers:  # later windows read these as constants
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        self.cached = seq_end
        first = self.prompt_len - 1 + start - seq_start  # where image position ``start`` sits in this forward
        hidden = out.last_hidden_state[:, first:]
        return self.student.model.generation_head(hidden) if self.logits else hidden

    def _embeddings(self, seq_start: int, seq_end: int) -> torch.Tensor:
        """Input embeddings of sequence indices ``seq_start .. seq_end - 1``: prompt ids, then image tokens."""
        parts = []
        if seq_start < self.prompt_len:
            parts.append(self.student.get_input_embeddings()(self.ids[:, seq_start:min(seq_end, self.prompt_len)]))
        if seq_end > self.prompt_len:
            image = self.tokens[:, max(seq_start - self.prompt_len, 0): seq_end - self.prompt_len]
            parts.append(self.student.prepare_embeddings_for_image_generation(image))
        return torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)
