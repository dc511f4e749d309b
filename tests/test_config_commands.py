"""`ear-dist config show/list`, the packaged example configs, `--version`, and the allowed
values a user sees: what breaks for a user if the config package regresses."""

import ast
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

import ear_dist
from ear_dist.cli import main, package_version
from ear_dist.config import Config, ConfigError, EraseConfig, example_configs, from_dict, load_config, recipe_files

PACKAGE = Path(ear_dist.__file__).parent


def _literal_keys(cls=Config, prefix=""):
    """(dotted key, allowed values) of every Literal field in the tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal:
            yield prefix + f.name, typing.get_args(tp)
        elif dataclasses.is_dataclass(tp):
            yield from _literal_keys(tp, f"{prefix}{f.name}.")


def _show(capsys, *argv):
    assert main(["config", "show", *argv]) == 0
    return capsys.readouterr().out


def test_a_bad_choice_names_the_key_and_the_allowed_values(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"^erase\.method: 'x' is not one of ear, svare, esd$"):
        load_config(overrides=["erase.method=x"])
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  shards:\n    mode: forever\n")
    with pytest.raises(ConfigError, match=r"data\.shards\.mode: 'forever' is not one of exact, resampled"):
        load_config([f])
    assert main(["config", "show", "--set", "slurm.launcher=ssh"]) == 2
    assert "slurm.launcher: 'ssh' is not one of torchrun, srun, mpi" in capsys.readouterr().err


@pytest.mark.parametrize("key, choices", list(_literal_keys()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_choice_key_refuses_other_values_and_accepts_its_own(key, choices):
    with pytest.raises(ConfigError, match=f"{key}: 'bogus' is not one of {', '.join(choices)}"):
        load_config(overrides=[f"{key}=bogus"])
    for choice in choices:
        load_config(overrides=[f"{key}={choice}"])


def test_a_choice_changed_in_python_is_refused_by_validate():
    cfg = load_config()
    cfg.erase.update_mode = "batch"
    with pytest.raises(ConfigError, match="erase.update_mode: 'batch' is not one of window, sequence"):
        cfg.validate()


def test_show_prints_yaml_that_loads_back_into_the_same_config(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("erase:\n  window_len: 24\n  concepts: {church: {window_len: 12}}\noptim:\n  betas: [0.8, 0.9]\n")
    overrides = ["train.steps=7", "slurm.extra_sbatch=[--account=abc, '#x']", "erase.method=svare"]
    out = _show(capsys, "--config", str(f), *[a for o in overrides for a in ("--set", o)])
    assert from_dict(Config, yaml.safe_load(out)) == load_config([f], overrides)
    saved = tmp_path / "shown.yaml"
    saved.write_text(out)
    assert load_config([saved]) == load_config([f], overrides)


def test_show_gives_each_key_its_help_and_the_allowed_values(capsys):
    lines = _show(capsys).splitlines()
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(EraseConfig)}
    at = lines.index("  loss_threshold: 0.05")
    assert lines[at - 1] == f"  # {help_of['loss_threshold']}"
    assert "  method: ear  # one of: ear, svare, esd" in lines


def test_show_defaults_ignores_files_and_overrides(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  steps: 3\n")
    out = _show(capsys, "--defaults", "--config", str(f), "--set", "erase.window_len=5")
    assert from_dict(Config, yaml.safe_load(out)) == Config()


@pytest.mark.parametrize("name, concept, window_len, fmt", [
    ("church", "church", 48, "ear-json"),
    ("van_gogh", "Van Gogh", 24, "ear-csv"),
    ("nudity", "nudity", 100, "copro-json"),
])
def test_examples_are_the_paper_settings_and_load_by_name(name, concept, window_len, fmt, capsys):
    cfg = load_config([name])  # validates
    assert (cfg.erase.concept, cfg.erase.window_len, cfg.data.format) == (concept, window_len, fmt)
    assert (cfg.optim.name, cfg.optim.lr, cfg.train.steps, cfg.train.pairs_per_step) == ("adam", 1e-4, 50, 1)
    assert (cfg.erase.erase_guidance, cfg.erase.loss_threshold) == (1.0, 0.05)
    assert (cfg.trainable.first_k_layers, cfg.trainable.modules) == (5, "all")
    assert cfg.data.pairs, "the pairs path is a placeholder the user replaces"
    assert load_config([example_configs()[name]]) == cfg
    shown = from_dict(Config, yaml.safe_load(_show(capsys, "--config", name)))
    assert shown == cfg


def test_config_list_names_every_example_with_a_description(capsys):
    assert main(["config", "list"]) == 0
    out = capsys.readouterr().out
    assert set(example_configs()) == {"church", "van_gogh", "nudity"}
    for name in example_configs():
        line = next(line for line in out.splitlines() if line.startswith(f"  {name} "))
        assert len(line.split(None, 1)[1]) > 20


def test_a_local_file_wins_over_an_example_and_a_missing_name_is_still_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("church").write_text("erase:\n  window_len: 7\n")
    assert load_config(["church"]).erase.window_len == 7
    with pytest.raises(ConfigError, match="config file not found: churhc .*church"):
        load_config(["churhc"])
    with pytest.raises(ConfigError, match="config file not found: runs/missing.yaml$"):
        load_config(["runs/missing.yaml"])


def test_setup_ships_the_examples_and_recipes_as_package_data():
    setup_py = (PACKAGE.parent / "setup.py").read_text()
    assert '"ear_dist.config": ["examples/*.yaml", "recipes/*.yaml"]' in setup_py
    assert all(p.parent == PACKAGE / "config" / "examples" for p in example_configs().values())
    assert all(p.parent == PACKAGE / "config" / "recipes" for p in recipe_files().values())


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ear-dist {package_version()}"
    assert package_version() == ear_dist.__version__


def test_no_module_imports_the_cli_back():
    # cli.py imports every command module; one importing cli back is a cycle.
    # __main__ is the `python -m ear_dist` entry point, which nothing imports.
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                package = list(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
                base = package[:len(package) - node.level + 1] if node.level else []  # from .. import cli
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if "ear_dist.cli" in names:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, f"modules importing ear_dist.cli: {offenders}"
