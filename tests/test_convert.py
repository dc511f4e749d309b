"""``ear-dist convert``: ear-dist's side of running transformers' Janus converter.

transformers' ``convert_janus_weights_to_hf.py`` is in none of its wheels or sdists, so
it cannot be installed here; these tests run ``ear-dist convert`` with a stand-in module
of the same interface (``convert_model``, ``ensure_model_downloaded``) passed through
``--converter``, as a user passes the real file. They check what ear-dist adds: the
converter gets the local directory and never its download step, torch's default dtype
survives the converter's ``set_default_dtype(float16)``, the result is loaded back
(tokenizer check included) before it is moved into place, and every refusal names the fix.
"""

import json
import re
import textwrap

import pytest
import torch

from ear_dist.cli import main
from ear_dist.models.janus.convert import ConvertError, convert, find_converter
from ear_dist.models.janus import load_janus

STAND_IN = textwrap.dedent('''
    """Stand-in for transformers' convert_janus_weights_to_hf.py (same entry points)."""
    import json
    from pathlib import Path

    import torch

    CALLS = []

    def ensure_model_downloaded(repo_id=None, revision=None, local_dir=None):
        raise RuntimeError("the converter tried to reach the Hub")

    def convert_model(repo_id=None, local_dir=None, text_model_id=None, output_dir=None, output_hub_path=None,
                      safe_serialization=True, revision=None):
        import sys
        sys.path.insert(0, {root!r})
        from tests.real_format import break_tokenizer_like_sentencepiece, save_real_format_checkpoint

        input_path = ensure_model_downloaded(repo_id=repo_id, revision=revision, local_dir=local_dir)
        torch.set_default_dtype(torch.float16)  # as the real converter does
        config = json.load(open(input_path + "/config.json"))
        if config.get("fail"):
            (Path(output_dir) / "half-written.safetensors").parent.mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "half-written.safetensors").write_text("partial")
            raise KeyError("model.vision.weight")
        save_real_format_checkpoint(output_dir, seed=config["seed"])
        if config.get("break_tokenizer"):
            break_tokenizer_like_sentencepiece(output_dir)
        CALLS.append({{"input_path": input_path, "output_dir": output_dir}})
''')


@pytest.fixture()
def stand_in(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "convert_janus_weights_to_hf.py"
    path.write_text(STAND_IN.format(root=str(root)))
    return path


def _original(directory, **config):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "multi_modality", "language_config": {},
                                                       "gen_head_config": {}, "seed": 0, **config}))
    torch.save({}, directory / "pytorch_model.bin")
    return directory


def test_convert_runs_the_converter_on_the_local_files_and_checks_the_result(tmp_path, stand_in):
    source = _original(tmp_path / "Janus-Pro-tiny")
    assert main(["convert", "--from", str(source), "--out", str(tmp_path / "hf"), "--converter", str(stand_in)]) == 0
    assert torch.get_default_dtype() == torch.float32
    bundle = load_janus(str(tmp_path / "hf"), device="cpu")
    assert bundle.prompt_format.template.startswith("<|User|>: ")
    assert not list(tmp_path.glob(".hf*"))


def test_a_conversion_that_breaks_the_tokenizer_is_not_moved_into_place(tmp_path, stand_in):
    source = _original(tmp_path / "orig", break_tokenizer=True)
    with pytest.raises(ConvertError, match=r"does not load .*spaces or newlines are lost.*left in .*\.hf\.tmp"):
        convert(source, tmp_path / "hf", converter=str(stand_in))
    assert not (tmp_path / "hf").exists()


def test_a_converter_that_raises_is_one_line_and_leaves_no_temp_directory(tmp_path, stand_in, capsys):
    source = _original(tmp_path / "orig", fail=True)
    assert main(["convert", "--from", str(source), "--out", str(tmp_path / "hf"), "--converter", str(stand_in)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.match(r"ear-dist: error: .*convert_janus_weights_to_hf\.py: the converter failed on .*orig: KeyError: "
                    r"'model\.vision\.weight'$", err[-1]), err
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_janus_weights_to_hf.py", "orig"]


def test_convert_never_writes_over_its_source_or_a_foreign_directory(tmp_path, stand_in, capsys):
    source = _original(tmp_path / "orig")
    before = sorted(p.name for p in source.iterdir())
    assert main(["convert", "--from", str(source), "--out", str(source), "--converter", str(stand_in),
                 "--overwrite"]) == 2
    assert "is the source checkpoint" in capsys.readouterr().err
    assert main(["convert", "--from", str(source), "--out", str(tmp_path), "--converter", str(stand_in),
                 "--overwrite"]) == 2
    assert "contains the source checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == before
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert main(["convert", "--from", str(source), "--out", str(foreign), "--converter", str(stand_in)]) == 2
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep"
    assert main(["convert", "--from", str(source), "--out", str(foreign), "--converter", str(stand_in),
                 "--overwrite"]) == 0
    assert not (foreign / "notes.txt").exists() and (foreign / "config.json").is_file()
    assert main(["convert", "--from", str(source), "--out", str(foreign), "--converter", str(stand_in)]) == 0


def test_convert_refusals_name_the_fix(tmp_path, stand_in):
    with pytest.raises(ConvertError, match="wheels and sdists leave conversion scripts out.*--converter FILE"):
        find_converter()
    hf = load_janus("tiny")  # a transformers-format directory is refused, not converted again
    from ear_dist.models.janus import save_janus

    save_janus(hf, tmp_path / "already")
    with pytest.raises(ConvertError, match="already in the transformers format"):
        convert(tmp_path / "already", tmp_path / "out", converter=str(stand_in))
    no_weights = _original(tmp_path / "no-weights")
    (no_weights / "pytorch_model.bin").unlink()
    with pytest.raises(ConvertError, match="no pytorch_model"):
        convert(no_weights, tmp_path / "out", converter=str(stand_in))
    with pytest.raises(ConvertError, match="no such file"):
        convert(_original(tmp_path / "ok"), tmp_path / "out", converter=str(tmp_path / "missing.py"))
    assert main(["convert", "--from", str(tmp_path / "ok"), "--out", str(tmp_path / "out")]) == 2
