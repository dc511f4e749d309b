"""`ear-dist data build` and `ear-dist data inspect` from the command line, end to end."""

import json

from ear_dist.cli import main
from ear_dist.data.shards import ShardDataset, read_index


def test_build_from_file_and_templates_then_inspect(tmp_path, capsys):
    pairs_file = tmp_path / "pairs.csv"
    pairs_file.write_text("unsafe_prompt,safe_prompt\na church at dusk,a barn at dusk\n,broken row\n")
    config = tmp_path / "data.yaml"
    config.write_text(
        "erase: {concept: church}\n"
        "data:\n"
        "  on_error: skip\n"
        "  ecg: {source: templates, templates: ['a {concept} in {place}'], surrogates: [barn, mill],\n"
        "        slots: {place: [snow, fog]}, num_pairs: 0}\n"
        "  shards: {max_samples_per_shard: 2}\n"
    )
    out = tmp_path / "shards"
    assert main(["data", "build", "--config", str(config), "--pairs", str(pairs_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "read 1 pairs" in printed and "skipped 1" in printed and "field 'unsafe_prompt': empty prompt" in printed
    index = read_index(out)
    assert index["total_samples"] == 5 and [s["samples"] for s in index["shards"]] == [2, 2, 1]
    assert index["concept_counts"] == {"church": 5}
    assert index["config"]["data"]["ecg"]["templates"] == ["a {concept} in {place}"]
    assert main(["data", "inspect", str(out), "--verify", "--show", "2"]) == 0
    printed = capsys.readouterr().out
    assert "5 pairs in 3 shards" in printed and "verified: 3 good, 0 bad" in printed
    assert "'a church at dusk' -> 'a barn at dusk'" in printed


def test_build_with_visual_filter_on_the_tiny_teacher(tmp_path, capsys, monkeypatch):
    (tmp_path / "first_half.py").write_text(
        "def detect(images, concepts):\n    return [i < len(images) // 2 for i in range(len(images))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"target": f"a church {i}", "surrogate": f"a barn {i}", "concept": "church"}) + "\n"
                                  for i in range(3)))
    out = tmp_path / "shards"
    rc = main(["data", "build", "--pairs", str(pairs_file), "--out", str(out), "--jsonl", str(tmp_path / "kept.jsonl"),
               "--set", "model.path=tiny", "--set", "data.vf.enabled=true", "--set", "data.vf.classifier=first_half:detect",
               "--set", "data.vf.batch_size=2", "--set", "data.vf.store_target_tokens=true"])
    assert rc == 0
    assert "visual filter: kept 3 of 3" in capsys.readouterr().out
    got = list(ShardDataset(out, shuffle=False))
    assert [p.target for p in got] == ["a church 0", "a church 1", "a church 2"]
    assert all(p.surrogate_tokens is not None and p.target_tokens is not None for p in got)
    assert [p.seed for p in got] == [0, 1, 2]
    from ear_dist.data.readers import read_pairs

    kept = read_pairs(tmp_path / "kept.jsonl")
    assert [p.surrogate_tokens for p in kept] == [p.surrogate_tokens.tolist() for p in got]


def test_build_without_pairs_and_inspect_of_a_bad_shard(tmp_path, capsys):
    assert main(["data", "build", "--out", str(tmp_path / "x")]) == 2
    assert "no pairs" in capsys.readouterr().err
    pairs_file = tmp_path / "p.csv"
    pairs_file.write_text("unsafe_prompt,safe_prompt\n" + "".join(f"a church {i},a barn {i}\n" for i in range(6)))
    out = tmp_path / "shards"
    assert main(["data", "build", "--pairs", str(pairs_file), "--out", str(out), "--set", "data.shards.max_samples_per_shard=3"]) == 0
    shard = out / "pairs-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert "BAD" in printed and "pairs-000001.tar: is 700 bytes" in printed and "verified: 1 good, 1 bad" in printed
    assert main(["data", "inspect", str(tmp_path / "nowhere")]) == 2
