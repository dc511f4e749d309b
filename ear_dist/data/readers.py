"""Readers for the prompt files users bring, all producing ``PromptPair`` records.

Formats (``data.format``; ``auto`` picks one from the extension and the keys/header):

- ``ear-json``: a JSON list of objects, either
  ``original_prompt, modified_prompt, concept, replaced`` (EAR church pairs),
  ``unsafe_prompt, safe_prompt, concept, category`` (EAR nudity pairs), or
  ``prompt`` only (EAR test prompt lists; the surrogate stays empty).
- ``ear-csv``: CSV with columns ``unsafe_prompt, safe_prompt`` (EAR Van Gogh pairs).
- ``copro-json``: CoPro (Latent Guard): a JSON object whose keys ``ID_train_data``,
  ``ID_valid_data``, ``ID_test_data``, ``OOD_valid_data``, ``OOD_test_data`` each hold a
  list of ``unsafe_prompt, safe_prompt, concept, category`` objects.
- ``copro-csv``: CoProv2 CSV: ``unsafe_prompt, safe_prompt`` plus ``concept`` and/or
  ``category`` columns.
- ``sixcd``: evaluation CSV ``case_number, evaluation_seed, prompt`` (Six-CD, EAR test
  CSVs; extra columns such as ``artist`` are kept in ``extra``).
- ``coco``: COCO-30k prompt CSV ``image_id, source, prompt, evaluation_seed, width, height``.
- ``jsonl``: one ``PromptPair.to_dict()`` object per line (what ``ear-dist`` writes).
- ``shards``: a directory written by ``ear-dist data build`` (all pairs, in order;
  training streams shards through ``ear_dist.data.shards`` instead).
- ``hf``: a Hugging Face dataset from local files: a ``save_to_disk`` directory, a
  ``.parquet`` or ``.arrow`` file; columns as in any schema above.

Malformed input raises ``PairReadError`` naming the file, row and field; with
``on_error="skip"`` the row is skipped and counted in the ``ReadReport`` instead.
"""

from __future__ import annotations

import csv
import io
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

from ear_dist.config.schema import PairsFormat
from ear_dist.data.pairs import PromptPair
from ear_dist.errors import InputError

FORMATS = typing.get_args(PairsFormat)  # the values of data.format
COPRO_SPLITS = ("ID_train_data", "ID_valid_data", "ID_test_data", "OOD_valid_data", "OOD_test_data")

_SURROGATE_ESCAPE = re.compile("[\udc80-\udcff]")


class PairReadError(InputError, ValueError):
    """A prompt file that cannot be used; the message names file, row and field."""


class _FieldError(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field_name = field_name


@dataclass
class ReadReport:
    """What a read did: rows read and kept, and each skipped row with its reason."""

    read: int = 0
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    format: str = ""

    def skip(self, message: str) -> None:
        self.skipped += 1
        self.skip_reasons.append(message)


# --------------------------------------------------------------------------- row schemas


def _text(row: dict, name: str, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise _FieldError(name, "field is missing")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise _FieldError(name, f"expected a string, got {type(value).__name__} {value!r}")
    if _SURROGATE_ESCAPE.search(value):
        raise _FieldError(name, "not valid UTF-8 text")
    value = value.strip()
    if required and not value:
        raise _FieldError(name, "empty prompt")
    return value


def _int(row: dict, name: str, default: int = -1) -> int:
    value = row.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise _FieldError(name, f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise _FieldError(name, f"expected an integer, got {value!r}") from None


def _pair_from_original_modified(row: dict, source: str, concept: str) -> PromptPair:
    return PromptPair(
        target=_text(row, "original_prompt"),
        surrogate=_text(row, "modified_prompt"),
        concept=_text(row, "concept", required=False) or concept,
        surrogate_concept=_text(row, "replaced", required=False),
        category=_text(row, "category", required=False),
        source=source,
    )


def _pair_from_unsafe_safe(row: dict, source: str, concept: str) -> PromptPair:
    return PromptPair(
        target=_text(row, "unsafe_prompt"),
        surrogate=_text(row, "safe_prompt"),
        concept=_text(row, "concept", required=False) or concept,
        category=_text(row, "category", required=False),
        source=source,
    )


def _pair_from_prompt(row: dict, source: str, concept: str) -> PromptPair:
    """Evaluation prompt rows: the target is the prompt, the surrogate stays empty."""
    known = {"prompt", "evaluation_seed", "case_number", "image_id", "concept", "category", ""}
    extra = {k: v for k, v in row.items() if k not in known and v not in (None, "")}
    case = row.get("case_number", row.get("image_id"))
    pair = PromptPair(
        target=_text(row, "prompt"),
        concept=_text(row, "concept", required=False) or concept,
        category=_text(row, "category", required=False),
        source=source,
        seed=_int(row, "evaluation_seed"),
        extra=extra,
    )
    if case not in (None, ""):
        pair.id = f"{Path(source.split(':', 1)[-1]).stem}-{str(case).strip()}"
    return pair


def _pair_from_schema(row: dict, source: str, concept: str) -> PromptPair:
    """Pick the row schema from its keys (used by JSON lists and HF datasets)."""
    if "target" in row:
        return PromptPair.from_dict({k: v for k, v in row.items() if v is not None})
    if "original_prompt" in row or "modified_prompt" in row:
        return _pair_from_original_modified(row, source, concept)
    if "unsafe_prompt" in row or "safe_prompt" in row:
        return _pair_from_unsafe_safe(row, source, concept)
    if "prompt" in row:
        return _pair_from_prompt(row, source, concept)
    raise _FieldError(
        "unsafe_prompt",
        "no prompt field: expected original_prompt/modified_prompt, unsafe_prompt/safe_prompt, "
        f"target/surrogate or prompt; got keys {', '.join(sorted(map(str, row)))}",
    )


# --------------------------------------------------------------------------- decoding


def _decode(path: Path, raw: bytes, on_error: str) -> str:
    """UTF-8 with an optional BOM; bad bytes fail here, or are kept as escapes for per-row skips."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        if on_error != "skip":
            raise PairReadError(
                f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                "save the file as UTF-8"
            ) from None
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        # rows holding the bad bytes are skipped one by one, naming their field
        return raw.decode("utf-8", errors="surrogateescape")


def _rows_to_pairs(
    rows: Iterable[tuple[str, Any]],
    make: Callable[[dict, str, str], PromptPair],
    path: Path,
    source: str,
    concept: str,
    on_error: str,
    report: ReadReport,
) -> list[PromptPair]:
    pairs = []
    for where, row in rows:
        try:
            if isinstance(row, PairReadError):
                raise row
            if not isinstance(row, dict):
                raise _FieldError("", f"expected an object, got {type(row).__name__}")
            pair = make(row, source, concept)
        except _FieldError as e:
            where_field = f"field '{e.field_name}': " if e.field_name else ""
            message = f"{path}: {where}: {where_field}{e}"
            if on_error == "skip":
                report.skip(message)
                continue
            raise PairReadError(message) from None
        except PairReadError as e:
            if on_error == "skip":
                report.skip(str(e))
                continue
            raise
        except ValueError as e:  # PromptPair.from_dict already names the field
            message = f"{path}: {where}: {e}"
            if on_error == "skip":
                report.skip(message)
                continue
            raise PairReadError(message) from None
        pairs.append(pair)
        report.read += 1
    return pairs


def _load_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PairReadError(f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}") from None


def _csv_rows(path: Path, text: str, required: tuple[str, ...], on_error: str) -> Iterator[tuple[str, Any]]:
    """Yield ("row N (line L)", dict) per record; quoted fields may hold commas, quotes, newlines."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise PairReadError(f"{path}: empty file; expected a header row with {', '.join(required)}") from None
    except csv.Error as e:
        raise PairReadError(f"{path}: line 1: malformed CSV header: {e}") from None
    header = [h.strip() for h in header]
    missing = [c for c in required if c not in header]
    if missing:
        raise PairReadError(
            f"{path}: header: missing column(s) {', '.join(missing)} (found: {', '.join(header)})"
        )
    row_number = 0
    while True:
        start_line = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # an unterminated quote swallows the rest of the file; nothing after it can be trusted
            raise PairReadError(f"{path}: row {row_number + 1} (line {start_line}): malformed CSV: {e}") from None
        if not record or all(not cell.strip() for cell in record):
            continue
        row_number += 1
        where = f"row {row_number} (line {start_line})"
        if len(record) != len(header):
            yield where, PairReadError(
                f"{path}: {where}: expected {len(header)} columns ({', '.join(header)}), got {len(record)}"
            )
            continue
        yield where, dict(zip(header, record))


def _json_list_rows(path: Path, items: Any, what: str = "") -> Iterator[tuple[str, Any]]:
    if not isinstance(items, list):
        raise PairReadError(f"{path}: {what or 'top level'}: expected a JSON list of objects, got {type(items).__name__}")
    for i, item in enumerate(items):
        yield (f"{what}[{i}]" if what else f"row {i + 1}"), item


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, PairReadError(f"{path}: {where} column {e.colno}: invalid JSON: {e.msg}")


# --------------------------------------------------------------------------- formats


def detect_format(path: Union[str, Path]) -> str:
    """Guess the format from the extension and the first keys/header; raise if unsure."""
    p = Path(path)
    if p.is_dir():
        if (p / "index.json").exists():
            return "shards"
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "hf"
        raise PairReadError(f"{p}: a directory that is not a Hugging Face save_to_disk dataset; give a file")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return "hf"
    if suffix == ".jsonl":
        return "jsonl"
    head = p.read_bytes()[:65536].decode("utf-8-sig", errors="replace")
    if suffix == ".json":
        stripped = head.lstrip()
        if stripped.startswith("{"):
            return "copro-json"
        return "ear-json"
    if suffix in (".csv", ".tsv"):
        header_line = head.splitlines()[0] if head else ""
        columns = {c.strip().strip('"') for c in next(csv.reader([header_line]), [])}
        if {"unsafe_prompt", "safe_prompt"} <= columns:
            return "copro-csv" if columns & {"concept", "category"} else "ear-csv"
        if "image_id" in columns and "prompt" in columns:
            return "coco"
        if "prompt" in columns:
            return "sixcd"
        raise PairReadError(
            f"{p}: header: cannot tell the format from columns {', '.join(sorted(columns))}; "
            "set data.format (one of " + ", ".join(FORMATS[1:]) + ")"
        )
    raise PairReadError(f"{p}: cannot tell the format from the extension {suffix!r}; set data.format")


def read_pairs(
    path: Union[str, Path],
    format: str = "auto",
    on_error: str = "fail",
    concept: str = "",
    report: Optional[ReadReport] = None,
) -> list[PromptPair]:
    """Read one prompt file into pairs.

    ``concept`` fills pairs whose file carries no concept column (EAR CSV, Six-CD, COCO).
    ``on_error``: ``fail`` raises ``PairReadError`` at the first bad row; ``skip`` drops it and
    records the reason in ``report``.
    """
    p = Path(path)
    if format not in FORMATS:
        raise PairReadError(f"{p}: unknown format {format!r} (one of {', '.join(FORMATS)})")
    if on_error not in ("fail", "skip"):
        raise PairReadError(f"on_error must be fail or skip, got {on_error!r}")
    if not p.exists():
        raise PairReadError(f"{p}: file not found")
    from ear_dist.paths import check_input_file

    check_input_file(p, "pairs file")
    report = report if report is not None else ReadReport()
    fmt = detect_format(p) if format == "auto" else format
    report.format = fmt
    source = f"{fmt}:{p.name}"
    if fmt == "hf":
        return _read_hf(p, source, concept, on_error, report)
    if fmt == "shards":
        from ear_dist.data.shards import ShardDataset, ShardError

        try:
            pairs = list(ShardDataset(p, shuffle=False, on_corrupt=on_error))
        except ShardError as e:
            raise PairReadError(str(e)) from None
        for pair in pairs:
            for name in ("surrogate_tokens", "target_tokens"):
                tokens = getattr(pair, name)
                if tokens is not None:
                    setattr(pair, name, tokens.tolist())
        report.read += len(pairs)
        return pairs
    text = _decode(p, p.read_bytes(), on_error)

    def convert(rows, make):
        return _rows_to_pairs(rows, make, p, source, concept, on_error, report)

    if fmt == "ear-json":
        return convert(_json_list_rows(p, _load_json(p, text)), _pair_from_schema)
    if fmt == "copro-json":
        data = _load_json(p, text)
        if not isinstance(data, dict):
            raise PairReadError(f"{p}: top level: expected a JSON object with keys {', '.join(COPRO_SPLITS)}")
        splits = [k for k in COPRO_SPLITS if k in data]
        if not splits:
            raise PairReadError(
                f"{p}: top level: none of the CoPro keys {', '.join(COPRO_SPLITS)} (found: {', '.join(sorted(data))})"
            )
        pairs = []
        for split in splits:
            split_pairs = convert(_json_list_rows(p, data[split], split), _pair_from_unsafe_safe)
            for pair in split_pairs:
                pair.extra["split"] = split
            pairs.extend(split_pairs)
        return pairs
    if fmt == "ear-csv":
        return convert(_csv_rows(p, text, ("unsafe_prompt", "safe_prompt"), on_error), _pair_from_unsafe_safe)
    if fmt == "copro-csv":
        return convert(_csv_rows(p, text, ("unsafe_prompt", "safe_prompt"), on_error), _pair_from_unsafe_safe)
    if fmt == "sixcd":
        return convert(_csv_rows(p, text, ("prompt", "evaluation_seed"), on_error), _pair_from_prompt)
    if fmt == "coco":
        return convert(_csv_rows(p, text, ("image_id", "prompt", "evaluation_seed"), on_error), _pair_from_prompt)
    if fmt == "jsonl":
        return convert(_jsonl_rows(p, text), lambda row, source, concept: PromptPair.from_dict(row))
    raise PairReadError(f"{p}: format {fmt!r} has no reader")


def _read_hf(p: Path, source: str, concept: str, on_error: str, report: ReadReport) -> list[PromptPair]:
    """Local Hugging Face data only: load_from_disk directories, parquet or arrow files."""
    try:
        import datasets
    except ImportError:
        raise PairReadError(f"{p}: reading Hugging Face datasets needs the 'datasets' package (pip install datasets)") from None
    try:
        if p.is_dir():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise PairReadError(f"{p}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
                ds = ds["train"]
        elif p.suffix.lower() == ".parquet":
            ds = datasets.Dataset.from_parquet(str(p))
        else:
            ds = datasets.Dataset.from_file(str(p))
    except PairReadError:
        raise
    except Exception as e:
        raise PairReadError(f"{p}: cannot load as a Hugging Face dataset: {e}") from None
    rows = ((f"row {i + 1}", row) for i, row in enumerate(ds))
    return _rows_to_pairs(rows, _pair_from_schema, p, source, concept, on_error, report)


def write_jsonl(pairs: Iterable[PromptPair], path: Union[str, Path]) -> int:
    """Write pairs in the ``jsonl`` format; returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------- attack prompt files

# the layouts of the public attack prompt releases, told apart by their columns (first match wins):
# name, the column that marks it, the prompt column
ATTACK_LAYOUTS = (
    ("ring-a-bell", "sensitive prompt", "sensitive prompt"),  # Ring-A-Bell: sensitive prompt, normal prompt
    ("mma-diffusion", "adv_prompt", "adv_prompt"),  # MMA-Diffusion: target_prompt, adv_prompt, sanitized_adv_prompt, ...
    ("unlearndiff", "evaluation_guidance", "prompt"),  # UnlearnDiffAtk: prompt, evaluation_seed, evaluation_guidance
    ("i2p", "sd_seed", "prompt"),  # I2P: prompt, categories, nudity_percentage, sd_seed, sd_guidance_scale, ...
    ("i2p", "sd_guidance_scale", "prompt"),
    ("i2p", "nudity_percentage", "prompt"),
)
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")  # the first present gives a prompt's seed
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale", "guidance")


def attack_layout(columns) -> tuple[str, str]:
    """(layout name, prompt column) of an attack prompt file from its column names; a plain ``prompt`` file is
    ``prompts``; raises PairReadError-free ValueError when no prompt column is known."""
    columns = set(columns)
    for name, marker, prompt in ATTACK_LAYOUTS:
        if marker in columns and prompt in columns:
            return name, prompt
    if "prompt" in columns:
        return "prompts", "prompt"
    raise ValueError("no prompt column: expected one of 'sensitive prompt' (Ring-A-Bell), 'adv_prompt' "
                     "(MMA-Diffusion) or 'prompt' (I2P, UnlearnDiff, a prompt list)")


def _float(row: dict, name: str) -> Optional[float]:
    value = row.get(name)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise _FieldError(name, f"expected a number, got {value!r}") from None


def _categories(value) -> set[str]:
    if isinstance(value, list):
        return {str(v).strip().lower() for v in value}
    return {c.strip().lower() for c in str(value or "").split(",") if c.strip()}


def read_attack_prompts(path: Union[str, Path], column: str = "", categories: Iterable[str] = (),
                        min_nudity_percentage: Optional[float] = None) -> tuple[str, list[PromptPair]]:
    """(layout, prompts) of an attack prompt file as its public release lays it out (``ATTACK_LAYOUTS``; CSV or a
    JSON list of objects): each prompt keeps the file's seed (``evaluation_seed``, else I2P's ``sd_seed``; -1
    none) and its guidance scale in ``extra["guidance"]`` (``evaluation_guidance``, else ``sd_guidance_scale``);
    the other columns stay in ``extra``. ``column`` picks another prompt column (MMA-Diffusion's
    ``sanitized_adv_prompt``); ``categories`` keeps rows of any of these I2P categories; ``min_nudity_percentage``
    keeps rows whose ``nudity_percentage`` is at least that."""
    p = Path(path)
    if not p.is_file():
        raise PairReadError(f"{p}: file not found")
    from ear_dist.paths import check_input_file

    check_input_file(p, "attack prompt file")
    text = _decode(p, p.read_bytes(), "fail")
    if p.suffix.lower() == ".json":
        data = _load_json(p, text)
        rows = list(_json_list_rows(p, data))
        first = next((r for _, r in rows if isinstance(r, dict)), {})
        columns = list(first)
    elif p.suffix.lower() in (".csv", ".tsv"):
        rows = list(_csv_rows(p, text, (), "fail"))
        header = next(csv.reader(io.StringIO(text, newline="")), [])
        columns = [h.strip() for h in header]
    else:
        raise PairReadError(f"{p}: an attack prompt file is a CSV or a JSON list of objects (got {p.suffix!r})")
    try:
        layout, prompt_column = attack_layout(columns)
    except ValueError as e:
        raise PairReadError(f"{p}: header: {e} (found: {', '.join(map(str, columns))})") from None
    if column:
        if column not in columns:
            raise PairReadError(f"{p}: header: no column {column!r} (found: {', '.join(map(str, columns))})")
        prompt_column = column
    wanted = {c.strip().lower() for c in categories}
    if wanted and "categories" not in columns:
        raise PairReadError(f"{p}: header: no 'categories' column to select {', '.join(sorted(wanted))} from")
    if min_nudity_percentage is not None and "nudity_percentage" not in columns:
        raise PairReadError(f"{p}: header: no 'nudity_percentage' column for min_nudity_percentage")
    seed_column = next((c for c in SEED_COLUMNS if c in columns), "")
    guidance_column = next((c for c in GUIDANCE_COLUMNS if c in columns), "")
    out = []
    for where, row in rows:
        if isinstance(row, PairReadError):
            raise row
        try:
            if not isinstance(row, dict):
                raise _FieldError("", f"expected an object, got {type(row).__name__}")
            if wanted and not (_categories(row.get("categories")) & wanted):
                continue
            if min_nudity_percentage is not None:
                nudity = _float(row, "nudity_percentage")
                if nudity is None or nudity < min_nudity_percentage:
                    continue
            prompt = _text(row, prompt_column)
            seed = _int(row, seed_column) if seed_column else -1
            guidance = _float(row, guidance_column) if guidance_column else None
            if guidance is not None and guidance <= 0:
                raise _FieldError(guidance_column, f"a guidance scale must be positive, got {guidance}")
        except _FieldError as e:
            where_field = f"field '{e.field_name}': " if e.field_name else ""
            raise PairReadError(f"{p}: {where}: {where_field}{e}") from None
        extra = {k: v for k, v in row.items() if k not in (prompt_column, seed_column, guidance_column, "")
                 and v not in (None, "")}
        if guidance is not None:
            extra["guidance"] = guidance
        out.append(PromptPair(target=prompt, source=f"{layout}:{p.name}", seed=seed,
                              category=str(row.get("categories") or ""), extra=extra))
    return layout, out
