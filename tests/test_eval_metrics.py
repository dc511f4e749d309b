"""Eval metrics on tiny models saved to disk and loaded back like a user's directories: Frechet distance,
CLIP score, FD-DINOv2 with cached reference statistics, ResNet-50 through transformers, perplexity."""

import json
import math

import numpy as np
import pytest
import torch

from ear_dist.cli import main
from ear_dist.eval.metrics import MetricUnavailable
from ear_dist.eval.metrics.clip import ClipScorer, clip_summary
from ear_dist.eval.metrics.fid import build_feature_model, feature_stats, frechet_distance
from ear_dist.eval.metrics.tokens import kl_divergence, token_histogram, total_variation
from tests.test_eval import make_delta


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(400, 16)) @ np.random.default_rng(1).normal(size=(16, 16))
    mu, sigma = feature_stats(x)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-7 * np.trace(sigma)


def test_frechet_distance_equals_the_closed_form_for_two_gaussians():
    rng = np.random.default_rng(2)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.5, 3, 8), rng.uniform(0.5, 3, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    closed = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # general covariances that do not commute, against the 2x2 closed form:
    # tr(sqrt(S1 S2)) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2)))
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    m = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
    closed = float(np.trace(s1) + np.trace(s2) - 2 * tr_sqrt + 1.0)
    assert frechet_distance(np.zeros(2), s1, np.array([1.0, 0.0]), s2) == pytest.approx(closed, rel=1e-10)
    # and from samples of those Gaussians, within sampling error
    x = rng.multivariate_normal(np.zeros(2), s1, 200_000)
    y = rng.multivariate_normal([1.0, 0.0], s2, 200_000)
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(closed, rel=0.03)


def test_token_histogram_distances():
    p = token_histogram([np.array([0, 0, 1, 1])], 4)
    q = token_histogram([np.array([2, 2]), np.array([3, 3])], 4)
    assert p.tolist() == [0.5, 0.5, 0, 0] and total_variation(p, q) == 1.0 and total_variation(p, p) == 0.0
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12) and kl_divergence(p, q) > 10


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP with a word tokenizer and an image processor, saved like a user's directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ear_dist.models.presets import build_word_tokenizer

    path = tmp_path_factory.mktemp("clip") / "clip"
    tok = build_word_tokenizer()
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_of_an_image_with_its_caption(tiny_clip):
    """Our cosine equals CLIP's own image-text logit divided by its scale, for each image and its caption."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    images = (np.random.default_rng(3).random((3, 40, 48, 3)) * 255).astype(np.uint8)
    captions = ["a red church at night", "a barn", "a boat on the river by the sea"]
    scorer = ClipScorer(str(tiny_clip))
    cos = scorer.cosines(list(images), captions)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip)
    px = CLIPImageProcessor.from_pretrained(tiny_clip)(images=list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values=px, **tok(captions, padding=True, return_tensors="pt"))
        reference = (out.logits_per_image.diag() / model.logit_scale.exp()).numpy()
    np.testing.assert_allclose(cos, reference, atol=1e-5)
    summary = clip_summary(np.array([0.3, -0.1]))
    assert summary["clip_cosine"] == pytest.approx(0.1) and summary["clip_score_100"] == pytest.approx(15.0)


def test_missing_clip_directory_says_what_to_download(tmp_path):
    with pytest.raises(MetricUnavailable, match=r"clip-vit-large-patch14.*eval.clip_path"):
        ClipScorer(str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("dinov2") / "dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_feature_models_refuse_what_they_cannot_load(tiny_dinov2, tmp_path):
    with pytest.raises(MetricUnavailable, match=r"dinov2-base.*eval.fid_model_path"):
        build_feature_model("dinov2", str(tmp_path / "nothing"))
    with pytest.raises(MetricUnavailable, match="is a dinov2 model"):
        build_feature_model("clip", str(tiny_dinov2))
    assert build_feature_model("auto", str(tiny_dinov2)).name == "dinov2"


def test_coco_suite_fid_and_clip_through_eval(tiny_checkpoint, tiny_clip, tiny_dinov2, tmp_path):
    from PIL import Image

    coco = tmp_path / "coco.csv"
    coco.write_text("image_id,source,prompt,evaluation_seed,width,height\n" +
                    "".join(f"{i},coco-30k,a photo of a {w} in a field,{100 + i},64,64\n"
                            for i, w in enumerate(["dog", "cat", "horse", "car", "bus", "boat", "tree", "house"])))
    real = tmp_path / "real"
    real.mkdir()
    for i in range(6):
        Image.fromarray((np.random.default_rng(i).random((48, 48, 3)) * 255).astype(np.uint8)).save(real / f"{i}.png")
    delta = make_delta(tiny_checkpoint, tmp_path / "erased.safetensors")
    sets = [f"model.path={tiny_checkpoint}", f"eval.coco_prompts={coco}", "eval.coco_size=6",
            f"eval.clip_path={tiny_clip}", "eval.fid_features=dinov2", f"eval.fid_model_path={tiny_dinov2}",
            f"eval.stats_cache_dir={tmp_path / 'stats'}"]
    argv = ["eval", "--no-progress", "--suite", "coco", "--delta", str(delta)] + [a for s in sets for a in ("--set", s)]
    assert main(argv + ["--out", str(tmp_path / "vs-base")]) == 0
    report = json.loads((tmp_path / "vs-base" / "report.json").read_text())
    base, erased = report["results"]["base"]["coco-6"], report["results"]["erased"]["coco-6"]
    # without real images the base column is the reference: FD 0 to itself, > 0 for the changed model
    assert base["fid"]["fd"] == 0.0 and erased["fid"]["fd"] > 0 and erased["fid"]["features"] == "dinov2"
    assert 0 < base["clip"]["images"] == 6 and -1 <= base["clip"]["clip_cosine"] <= 1
    assert report["clip_model"]["model"] == str(tiny_clip)
    # against real images: statistics computed once, then read from the cache
    argv += ["--set", f"eval.fid_reference={real}"]
    assert main(argv + ["--out", str(tmp_path / "vs-real")]) == 0
    first = json.loads((tmp_path / "vs-real" / "report.json").read_text())["results"]
    assert first["base"]["coco-6"]["fid"]["reference_stats_cached"] is False
    assert first["erased"]["coco-6"]["fid"]["reference_stats_cached"] is True
    assert len(list((tmp_path / "stats").glob("coco-6-dinov2-*.npz"))) == 1
    fds = {c: first[c]["coco-6"]["fid"]["fd"] for c in ("base", "erased")}
    assert all(v > 0 for v in fds.values()) and fds["base"] != fds["erased"]
    md = (tmp_path / "vs-real" / "report.md").read_text()
    assert "6 images in" in md and "CLIP torchmetrics" in md and "CLIP per-image x100" in md
    # the FID's convention is named, and it says why it is not the paper's
    fid = first["erased"]["coco-6"]["fid"]
    assert fid["images"] == 6 and "center crop" in fid["resize"]
    assert fid["paper_note"].startswith("not comparable with the paper's FID")
    assert "dinov2 features" in fid["paper_note"]
    assert "not comparable with the paper's FID" in md and "resize:" in md
    assert "the base column's images as the reference" in erased["fid"]["paper_note"]


@pytest.fixture(scope="module")
def tiny_resnet(tmp_path_factory):
    """A tiny ResNetForImageClassification with the 1000 ImageNet outputs, saved as a transformers directory."""
    from transformers import ResNetConfig, ResNetForImageClassification

    path = tmp_path_factory.mktemp("resnet") / "resnet-50"
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=1000)).save_pretrained(path)
    return path


def test_resnet_directory_through_transformers_top_k(tiny_resnet):
    from transformers import ResNetForImageClassification

    from ear_dist.data.classifiers import ClassifierError, _imagenet_batch, build_classifier

    images = (np.random.default_rng(4).random((4, 64, 80, 3)) * 255).astype(np.uint8)
    model = ResNetForImageClassification.from_pretrained(tiny_resnet).eval()
    with torch.no_grad():
        top5 = model(pixel_values=_imagenet_batch(images)).logits.topk(5, dim=-1).indices
    outside = next(i for i in range(1000) if i not in top5[1].tolist())
    ids = {"church": [int(top5[0, 3])], "castle": [outside]}
    clf = build_classifier("resnet50", path=str(tiny_resnet), class_ids=ids, top_k=5)
    found = clf.detect(images[:2], ["church", "castle"])
    assert found[0].present and found[0].label == str(ids["church"][0])
    assert not found[1].present
    assert not build_classifier("resnet50", path=str(tiny_resnet), class_ids=ids, top_k=1).detect(
        images[:1], ["church"])[0].present  # 4th most likely is not in the top 1
    assert clf.describe() == {"classifier": "resnet50", "model": str(tiny_resnet), "top_k": 5, "class_ids": ids}
    with pytest.raises(ClassifierError, match="out of range"):
        build_classifier("resnet50", path=str(tiny_resnet), class_ids={"church": [1000]})


def test_perplexity_equals_the_language_model_loss(tiny_bundle):
    from ear_dist.eval.metrics.perplexity import perplexity

    texts = ["a church at night", "the old red barn in a big field by the sea", "a dog"]
    got = perplexity(tiny_bundle, texts, batch_size=2)
    tok = tiny_bundle.tokenizer
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:  # one text at a time: no padding, transformers' own shifted loss
            ids = tok([t], return_tensors="pt")["input_ids"]
            nll += float(tiny_bundle.model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert got["tokens"] == n and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
