"""Prompt files in every format users bring read into pairs; bad files name file, row and field."""

import json

import pytest

from ear_dist.data.pairs import PromptPair
from ear_dist.data.readers import PairReadError, ReadReport, detect_format, read_pairs, write_jsonl


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


# --------------------------------------------------------------------------- each format


def test_ear_json_original_modified(tmp_path):
    f = write(tmp_path / "train_church.json", json.dumps([
        {"original_prompt": "The church at dusk.", "modified_prompt": "The cinema at dusk.", "concept": "church", "replaced": "cinema"},
        {"original_prompt": "A church, a hill.", "modified_prompt": "A barn, a hill.", "concept": "church", "replaced": "barn"},
    ]))
    report = ReadReport()
    pairs = read_pairs(f, report=report)
    assert report.format == "ear-json" and report.read == 2
    assert pairs[0].target == "The church at dusk." and pairs[0].surrogate == "The cinema at dusk."
    assert pairs[1].concept == "church" and pairs[1].surrogate_concept == "barn"


def test_ear_json_unsafe_safe_strips_whitespace(tmp_path):
    f = write(tmp_path / "nudity.json", json.dumps([
        {"unsafe_prompt": "a nude figure", "safe_prompt": "  a clothed figure", "concept": "nude", "category": "sexual"},
    ]))
    (pair,) = read_pairs(f)
    assert (pair.target, pair.surrogate, pair.concept, pair.category) == ("a nude figure", "a clothed figure", "nude", "sexual")


def test_ear_json_prompt_list_reads_as_evaluation_prompts(tmp_path):
    f = write(tmp_path / "test_church.json", json.dumps([{"prompt": "A church by a lake."}]))
    (pair,) = read_pairs(f, concept="church")
    assert pair.target == "A church by a lake." and pair.surrogate == "" and pair.concept == "church"


def test_ear_csv_takes_concept_from_argument(tmp_path):
    f = write(tmp_path / "vg.csv", "unsafe_prompt,safe_prompt\na cat in Van Gogh,a cat\na dog in Van Gogh,a dog\n")
    pairs = read_pairs(f, concept="Van Gogh")
    assert detect_format(f) == "ear-csv"
    assert [(p.target, p.surrogate, p.concept) for p in pairs] == [
        ("a cat in Van Gogh", "a cat", "Van Gogh"), ("a dog in Van Gogh", "a dog", "Van Gogh")]


def test_copro_json_reads_every_split(tmp_path):
    row = lambda i: {"unsafe_prompt": f"unsafe {i}", "safe_prompt": f"safe {i}", "concept": "gore", "category": "violence"}
    f = write(tmp_path / "CoPro_v1.0.json", json.dumps({
        "ID_train_data": [row(0), row(1)], "ID_test_data": [row(2)], "OOD_test_data": [row(3)],
    }))
    pairs = read_pairs(f)
    assert detect_format(f) == "copro-json"
    assert [p.target for p in pairs] == ["unsafe 0", "unsafe 1", "unsafe 2", "unsafe 3"]
    assert [p.extra["split"] for p in pairs] == ["ID_train_data", "ID_train_data", "ID_test_data", "OOD_test_data"]
    assert all(p.category == "violence" and p.concept == "gore" for p in pairs)


def test_copro_v2_csv(tmp_path):
    f = write(tmp_path / "coprov2.csv", "unsafe_prompt,safe_prompt,category,concept\nu one,s one,hate,slur\n")
    (pair,) = read_pairs(f)
    assert detect_format(f) == "copro-csv"
    assert (pair.target, pair.surrogate, pair.category, pair.concept) == ("u one", "s one", "hate", "slur")


def test_sixcd_csv_keeps_seed_case_and_extra_columns(tmp_path):
    f = write(tmp_path / "six.csv", ",case_number,prompt,evaluation_seed,artist\n0,7,\"A field, with cypresses\",2219,Vincent\n")
    (pair,) = read_pairs(f)
    assert detect_format(f) == "sixcd"
    assert pair.target == "A field, with cypresses" and pair.seed == 2219
    assert pair.id == "six-7" and pair.extra == {"artist": "Vincent"}


def test_coco_csv(tmp_path):
    f = write(tmp_path / "coco.csv", "image_id,source,prompt,evaluation_seed,width,height\n203564,coco-30k,A bicycle.,41337,400,400\n")
    (pair,) = read_pairs(f)
    assert detect_format(f) == "coco"
    assert (pair.target, pair.seed, pair.id) == ("A bicycle.", 41337, "coco-203564")


def test_jsonl_round_trip_keeps_tokens(tmp_path):
    pairs = [PromptPair("a church", "a barn", "church", "barn", seed=3, surrogate_tokens=[1, 2, 3]),
             PromptPair("the church", "the mill", "church")]
    f = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, f)
    back = read_pairs(f)
    assert [p.to_dict() for p in back] == [p.to_dict() for p in pairs]
    assert back[0].surrogate_tokens == [1, 2, 3] and back[1].surrogate_tokens is None


def test_hf_dataset_from_disk_and_parquet(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"unsafe_prompt": ["a church", "the church"], "safe_prompt": ["a barn", "the mill"],
                                     "concept": ["church", "church"], "category": ["object", "object"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    for path in (tmp_path / "hf", tmp_path / "pairs.parquet"):
        pairs = read_pairs(path)
        assert detect_format(path) == "hf"
        assert [(p.target, p.surrogate) for p in pairs] == [("a church", "a barn"), ("the church", "the mill")]


def test_explicit_format_overrides_detection(tmp_path):
    # a .txt file cannot be detected but reads fine when the format is named
    f = write(tmp_path / "pairs.txt", "unsafe_prompt,safe_prompt\na church,a barn\n")
    with pytest.raises(PairReadError, match="extension"):
        read_pairs(f)
    assert read_pairs(f, format="ear-csv")[0].surrogate == "a barn"


# --------------------------------------------------------------------------- malformed input


def test_bad_json_names_file_line_and_column(tmp_path):
    f = write(tmp_path / "bad.json", '[\n {"original_prompt": "a church",\n  "modified_prompt": }\n]')
    with pytest.raises(PairReadError, match=r"bad\.json: line 3 column 22: invalid JSON"):
        read_pairs(f)


def test_missing_field_names_row_and_field(tmp_path):
    f = write(tmp_path / "p.json", json.dumps([
        {"original_prompt": "a church", "modified_prompt": "a barn"},
        {"original_prompt": "the church"},
    ]))
    with pytest.raises(PairReadError, match=r"p\.json: row 2: field 'modified_prompt': field is missing"):
        read_pairs(f)


def test_empty_prompt_names_row_and_field(tmp_path):
    f = write(tmp_path / "p.csv", "unsafe_prompt,safe_prompt\na church,a barn\n   ,a mill\n")
    with pytest.raises(PairReadError, match=r"p\.csv: row 2 \(line 3\): field 'unsafe_prompt': empty prompt"):
        read_pairs(f)


def test_skip_mode_counts_and_explains_each_skip(tmp_path):
    f = write(tmp_path / "p.csv", "unsafe_prompt,safe_prompt\na church,a barn\n,a mill\nthe church,\nc,d,e\nok church,ok barn\n")
    report = ReadReport()
    pairs = read_pairs(f, on_error="skip", report=report)
    assert [p.target for p in pairs] == ["a church", "ok church"]
    assert report.read == 2 and report.skipped == 3
    assert "row 2 (line 3): field 'unsafe_prompt'" in report.skip_reasons[0]
    assert "row 3 (line 4): field 'safe_prompt'" in report.skip_reasons[1]
    assert "row 4 (line 5): expected 2 columns" in report.skip_reasons[2]


def test_non_utf8_fails_with_line_or_skips_the_row(tmp_path):
    raw = "unsafe_prompt,safe_prompt\na church,a barn\nthe caf\xe9 church,the caf\xe9\n".encode("latin-1")
    f = write(tmp_path / "latin.csv", raw)
    with pytest.raises(PairReadError, match=r"latin\.csv: line 3: not valid UTF-8"):
        read_pairs(f)
    report = ReadReport()
    pairs = read_pairs(f, on_error="skip", report=report)
    assert [p.target for p in pairs] == ["a church"]
    assert report.skipped == 1 and "row 2 (line 3): field 'unsafe_prompt': not valid UTF-8" in report.skip_reasons[0]


def test_csv_embedded_quotes_and_newlines_and_bom(tmp_path):
    text = '\ufeffunsafe_prompt,safe_prompt\n"a ""gothic"" church,\nat night","a barn"\nthe church,the mill\n'
    f = write(tmp_path / "q.csv", text)
    pairs = read_pairs(f, concept="church")
    assert detect_format(f) == "ear-csv"  # the BOM does not hide the header
    assert pairs[0].target == 'a "gothic" church,\nat night' and pairs[0].surrogate == "a barn"
    assert pairs[1].target == "the church"


def test_csv_unterminated_quote_names_row(tmp_path):
    f = write(tmp_path / "q.csv", 'unsafe_prompt,safe_prompt\na church,a barn\n"the church,the mill\n')
    with pytest.raises(PairReadError, match=r"q\.csv: row 2 \(line 3\): malformed CSV"):
        read_pairs(f)


def test_csv_missing_column_names_header(tmp_path):
    f = write(tmp_path / "h.csv", "case_number,prompt\n0,a church\n")
    with pytest.raises(PairReadError, match=r"h\.csv: header: missing column\(s\) evaluation_seed"):
        read_pairs(f, format="sixcd")


def test_bad_seed_names_field(tmp_path):
    f = write(tmp_path / "s.csv", "case_number,evaluation_seed,prompt\n0,twelve,a church\n")
    with pytest.raises(PairReadError, match=r"s\.csv: row 1 \(line 2\): field 'evaluation_seed': expected an integer"):
        read_pairs(f)


def test_jsonl_bad_line_and_unknown_field(tmp_path):
    f = write(tmp_path / "p.jsonl", '{"target": "a church", "concept": "church"}\n{"target": \n{"target": "x", "concept": "c", "colour": 1}\n')
    with pytest.raises(PairReadError, match=r"p\.jsonl: line 2 column \d+: invalid JSON"):
        read_pairs(f)
    report = ReadReport()
    pairs = read_pairs(f, on_error="skip", report=report)
    assert len(pairs) == 1 and report.skipped == 2
    assert "line 3: unknown field(s) colour" in report.skip_reasons[1]


def test_copro_json_wrong_top_level(tmp_path):
    f = write(tmp_path / "c.json", json.dumps({"train": []}))
    with pytest.raises(PairReadError, match=r"c\.json: top level: none of the CoPro keys"):
        read_pairs(f)
    f2 = write(tmp_path / "c2.json", json.dumps({"ID_train_data": [{"unsafe_prompt": "u", "safe_prompt": ""}]}))
    with pytest.raises(PairReadError, match=r"c2\.json: ID_train_data\[0\]: field 'safe_prompt': empty prompt"):
        read_pairs(f2)


def test_json_with_bom_reads(tmp_path):
    f = write(tmp_path / "bom.json", "\ufeff" + json.dumps([{"prompt": "a church"}]))
    assert read_pairs(f)[0].target == "a church"


def test_a_shard_directory_reads_as_pairs(tmp_path):
    from ear_dist.data.shards import write_shards

    pairs = [PromptPair(f"a church {i}", f"a barn {i}", "church", surrogate_tokens=[i, i + 1]) for i in range(5)]
    write_shards(pairs, tmp_path / "shards", max_samples_per_shard=2)
    assert detect_format(tmp_path / "shards") == "shards"
    back = read_pairs(tmp_path / "shards")
    assert [p.to_dict() for p in back] == [p.to_dict() for p in pairs]
    assert back[4].surrogate_tokens == [4, 5]
