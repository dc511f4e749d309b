"""VF (Visual Filter): keep a pair only if the teacher's images say it is a good pair.

For each pair the teacher samples an image for the target prompt and one for the
surrogate prompt (one batched CFG rollout for both, with the same seed); a classifier
then decides whether each image shows the concept. A pair is kept when the target
image shows the concept and the surrogate image does not. The surrogate rollout tokens
(and, optionally, the target's) are stored on the kept pair, so training reuses them.

Classifiers are plugins behind one small interface, ``detect(images, concepts)`` on
uint8 RGB images ``[N, H, W, 3]``:

- ``nudenet``: NudeNet 3.4.2's ONNX detector (shipped in the wheel). The concept is
  present when a detection of one of ``nudenet_classes`` scores >= ``threshold``.
  The default class list is the exposed body parts that mean nudity (breasts, genitalia,
  buttocks, anus); exposed feet, armpits, belly and male breast are left out on purpose.
- ``resnet50``: torchvision's ResNet-50 with ImageNet weights from a local file; the
  concept is present when one of its ImageNet class ids is in the top ``top_k``.
- ``hf``: a Hugging Face image-classification model from a local directory (styles);
  present when the probability summed over the concept's labels >= ``threshold``.
- ``module:function``: any callable ``f(images, concepts) -> list of bool | float``
  (a float is compared with ``threshold``).
"""

from __future__ import annotations

import importlib
from collections import Counter
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ear_dist.data.pairs import PromptPair

DEFAULT_NUDENET_CLASSES = (
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassifierError(RuntimeError):
    """A classifier plugin that cannot be built or used; says what to install or fix."""


@dataclass
class Detection:
    present: bool
    score: float
    label: str = ""


class ConceptClassifier(ABC):
    """The plugin interface: does each image show its concept?"""

    name = "classifier"

    @abstractmethod
    def detect(self, images: np.ndarray, concepts: Sequence[str]) -> list[Detection]:
        """One detection per image [N, H, W, 3] uint8, for the concept named beside it."""


# --------------------------------------------------------------------------- plugins


class NudeNetClassifier(ConceptClassifier):
    name = "nudenet"

    def __init__(self, classes: Sequence[str] = DEFAULT_NUDENET_CLASSES, threshold: float = 0.6, detector=None):
        if detector is None:
            try:
                from nudenet import NudeDetector
            except ImportError:
                raise ClassifierError(
                    "the nudenet classifier needs the nudenet package: pip install nudenet==3.4.2"
                ) from None
            detector = NudeDetector()
        self.detector = detector
        self.classes = set(classes)
        self.threshold = threshold

    def detect(self, images: np.ndarray, concepts: Sequence[str]) -> list[Detection]:
        # NudeNet reads arrays in OpenCV's BGR order
        bgr = [np.ascontiguousarray(img[:, :, ::-1]) for img in images]
        out = []
        for found in self.detector.detect_batch(bgr, batch_size=max(1, len(bgr))):
            hits = [d for d in found if d["class"] in self.classes]
            best = max(hits, key=lambda d: d["score"], default=None)
            score = float(best["score"]) if best else 0.0
            out.append(Detection(score >= self.threshold, score, best["class"] if best else ""))
        return out


def _imagenet_batch(images: np.ndarray, size: int = 224) -> torch.Tensor:
    """Resize the short side to 256/224 * size, center-crop ``size``, ImageNet-normalize."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    short = round(size * 256 / 224)
    scale = short / min(h, w)
    x = torch.nn.functional.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                        mode="bilinear", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[:, :, top : top + size, left : left + size]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class ResNet50Classifier(ConceptClassifier):
    """ImageNet top-k check. ``class_ids`` maps a concept to its ImageNet ids (church: [497])."""

    name = "resnet50"

    def __init__(self, model: torch.nn.Module, class_ids: dict[str, list[int]], top_k: int = 1, device: str = "cpu"):
        if not class_ids:
            raise ClassifierError("vf.class_ids is empty: map each concept to ImageNet class ids, e.g. {church: [497]}")
        self.model = model.eval().to(device)
        self.class_ids = {k.lower(): list(v) for k, v in class_ids.items()}
        self.top_k = top_k
        self.device = device

    @classmethod
    def from_path(cls, weights_path: str, class_ids: dict[str, list[int]], top_k: int = 1, device: str = "cpu"):
        """torchvision's resnet50 architecture with weights from a local .pth/.safetensors file."""
        try:
            import torchvision
        except ImportError:
            raise ClassifierError(
                "the resnet50 classifier needs torchvision matching torch (pip install torchvision==<the "
                "release paired with your torch>); or use vf.classifier=hf / a module:function plugin"
            ) from None
        if not weights_path:
            raise ClassifierError("vf.classifier_path is empty: give the local ResNet-50 ImageNet weights file")
        model = torchvision.models.resnet50(weights=None)
        model.load_state_dict(_load_state_dict(weights_path))
        return cls(model, class_ids, top_k, device)

    @torch.no_grad()
    def detect(self, images: np.ndarray, concepts: Sequence[str]) -> list[Detection]:
        probs = self.model(_imagenet_batch(images).to(self.device)).float().softmax(-1).cpu()
        top = probs.topk(self.top_k, dim=-1).indices
        out = []
        for i, concept in enumerate(concepts):
            ids = self.class_ids.get(concept.lower())
            if ids is None:
                raise ClassifierError(f"vf.class_ids has no ImageNet ids for concept {concept!r} (has: {', '.join(self.class_ids)})")
            present = bool(set(top[i].tolist()) & set(ids))
            best = max(ids, key=lambda c: probs[i, c].item())
            out.append(Detection(present, float(probs[i, ids].sum()), str(best)))
        return out


def _load_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class HFImageClassifier(ConceptClassifier):
    """A transformers image-classification model; ``labels`` maps a concept to its label names
    (default: the label equal to the concept name, case-insensitive)."""

    name = "hf"

    def __init__(self, path: str, labels: Optional[dict[str, list[str]]] = None, threshold: float = 0.5, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True).eval().to(device)
        except (OSError, ValueError) as e:
            raise ClassifierError(f"{path}: cannot load an image-classification model: {e}") from None
        self.label_to_id = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        self.labels = {k.lower(): [l.lower() for l in v] for k, v in (labels or {}).items()}
        self.threshold = threshold
        self.device = device

    def _ids(self, concept: str) -> list[int]:
        names = self.labels.get(concept.lower(), [concept.lower()])
        missing = [n for n in names if n not in self.label_to_id]
        if missing:
            raise ClassifierError(
                f"the model has no label(s) {', '.join(missing)} for concept {concept!r} "
                f"(labels: {', '.join(sorted(self.label_to_id))}); set vf.labels"
            )
        return [self.label_to_id[n] for n in names]

    @torch.no_grad()
    def detect(self, images: np.ndarray, concepts: Sequence[str]) -> list[Detection]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        probs = self.model(**inputs).logits.float().softmax(-1).cpu()
        out = []
        for i, concept in enumerate(concepts):
            ids = self._ids(concept)
            score = float(probs[i, ids].sum())
            out.append(Detection(score >= self.threshold, score, self.model.config.id2label[ids[0]]))
        return out


class CallableClassifier(ConceptClassifier):
    """Wrap ``f(images, concepts) -> list[bool | float | Detection]``."""

    def __init__(self, fn: Callable, threshold: float = 0.5, name: str = "callable"):
        self.fn = fn
        self.threshold = threshold
        self.name = name

    @classmethod
    def from_spec(cls, spec: str, threshold: float = 0.5) -> "CallableClassifier":
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ClassifierError(f"vf.classifier {spec!r}: expected nudenet, resnet50, hf or module:function")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ClassifierError(f"vf.classifier {spec!r}: cannot import: {e}") from None
        return cls(fn, threshold, spec)

    def detect(self, images: np.ndarray, concepts: Sequence[str]) -> list[Detection]:
        results = list(self.fn(images, list(concepts)))
        if len(results) != len(images):
            raise ClassifierError(f"classifier {self.name} returned {len(results)} results for {len(images)} images")
        out = []
        for r in results:
            if isinstance(r, Detection):
                out.append(r)
            elif isinstance(r, (bool, np.bool_)):
                out.append(Detection(bool(r), float(r)))
            else:
                out.append(Detection(float(r) >= self.threshold, float(r)))
        return out


def build_classifier(
    kind: str,
    path: str = "",
    threshold: float = 0.5,
    nudenet_classes: Sequence[str] = DEFAULT_NUDENET_CLASSES,
    class_ids: Optional[dict[str, list[int]]] = None,
    labels: Optional[dict[str, list[str]]] = None,
    top_k: int = 1,
    device: str = "cpu",
) -> ConceptClassifier:
    """Build the plugin named by ``vf.classifier``."""
    if kind == "nudenet":
        return NudeNetClassifier(nudenet_classes or DEFAULT_NUDENET_CLASSES, threshold)
    if kind == "resnet50":
        return ResNet50Classifier.from_path(path, class_ids or {}, top_k, device)
    if kind == "hf":
        if not path:
            raise ClassifierError("vf.classifier_path is empty: give the local model directory")
        return HFImageClassifier(path, labels, threshold, device)
    return CallableClassifier.from_spec(kind, threshold)


# --------------------------------------------------------------------------- the filter


@dataclass
class FilterReport:
    """Counts of what the filter kept and dropped, and why."""

    total: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none dropped"
        return f"visual filter: kept {self.kept} of {self.total} ({why})"


DROP_TARGET_MISSING = "target image lacks the concept"
DROP_SURROGATE_SHOWS = "surrogate image shows the concept"
DROP_BOTH = "both"


class VisualFilter:
    """Run the teacher and a classifier over pairs.

    ``generate(prompts, seeds) -> LongTensor [N, T]`` is the teacher's batched CFG
    rollout; ``decode(tokens) -> uint8 [N, H, W, 3]`` its image decoder. A pair without
    a seed gets ``base_seed + its position`` and keeps it, so its tokens can be reproduced.
    """

    def __init__(
        self,
        generate: Callable[[list[str], list[int]], torch.Tensor],
        decode: Callable[[torch.Tensor], np.ndarray],
        classifier: ConceptClassifier,
        batch_size: int = 8,
        store_target_tokens: bool = False,
        base_seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"vf.batch_size must be >= 1, got {batch_size}")
        self.generate = generate
        self.decode = decode
        self.classifier = classifier
        self.batch_size = batch_size
        self.store_target_tokens = store_target_tokens
        self.base_seed = base_seed
        self.report = FilterReport()

    def filter_batch(self, pairs: list[PromptPair], first_position: int = 0) -> list[PromptPair]:
        """Filter one batch; updates ``self.report``; returns the kept pairs with tokens set."""
        for pair in pairs:
            if not pair.surrogate:
                raise ValueError(f"pair {pair.id} ({pair.source}) has no surrogate prompt; the visual filter needs pairs")
        seeds = [p.seed if p.seed >= 0 else self.base_seed + first_position + i for i, p in enumerate(pairs)]
        n = len(pairs)
        # both prompts of every pair in one rollout batch, same seed per pair
        tokens = self.generate([p.target for p in pairs] + [p.surrogate for p in pairs], seeds + seeds)
        if tokens.shape[0] != 2 * n:
            raise ValueError(f"generate returned {tokens.shape[0]} rows for {2 * n} prompts")
        images = self.decode(tokens)
        concepts = [p.concept for p in pairs]
        found = self.classifier.detect(images, concepts + concepts)
        kept = []
        for i, pair in enumerate(pairs):
            target_ok, surrogate_clean = found[i].present, not found[n + i].present
            self.report.total += 1
            if target_ok and surrogate_clean:
                self.report.kept += 1
                pair.seed = seeds[i]
                pair.surrogate_tokens = tokens[n + i].tolist()
                if self.store_target_tokens:
                    pair.target_tokens = tokens[i].tolist()
                kept.append(pair)
            elif not target_ok and not surrogate_clean:
                self.report.dropped[DROP_BOTH] += 1
            elif not target_ok:
                self.report.dropped[DROP_TARGET_MISSING] += 1
            else:
                self.report.dropped[DROP_SURROGATE_SHOWS] += 1
        return kept

    def run(self, pairs: Sequence[PromptPair], progress: bool = False) -> list[PromptPair]:
        """Filter all pairs in batches of ``batch_size``."""
        starts = range(0, len(pairs), self.batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="visual filter", unit="batch")
        kept = []
        for s in starts:
            kept += self.filter_batch(list(pairs[s : s + self.batch_size]), first_position=s)
        return kept


def teacher_functions(bundle, guidance_weight: float = 5.0, temperature: float = 1.0, top_k: int = 0,
                      batch_size: int = 8) -> tuple[Callable, Callable]:
    """``generate`` and ``decode`` for ``VisualFilter`` from a loaded model of either family."""
    from ear_dist.models.family import as_image_model

    bundle = as_image_model(bundle)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return bundle.sample(prompts, guidance_weight=guidance_weight, temperature=temperature, top_k=top_k,
                                 seeds=seeds, batch_size=batch_size)

    def decode(tokens: torch.Tensor) -> np.ndarray:
        return bundle.decode(tokens, batch_size=batch_size)

    return generate, decode
