"""The interface every model family implements: what the step, the teacher and the evaluation call.

Both families describe an image as one sequence of ``num_image_tokens`` integer tokens
(for the VAR family: every scale's positions, coarse to fine, each token the integer of
its bits), so pairs, shards, teacher placements, deltas and merges carry tokens the same
way. Position ``i`` of a teacher-forced output is the state that predicts token ``i``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ear_dist.models.sampling import in_batches


class ImageModel(ABC):
    """A frozen text-to-image model with what it needs to turn prompts into inputs.

    ``model`` is the module a student copies and a delta changes; text encoders and
    image decoders the family keeps beside it stay frozen.
    """

    family: str = ""
    model: torch.nn.Module
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ shapes
    @property
    @abstractmethod
    def num_image_tokens(self) -> int:
        """Tokens per image (every scale's positions for a next-scale model)."""

    @property
    @abstractmethod
    def codebook_size(self) -> int:
        """Distinct values an image token takes."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the last hidden state (``teacher_forced``'s first output)."""

    @property
    @abstractmethod
    def head_width(self) -> int:
        """Width of one position's head logits (``teacher_forced``'s second output)."""

    @property
    def logit_groups(self) -> int:
        """Independent softmaxes in one position's logits: 1 (one codebook) or the bits of a bitwise head."""
        return 1

    @property
    def kv_bytes_per_token(self) -> Optional[int]:
        """Bytes of KV cache one sequence position takes in one sampling row (None: unknown, not planned)."""
        return None

    @property
    def scale_sizes(self) -> Optional[tuple[int, ...]]:
        """Tokens of each scale, coarse to fine, for a next-scale model; None for a raster model."""
        return None

    # ------------------------------------------------------------------ computation
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (conditioning [B, L, ...], attention mask [B, L]) as ``model`` consumes them."""

    @abstractmethod
    def unconditional(self, cond: torch.Tensor) -> torch.Tensor:
        """The classifier-free-guidance unconditional form of encoded prompts (same mask)."""

    @abstractmethod
    def teacher_forced(self, model: torch.nn.Module, cond: torch.Tensor, mask: torch.Tensor,
                       image_tokens: torch.Tensor, return_logits: bool = True
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``model`` (this one or a student copy) on every position of ``image_tokens`` [B, n] in one pass.

        Returns the last hidden states [B, n, hidden_size] and, if asked, the head logits
        [B, n, head_width]; position i predicts token i from the prompt and tokens before it.
        """

    @abstractmethod
    def rollout_ids(self, cond: torch.Tensor, mask: torch.Tensor, guidance_weight: float = 5.0,
                    temperature: float = 1.0, top_k: int = 0, greedy: bool = False,
                    seeds: Optional[Sequence[int]] = None, progress: bool = False,
                    decode: str = "eager", uncond: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                    ) -> torch.Tensor:
        """Image tokens [B, T] sampled with classifier-free guidance and a KV cache, one seed per row
        (``decode``: rollout.decode, the decode loop where a family has several; ``uncond``: the encoded negative
        prompts of the unconditional rows, padded like ``cond``; None: the family's unconditional form)."""

    @abstractmethod
    def decode(self, image_tokens: torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """Image tokens [N, T] -> uint8 RGB images [N, H, W, 3] through the family's image decoder."""

    @abstractmethod
    def save(self, path: Union[str, Path]) -> Path:
        """Write a directory that ``load_model`` (and the family's own loaders) read back."""

    # ------------------------------------------------------------------ built on the above
    def sample(self, prompts: Sequence[str], guidance_weight: float = 5.0, temperature: float = 1.0,
               top_k: int = 0, greedy: bool = False, seeds: Optional[Sequence[int]] = None,
               batch_size: int = 0, progress: bool = False, decode: str = "eager",
               negative_prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        """Image tokens [N, T] for prompts, in batches of ``batch_size`` (0 = all at once); ``negative_prompts`` (one
        per prompt): the classifier-free-guidance unconditional branch's prompts instead of the family's own."""
        return in_batches(self, prompts, seeds, batch_size, progress,
                          lambda ids, mask, chunk_seeds, uncond=None: self.rollout_ids(
                              ids, mask, guidance_weight, temperature, top_k, greedy, chunk_seeds, progress, decode,
                              **({"uncond": uncond} if uncond is not None else {})), negative_prompts)
