"""CLIP score from a local CLIP directory (transformers ``CLIPModel``).

Three conventions, all reported and named (``eval.clip_convention`` picks Table 1's column):

- ``cosine``: the mean cosine between image and caption embeddings (what the EAR paper's
  table shows, ~0.14-0.15 for a 512-d CLIP);
- ``torchmetrics``: exactly what ``torchmetrics.multimodal.CLIPScore`` returns, the clamp of
  the mean, max(100 * mean(cosine), 0);
- ``per-image``: the mean of per-image clamped scores, mean(100 * max(cosine, 0)) (Hessel et
  al.'s per-image CLIPScore at w = 100). With cosines [0.3, -0.1]: torchmetrics 10.0,
  per-image 15.0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ear_dist.eval.metrics import MetricUnavailable

CLIP_HINT = ("download a CLIP model in transformers format (e.g. openai/clip-vit-large-patch14: config.json, "
             "model.safetensors, tokenizer files, preprocessor_config.json) into that directory and set eval.clip_path")


class ClipScorer:
    """Cosine similarity of images and their captions under one local CLIP."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        root = Path(path)
        if not path or not (root / "config.json").is_file():
            raise MetricUnavailable(f"CLIP score: {path or '(eval.clip_path is empty)'} holds no model; {CLIP_HINT}")
        try:
            model = CLIPModel.from_pretrained(root, local_files_only=True, use_safetensors=True)
            self.model = model.eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MetricUnavailable(f"CLIP score: cannot load {root}: {e}; {CLIP_HINT}") from None
        self.path = str(root)
        self.device = device
        self.batch_size = batch_size
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def cosines(self, images: Sequence[np.ndarray], captions: Sequence[str]) -> np.ndarray:
        """Cosine between each image and its own caption."""
        if len(images) != len(captions):
            raise ValueError(f"CLIP score: {len(images)} images for {len(captions)} captions")
        out = []
        for s in range(0, len(images), self.batch_size):
            pixels = self.processor(images=list(images[s : s + self.batch_size]), return_tensors="pt")
            text = self.tokenizer(list(captions[s : s + self.batch_size]), padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt")
            img = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device)).pooler_output
            txt = self.model.get_text_features(input_ids=text["input_ids"].to(self.device),
                                               attention_mask=text["attention_mask"].to(self.device)).pooler_output
            out.append(torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def describe(self) -> dict:
        return {"model": self.path, "conventions": CONVENTIONS}


# eval.clip_convention -> (key in clip_summary, what it is)
CONVENTIONS = {
    "cosine": ("clip_cosine", "mean cosine (the EAR paper's CLIP column)"),
    "torchmetrics": ("clip_score_torchmetrics", "max(100 * mean(cosine), 0), as torchmetrics CLIPScore computes it"),
    "per-image": ("clip_score_100", "mean of per-image 100 * max(cosine, 0)"),
}


def clip_summary(cosines: np.ndarray) -> dict:
    """Every convention of one set of cosines."""
    cosines = np.asarray(cosines, dtype=np.float64)
    return {"clip_cosine": float(cosines.mean()), "clip_score_torchmetrics": float(max(100 * cosines.mean(), 0.0)),
            "clip_score_100": float((100 * np.clip(cosines, 0, None)).mean()), "images": int(cosines.size)}
