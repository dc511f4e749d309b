"""The visual filter keeps pairs whose target image shows the concept and whose surrogate does not."""


import numpy as np
import pytest
import torch

from ear_dist.data.pairs import PromptPair
from ear_dist.data.vf import (
    DROP_BOTH, DROP_SURROGATE_SHOWS, DROP_TARGET_MISSING, CallableClassifier, ClassifierError, Detection,
    HFImageClassifier, NudeNetClassifier, ResNet50Classifier, VisualFilter, build_classifier, teacher_functions,
)

T = 16  # image tokens per fake image


def fake_generate(calls):
    """Token row = 1 where the prompt names 'church', else 0; the seed rides in the last slot."""
    def generate(prompts, seeds):
        calls.append((list(prompts), list(seeds)))
        rows = [[1 if "church" in p else 0] * (T - 1) + [seed] for p, seed in zip(prompts, seeds)]
        return torch.tensor(rows, dtype=torch.long)
    return generate


def fake_decode(tokens):
    """A white 8x8 image for rows marked 1, black otherwise."""
    value = (tokens[:, 0] * 255).to(torch.uint8).numpy()
    return np.broadcast_to(value[:, None, None, None], (len(value), 8, 8, 3)).copy()


def bright(images, concepts):
    return [float(img.mean()) / 255.0 for img in images]


def test_filter_keeps_good_pairs_and_counts_why_others_drop():
    pairs = [
        PromptPair("a church on a hill", "a barn on a hill", "church"),          # kept
        PromptPair("a mill on a hill", "a barn on a hill", "church"),            # target lacks it
        PromptPair("a church at dawn", "a church hall at dawn", "church"),       # surrogate shows it
        PromptPair("a mill at dawn", "a church at dawn", "church"),              # both wrong
        PromptPair("the church in snow", "the barn in snow", "church", seed=77), # kept, own seed
    ]
    calls = []
    vf = VisualFilter(fake_generate(calls), fake_decode, CallableClassifier(bright), batch_size=3,
                      store_target_tokens=True, base_seed=100)
    kept = vf.run(pairs)
    assert [p.target for p in kept] == ["a church on a hill", "the church in snow"]
    assert vf.report.total == 5 and vf.report.kept == 2
    assert vf.report.dropped == {DROP_TARGET_MISSING: 1, DROP_SURROGATE_SHOWS: 1, DROP_BOTH: 1}
    assert "kept 2 of 5" in vf.report.summary()
    # one rollout call per batch with targets then surrogates, the same seed for both prompts of a pair
    assert [len(prompts) for prompts, _ in calls] == [6, 4]
    assert calls[0][1] == [100, 101, 102, 100, 101, 102] and calls[1][1] == [103, 77, 103, 77]
    # tokens of the rollouts are stored on the kept pairs, with the seed that made them
    assert kept[0].seed == 100 and kept[0].surrogate_tokens == [0] * (T - 1) + [100]
    assert kept[0].target_tokens == [1] * (T - 1) + [100]
    assert kept[1].seed == 77 and kept[1].surrogate_tokens[-1] == 77


def test_filter_refuses_prompts_without_surrogate():
    vf = VisualFilter(fake_generate([]), fake_decode, CallableClassifier(bright))
    with pytest.raises(ValueError, match="has no surrogate prompt"):
        vf.run([PromptPair("a church", "", "church")])


def test_callable_plugin_from_module_spec(tmp_path, monkeypatch):
    (tmp_path / "my_detector.py").write_text(
        "def has_concept(images, concepts):\n    return [img.mean() > 100 for img in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    classifier = build_classifier("my_detector:has_concept")
    images = np.stack([np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)])
    assert [d.present for d in classifier.detect(images, ["x", "x"])] == [True, False]
    detections = CallableClassifier(lambda imgs, cs: [Detection(True, 0.9, "x"), 0.2]).detect(images, ["x", "x"])
    assert [(d.present, d.score) for d in detections] == [(True, 0.9), (False, 0.2)]  # floats meet the 0.5 threshold
    with pytest.raises(ClassifierError, match="cannot import"):
        build_classifier("no_such_module_here:f")
    with pytest.raises(ClassifierError, match="expected nudenet, resnet50, hf or module:function"):
        build_classifier("nonsense")


class StubDetector:
    def __init__(self, results):
        self.results = results
        self.seen = None

    def detect_batch(self, images, batch_size=4):
        self.seen = images
        return self.results


def test_nudenet_plugin_applies_class_list_and_threshold():
    stub = StubDetector([
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7, "box": [0, 0, 1, 1]}],
        [{"class": "FEET_EXPOSED", "score": 0.99, "box": [0, 0, 1, 1]}],   # not in the default list
        [{"class": "BUTTOCKS_EXPOSED", "score": 0.5, "box": [0, 0, 1, 1]}],  # under the threshold
    ])
    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[..., 0] = 255  # red in RGB
    found = NudeNetClassifier(threshold=0.6, detector=stub).detect(images, ["nudity"] * 3)
    assert [(d.present, d.label) for d in found] == [(True, "FEMALE_BREAST_EXPOSED"), (False, ""), (False, "BUTTOCKS_EXPOSED")]
    assert stub.seen[0][0, 0].tolist() == [0, 0, 255]  # handed over as BGR
    feet = NudeNetClassifier(classes=["FEET_EXPOSED"], threshold=0.6, detector=stub).detect(images, ["nudity"] * 3)
    assert [d.present for d in feet] == [False, True, False]


def test_nudenet_real_detector_runs_offline():
    classifier = build_classifier("nudenet", threshold=0.6)
    images = (np.random.RandomState(0).rand(2, 64, 64, 3) * 255).astype(np.uint8)
    found = classifier.detect(images, ["nudity", "nudity"])
    assert len(found) == 2 and all(not d.present for d in found)  # noise shows no body parts


class TinyImageNet(torch.nn.Module):
    """A stand-in with ResNet-50's interface: [B, 3, 224, 224] -> 1000 ImageNet logits."""

    def __init__(self, favourite):
        super().__init__()
        self.favourite = favourite

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 1000)
        # bright images vote for the favourite class, dark ones for class 0
        brightness = x.mean(dim=(1, 2, 3))
        logits[:, self.favourite] = brightness * 10
        logits[:, 0] = -brightness * 10
        return logits


def test_resnet50_plugin_logic_with_a_stand_in_model():
    classifier = ResNet50Classifier(TinyImageNet(497), {"church": [497, 498]}, top_k=1)
    images = np.stack([np.full((300, 400, 3), 240, np.uint8), np.full((300, 400, 3), 10, np.uint8)])
    found = classifier.detect(images, ["church", "church"])
    assert [d.present for d in found] == [True, False]
    assert found[0].label == "497" and 0 < found[0].score <= 1
    with pytest.raises(ClassifierError, match="no ImageNet ids for concept 'tench'"):
        classifier.detect(images[:1], ["tench"])


def test_resnet50_from_path_explains_what_is_missing(tmp_path):
    with pytest.raises(ClassifierError, match=r"resnet-50 does not exist; download microsoft/resnet-50"):
        build_classifier("resnet50", path=str(tmp_path / "resnet-50"), class_ids={"church": [497]})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClassifierError, match=r"empty: no config.json; download"):
        build_classifier("resnet50", path=str(tmp_path / "empty"), class_ids={"church": [497]})
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or the CPU torch's torchvision failing to load
        (tmp_path / "resnet50.pth").write_bytes(b"weights")
        with pytest.raises(ClassifierError, match="needs torchvision"):
            build_classifier("resnet50", path=str(tmp_path / "resnet50.pth"), class_ids={"church": [497]})
    else:
        torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
        classifier = build_classifier("resnet50", path=str(tmp_path / "resnet50.pth"), class_ids={"church": [497]})
        assert len(classifier.detect(np.zeros((1, 64, 64, 3), np.uint8), ["church"])) == 1


@pytest.fixture
def tiny_style_model(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, num_labels=3, id2label={0: "Van Gogh", 1: "Monet", 2: "photo"},
                       label2id={"Van Gogh": 0, "Monet": 1, "photo": 2})
    ViTForImageClassification(config).save_pretrained(tmp_path / "style")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "style")
    return str(tmp_path / "style")


def test_hf_plugin_from_a_local_tiny_model(tiny_style_model):
    images = (np.random.RandomState(1).rand(2, 40, 40, 3) * 255).astype(np.uint8)
    always = build_classifier("hf", path=tiny_style_model, threshold=0.0)
    found = always.detect(images, ["van gogh", "van gogh"])
    assert all(d.present and d.label == "Van Gogh" for d in found)
    never = HFImageClassifier(tiny_style_model, threshold=1.01)
    assert not any(d.present for d in never.detect(images, ["van gogh", "van gogh"]))
    # a concept mapped to every label has probability one
    grouped = HFImageClassifier(tiny_style_model, labels={"art": ["Van Gogh", "Monet", "photo"]}, threshold=0.999)
    assert all(abs(d.score - 1.0) < 1e-5 and d.present for d in grouped.detect(images, ["art", "art"]))
    with pytest.raises(ClassifierError, match="no label.*church.*set vf.labels"):
        always.detect(images[:1], ["church"])


def test_filter_with_the_tiny_teacher():
    from ear_dist.models.janus import load_janus
    from ear_dist.models.janus.rollout import rollout

    bundle = load_janus("tiny", device="cpu", dtype="float32")
    generate, decode = teacher_functions(bundle, guidance_weight=5.0, batch_size=4)
    seen = {}

    def spy(images, concepts):
        seen["shape"] = images.shape
        # target images (first half) "show" the concept, surrogate images do not
        return [i < len(images) // 2 for i in range(len(images))]

    pairs = [PromptPair("a church", "a barn", "church"), PromptPair("the church", "the mill", "church", seed=9)]
    vf = VisualFilter(generate, decode, CallableClassifier(spy), batch_size=2, base_seed=5)
    kept = vf.run(pairs)
    assert len(kept) == 2 and seen["shape"][0] == 4 and seen["shape"][-1] == 3
    assert len(kept[0].surrogate_tokens) == bundle.num_image_tokens
    # the stored tokens are what the teacher gives for that surrogate and seed
    again = rollout(bundle, ["the mill"], guidance_weight=5.0, seeds=[9])
    assert kept[1].surrogate_tokens == again[0].tolist()
    assert kept[0].seed == 5
