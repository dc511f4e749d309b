"""The one config tree: what a user sees when a file or flag is wrong."""

import json

import pytest

from ear_dist.cli import main
from ear_dist.config import Config, ConfigError, load_config, save_config


def test_defaults_are_the_paper_settings():
    cfg = load_config()
    assert cfg.optim.lr == 1e-4 and cfg.optim.name == "adam"
    assert cfg.erase.erase_guidance == 1.0 and cfg.erase.loss_threshold == 0.05
    assert cfg.train.steps == 50 and cfg.train.pairs_per_step == 1 and cfg.trainable.first_k_layers == 5


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("erase:\n  window_len: 24\n  concept: van gogh\ntrain:\n  steps: 7\n")
    cfg = load_config([f], ["train.steps=9", "optim.betas=[0.8, 0.9]"])
    assert cfg.erase.window_len == 24 and cfg.erase.concept == "van gogh"
    assert cfg.train.steps == 9 and cfg.optim.betas == (0.8, 0.9)


def test_json_file_and_round_trip(tmp_path):
    cfg = load_config(overrides=["erase.concepts={church: {window_len: 48}}"])
    out = tmp_path / "saved.yaml"
    save_config(cfg, out)
    again = load_config([out])
    assert again == cfg and again.erase.concepts["church"].window_len == 48
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"model": {"path": "tiny"}}))
    assert load_config([j]).model.path == "tiny"


@pytest.mark.parametrize(
    "override, message",
    [
        ("erase.window_lenn=3", "erase.window_lenn: unknown key"),
        ("erase.window_len=abc", "erase.window_len: expected an integer"),
        ("erase.window_len=0", "erase.window_len: must be >= 1"),
        ("erase.update_mode=batch", "erase.update_mode: 'batch' is not one of"),
        ("train.tensorboard=maybe", "train.tensorboard: expected true/false"),
        ("optim.betas=[1]", "optim.betas: expected 2 items"),
        ("nosection.x=1", "nosection: unknown key"),
        ("erase.concepts={church: {window_len: -2}}", "erase.concepts.church.window_len: must be >= 1"),
        ("erase.concepts={church: {threshold: 1}}", "erase.concepts.church.threshold: unknown key"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config(overrides=[override])


def test_unparseable_file_names_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("erase: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: cannot parse"):
        load_config([f])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config([tmp_path / "missing.yaml"])


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    rc = main(["generate", "--prompt", "x", "--out", str(tmp_path), "--set", "rollout.guidance_weight=high"])
    assert rc == 2
    assert "rollout.guidance_weight: expected a number" in capsys.readouterr().err


def test_generate_command_writes_images(tmp_path, tiny_checkpoint):
    rc = main(["generate", "--model", str(tiny_checkpoint), "--prompt", "a church", "--prompt", "a barn",
               "--out", str(tmp_path), "--set", "rollout.batch_size=1"])
    assert rc == 0
    assert (tmp_path / "grid.png").is_file() and len(list(tmp_path.glob("0*.png"))) == 2
    rows = json.loads((tmp_path / "tokens.json").read_text())
    assert [r["prompt"] for r in rows] == ["a church", "a barn"] and len(rows[0]["tokens"]) == 16


def test_config_dataclass_has_one_section_per_area():
    assert set(Config().to_dict()) >= {"model", "rollout", "trainable", "erase", "optim", "data", "train", "dist"}
