"""Frechet distance between image sets, from feature means and covariances.

    FD = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

computed once here for every feature model. The trace of the matrix square root uses
tr((S_1 S_2)^(1/2)) = sum_i sqrt(lambda_i(S_1^(1/2) S_2 S_1^(1/2))): the matrix inside
is symmetric positive semi-definite, so a symmetric eigendecomposition gives it stably
(no complex parts to drop, no scipy needed).

Features:
- ``inception``: torch-fidelity's Inception-v3 (2048-d pool features, the classic FID);
  needs torch-fidelity and torchvision, as GPU clusters usually have.
- ``dinov2`` / ``clip``: a local DINOv2 or CLIP (vision) directory through transformers;
  FD-DINOv2 correlates better with human judgement than Inception FID.
Reference statistics are cached per suite and feature model.

Every result names its convention: the feature model, the image count, the resize, the
reference. The EAR paper's FID is clean-fid's (Inception-v3, PIL bicubic resize to 299) on
30,000 COCO captions against real COCO images; any other setting (fewer images: FID is
biased upwards at small N; other features; torch-fidelity's resize; the base column as the
reference) gives a number that is not comparable with the paper's, and ``paper_note`` says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ear_dist.eval.metrics import MetricUnavailable

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features [N, D] in float64."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"Frechet distance needs at least 2 feature vectors, got shape {list(x.shape)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance between two Gaussians N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Frechet distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    root = _sqrt_psd(s1)
    middle = root @ s2 @ root
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


# --------------------------------------------------------------------------- feature models


class FeatureModel:
    """Images (uint8 [N, H, W, 3]) -> feature vectors [N, D]; ``id`` keys cached statistics."""

    name = "features"
    id = ""

    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    resize = ""

    def describe(self) -> dict:
        return {"features": self.name, "model": self.id, "resize": self.resize}


class TransformersFeatures(FeatureModel):
    """DINOv2 (CLS token after the final norm) or CLIP image embeddings from a local directory."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 32):
        from transformers import AutoConfig, AutoImageProcessor

        root = Path(path)
        hint = ("download facebook/dinov2-base (or a CLIP such as openai/clip-vit-large-patch14) in transformers "
                "format into that directory and set eval.fid_model_path")
        if not path or not (root / "config.json").is_file():
            raise MetricUnavailable(f"FID: {path or '(eval.fid_model_path is empty)'} holds no model; {hint}")
        try:
            config = AutoConfig.from_pretrained(root, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(root, local_files_only=True)
            kind = config.model_type
            if kind == "dinov2":
                from transformers import Dinov2Model

                self.model = Dinov2Model.from_pretrained(root, local_files_only=True, use_safetensors=True)
                self._embed = lambda px: self.model(pixel_values=px).pooler_output
            elif kind == "clip":
                from transformers import CLIPModel

                self.model = CLIPModel.from_pretrained(root, local_files_only=True, use_safetensors=True)
                self._embed = lambda px: self.model.get_image_features(pixel_values=px).pooler_output
            elif kind == "clip_vision_model":
                from transformers import CLIPVisionModelWithProjection

                self.model = CLIPVisionModelWithProjection.from_pretrained(root, local_files_only=True,
                                                                           use_safetensors=True)
                self._embed = lambda px: self.model(pixel_values=px).image_embeds
            else:
                raise MetricUnavailable(f"FID: {root} is a {kind!r} model; expected dinov2, clip or clip_vision_model")
        except (OSError, ValueError) as e:
            raise MetricUnavailable(f"FID: cannot load {root}: {e}; {hint}") from None
        self.model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.name = "dinov2" if kind == "dinov2" else "clip"
        size, crop = getattr(self.processor, "size", None), getattr(self.processor, "crop_size", None)
        self.resize = f"transformers {type(self.processor).__name__}: resize {size}, center crop {crop}"
        digest = hashlib.sha256((root / "config.json").read_bytes()).hexdigest()[:12]
        self.id = f"{self.name}:{root.resolve()}:{digest}"

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for s in range(0, len(images), self.batch_size):
            px = self.processor(images=list(images[s : s + self.batch_size]), return_tensors="pt")["pixel_values"]
            out.append(self._embed(px.to(self.device)).float().cpu())
        return torch.cat(out).numpy()


class InceptionFeatures(FeatureModel):
    """torch-fidelity's Inception-v3 2048-d features (the classic FID); needs torch-fidelity + torchvision."""

    name = "inception"
    resize = "torch-fidelity's own bilinear resize to 299x299 (clean-fid uses PIL bicubic)"

    def __init__(self, device: str = "cpu", batch_size: int = 32, weights_path: str = ""):
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as e:  # ImportError, or torchvision failing to load beside this torch
            raise MetricUnavailable(f"FID (inception): torch-fidelity cannot be imported ({e}); pip install "
                                    "torch-fidelity with a torchvision that matches torch, or set "
                                    "eval.fid_features=dinov2 and eval.fid_model_path") from None
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                 feature_extractor_weights_path=weights_path or None)
        self.model.eval().to(device)
        self.device = device
        self.batch_size = batch_size
        self.id = "inception-v3-compat:2048"

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        out = []
        for s in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.stack(images[s : s + self.batch_size])).permute(0, 3, 1, 2).contiguous()
            out.append(self.model(x.to(self.device))[0].float().cpu())
        return torch.cat(out).numpy()


PAPER_FID_IMAGES = 30_000


def paper_note(features: str, images: int, real_reference: bool) -> str:
    """Why an FID is not comparable with the EAR paper's (clean-fid, Inception, 30,000 COCO images vs real
    ones); empty when only the resize differs."""
    why = []
    if features != "inception":
        why.append(f"{features} features, not Inception-v3")
    if images < PAPER_FID_IMAGES:
        why.append(f"{images:,} images, not {PAPER_FID_IMAGES:,} (FID is biased upwards at small counts)")
    if not real_reference:
        why.append("the base column's images as the reference, not real COCO images")
    if not why:
        return ""
    return "not comparable with the paper's FID (clean-fid on 30,000 COCO images): " + "; ".join(why)


def build_feature_model(kind: str, model_path: str, device: str = "cpu") -> FeatureModel:
    """``eval.fid_features``: auto = the transformers model when a path is set, else Inception."""
    if kind == "auto":
        kind = "dinov2" if model_path else "inception"
    if kind == "inception":
        return InceptionFeatures(device)
    model = TransformersFeatures(model_path, device)
    if model.name != kind:
        raise MetricUnavailable(f"FID: eval.fid_features={kind} but {model_path} is a {model.name} model")
    return model


# --------------------------------------------------------------------------- reference statistics


def stats_cache_root(configured: str = "") -> Path:
    """``eval.stats_cache_dir``, else $EAR_DIST_CACHE/fid-stats, else ~/.cache/ear-dist/fid-stats."""
    if configured:
        return Path(configured)
    base = os.environ.get("EAR_DIST_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "ear-dist") / "fid-stats"


def reference_images(directory: str) -> list[Path]:
    """The image files of a reference directory (sorted, recursive)."""
    root = Path(directory)
    if not root.is_dir():
        raise MetricUnavailable(f"FID: eval.fid_reference {root} is not a directory; put the real reference images "
                                "(e.g. the COCO val2014 images of the captions) there")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise MetricUnavailable(f"FID: {root} holds {len(files)} image file(s); at least 2 are needed")
    return files


def cached_stats(cache_dir: Path, suite: str, model: FeatureModel, source_id: str,
                 compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray, bool]:
    """(mu, sigma, from_cache) of a reference set, cached per suite, feature model and reference content."""
    key = hashlib.sha256(json.dumps([suite, model.id, source_id]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{suite}-{model.name}-{key}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            return data["mu"], data["sigma"], True
    mu, sigma = feature_stats(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma, meta=json.dumps({"suite": suite, "model": model.id, "source": source_id}))
    tmp.replace(path)
    return mu, sigma, False


def files_id(paths: Sequence[Path]) -> str:
    """Names a set of image files by their names, sizes and modification times."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]
