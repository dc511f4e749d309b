"""The synthetic world: deterministic data, a classifier that separates its concepts,
held-out sentence shapes that training never sees, images inside the codebook."""

import numpy as np
import pytest
from PIL import Image

from ear_dist.config import ConfigError, WorldConfig, load_config
from ear_dist.world import World
from ear_dist.world.classifier import all_concepts
from ear_dist.world.colour import code_palette, grid_to_image, save_comparison
from ear_dist.world.grammar import OBJECTS, STYLES, matching_templates


@pytest.fixture(scope="module")
def world():
    return World(WorldConfig(seed=0))


def test_same_seed_gives_byte_identical_prompts_and_images():
    a, b = World(WorldConfig(seed=7)), World(WorldConfig(seed=7))
    for split in ("all", "train", "heldout"):
        x, y = a.sample(200, split, stream=3), b.sample(200, split, stream=3)
        assert x.prompts == y.prompts
        assert [r.to_dict() for r in x.records] == [r.to_dict() for r in y.records]
        assert x.tokens.dtype == np.int64 and x.tokens.tobytes() == y.tokens.tobytes()
    assert a.classifier.thresholds == b.classifier.thresholds
    assert a.config_hash == b.config_hash


def test_different_seed_or_stream_gives_different_data():
    a, b = World(WorldConfig(seed=7)), World(WorldConfig(seed=8))
    x, y = a.sample(200, stream=3), b.sample(200, stream=3)
    assert x.prompts != y.prompts
    assert x.tokens.tobytes() != y.tokens.tobytes()
    assert a.config_hash != b.config_hash
    assert a.sample(50, stream=4).prompts != x.prompts[:50]
    # the same record drawn twice looks different: images vary, not only prompts
    rec = x.records[0]
    images = a.render([rec] * 20)
    assert len({img.tobytes() for img in images}) > 15


def test_classifier_separates_every_concept_synonym_and_style(world):
    # a fresh stream, not the calibration images
    batch = world.sample(3000, "all", stream=11)
    acc = world.accuracy(batch.tokens, batch.records)
    expected = set(all_concepts()) | {f"church ({w})" for w in OBJECTS["church"]}
    assert expected <= set(acc)
    low = {k: v for k, v in acc.items() if v < 0.98}
    assert not low, f"concepts under 0.98 balanced accuracy: {low}"
    # held-out sentence shapes render the same concepts
    held = world.sample(1500, "heldout", stream=12)
    acc_held = world.accuracy(held.tokens, held.records)
    assert min(acc_held.values()) >= 0.98, acc_held


def test_objects_stay_recognisable_under_every_style(world):
    for style in list(STYLES) + [None]:
        batch = world.sample(400, "all", stream=13, styles=[style])
        acc = world.accuracy(batch.tokens, batch.records, concepts=list(OBJECTS))
        assert min(acc.values()) >= 0.98, (style, acc)
        if style:
            assert world.classify(batch.tokens)[style].mean() >= 0.98


def test_a_few_stray_object_codes_are_not_an_object(world):
    # the classifier wants a compact patch: stray church codes on a barn image do not make a church
    batch = world.sample(300, "all", stream=14, objects=["barn"], styles=[None])
    church_codes = world.layout.codes("church")
    rng = np.random.default_rng(0)
    stray = batch.tokens.copy()
    for row in stray:
        cells = rng.choice(len(row), size=3, replace=False)
        row[cells] = rng.choice(church_codes, size=3)
    predicted = world.classify(stray)
    assert predicted["church"].mean() == 0.0
    assert predicted["barn"].mean() >= 0.98
    # the same church codes shuffled over the grid score lower than the compact motif
    churches = world.sample(300, "all", stream=15, objects=["church"], styles=[None]).tokens
    scattered = np.stack([rng.permutation(t) for t in churches])
    compact_score = world.classifier.scores(churches)["church"].mean()
    assert world.classifier.scores(scattered)["church"].mean() < 0.7 * compact_score


def test_thresholds_are_calibrated_between_the_score_distributions(world):
    batch = world.sample(1000, "all", stream=15)
    scores = world.classifier.scores(batch.tokens)
    for concept, threshold in world.classifier.thresholds.items():
        truth = np.array([concept in (r.object, r.scene, r.style) for r in batch.records])
        assert scores[concept][~truth].max() < threshold <= scores[concept][truth].min(), concept


def test_heldout_templates_never_appear_in_the_train_split(world):
    train = world.sample(3000, "train", stream=21)
    held = world.sample(1500, "heldout", stream=22)
    for rec in train.records:
        ids = matching_templates(rec.prompt)
        assert ids and all(i.startswith("train/") for i in ids), (rec.prompt, ids)
        assert rec.object_word == OBJECTS[rec.object][0], rec.prompt  # no synonyms in training pairs
        assert not {"chapel", "cathedral"} & set(rec.prompt.split())
    for rec in held.records:
        ids = matching_templates(rec.prompt)
        assert ids and all(i.startswith("heldout/") for i in ids), (rec.prompt, ids)
    assert not set(train.prompts) & set(held.prompts)
    # the synonyms do appear in the held-out split and in the pretraining distribution
    for split, batch in (("heldout", held), ("all", world.sample(1500, "all", stream=23))):
        words = {r.object_word for r in batch.records}
        assert {"chapel", "cathedral"} <= words, split


def test_vocabulary_covers_every_prompt_word(world):
    vocab = set(world.vocabulary())
    assert vocab == {w.lower() for w in vocab}
    for split in ("all", "train", "heldout"):
        for prompt in world.sample(1000, split, stream=31).prompts:
            missing = set(prompt.lower().split()) - vocab
            assert not missing, (prompt, missing)


def test_replacing_an_attribute_gives_the_surrogate_prompt(world):
    rec = world.sample(1, "train", stream=41, objects=["church"], styles=["van gogh"]).records[0]
    barn = rec.replace(object="barn")
    assert "church" not in barn.prompt and "barn" in barn.prompt and barn.template == rec.template
    plain = rec.replace(style=None)
    assert "Van Gogh" not in plain.prompt and plain.prompt in rec.prompt


@pytest.mark.parametrize("side,codebook", [(4, 126), (6, 200), (8, 256), (12, 1000)])
def test_renderer_respects_grid_and_codebook_bounds(side, codebook):
    w = World(WorldConfig(seed=1, grid_side=side, codebook_size=codebook, calibration_samples=600))
    batch = w.sample(500, "all", stream=2)
    assert batch.tokens.shape == (500, side * side)
    assert batch.tokens.min() >= 0 and batch.tokens.max() < codebook
    assert min(w.accuracy(batch.tokens, batch.records).values()) >= 0.98


def test_bad_world_settings_and_tokens_fail_with_a_clear_message(world):
    with pytest.raises(ValueError, match="codebook_size=40 is too small"):
        World(WorldConfig(codebook_size=40))
    with pytest.raises(ConfigError, match="world.grid_side"):
        load_config(overrides=["world.grid_side=2"])
    tokens = world.sample(3, stream=51).tokens.copy()
    tokens[2, 5] = 256
    with pytest.raises(ValueError, match="sample 2, position 5 holds code 256"):
        world.classify(tokens)
    with pytest.raises(ValueError, match="split 'test'"):
        world.sample(2, "test")


def test_token_grids_render_as_labelled_png(world, tmp_path):
    palette = code_palette(world.layout)
    base_church = world.layout.codes("church", 0)
    gogh_church = world.layout.codes("church", 1 + list(STYLES).index("van gogh"))
    # a style changes the colour of the same group
    assert not np.array_equal(palette[base_church], palette[gogh_church])
    batch = world.sample(4, stream=61)
    img = grid_to_image(batch.tokens[0], world.layout, world.config.grid_side, cell_px=4)
    assert img.size == (32, 32)
    assert tuple(img.getpixel((1, 1))) == tuple(palette[batch.tokens[0][0]])
    path = save_comparison(
        tmp_path / "grid.png", [list(batch.tokens[:2]), list(batch.tokens[2:])], world.layout,
        world.config.grid_side, row_labels=["before", "after"], col_labels=["p0", "p1"],
    )
    with Image.open(path) as png:
        assert png.size[0] > 2 * 8 * 12 and png.size[1] > 2 * 8 * 12


def test_anchor_pairs_show_only_the_other_concepts(world):
    from ear_dist.world.erasure import interleave, make_anchor_pairs

    anchors = make_anchor_pairs(world, "church", 40)
    assert len(anchors) == 40 and all(a.is_anchor for a in anchors)
    words = OBJECTS["church"]
    assert not any(w in a.target.lower() for a in anchors for w in words)
    styled = make_anchor_pairs(world, "van gogh", 40)
    assert not any("van gogh" in a.target.lower() for a in styled)
    assert any("monet" in a.target.lower() for a in styled)
    assert make_anchor_pairs(world, "church", 0) == []
    mixed = interleave(["p0", "p1", "p2"], ["a0"])
    assert mixed == ["p0", "a0", "p1", "p2"]
