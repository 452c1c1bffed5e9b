"""Load benchmark prompts (AdvBench, HarmBench, JailbreakBench, StrongREJECT, MT-Bench, ...) from local files.

Supported: ``.csv`` / ``.tsv`` (header row), ``.jsonl`` (one object per line) and ``.json`` (a list of
objects or strings, or an object with a ``data``/``rows``/``examples`` list). The prompt column is taken
from ``column=`` or auto-detected from the names the common benchmarks use:

* ``prompt`` (generic), ``goal`` (AdvBench ``harmful_behaviors.csv``, JailbreakBench), ``forbidden_prompt``
  (StrongREJECT), ``Behavior`` (HarmBench), ``instruction`` (Alpaca-style), ``question`` (SALAD-Bench,
  BeaverTails-Evaluation), and ``turns`` (MT-Bench; its first turn).

Every error names the file and, where it applies, the line (CSV/JSONL) or item (JSON).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import first_unencodable, json_error_reason

#: Auto-detection order; matched exactly first, then case-insensitively.
PROMPT_COLUMNS = ("prompt", "goal", "forbidden_prompt", "Behavior", "instruction", "question", "turns")


def load_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts in ``path``, in file order."""
    return [r["prompt"] for r in load_prompt_records(path, column)]


def load_prompt_records(path: str | Path, column: str | None = None) -> list[dict[str, Any]]:
    """Rows as dicts with ``prompt`` (the chosen column's text) and ``source`` ("file:line" or
    "file[item]"), plus all original fields under ``fields`` (for categories, ids, targets, ...)."""
    path = Path(path)
    try:
        is_file = path.is_file()
    except OSError as e:  # e.g. a name over NAME_MAX
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not is_file:
        raise DataError(f"{path}: " + ("is a directory, not a prompt file" if path.is_dir() else "file not found"))
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _read_csv(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    else:
        raise DataError(f"{path}: unsupported prompt file type {suffix!r} (use .csv, .tsv, .jsonl or .json)")
    if not rows:
        raise DataError(f"{path}: no rows")
    col = _pick_column(path, [r for _, r in rows], column)
    out = []
    for where, row in rows:
        if col not in row:
            raise DataError(f"{where}: missing column {col!r}")
        text = _as_text(row[col], col)
        if text is None:
            raise DataError(f"{where}: column {col!r} is not a non-empty string (got {row[col]!r:.80})")
        bad = first_unencodable(text)  # a "\ud800" JSON escape: generations could not be written as UTF-8
        if bad is not None:
            raise DataError(f"{where}: column {col!r} is not valid Unicode ({bad})")
        out.append({"prompt": text, "source": where, "fields": row})
    return out


def _as_text(value: Any, col: str) -> str | None:
    if col == "turns" and isinstance(value, list) and value:
        value = value[0]  # MT-Bench: the paper's MT-1 uses the first turn only
    if isinstance(value, str) and value.strip():
        return value
    return None


def _pick_column(path: Path, rows: list[dict], column: str | None) -> str:
    have: list[str] = []
    for r in rows:  # union of keys in first-seen order (JSON rows may differ)
        have.extend(k for k in r if k not in have)
    if column is not None:
        if column not in have:
            raise DataError(f"{path}: no column {column!r}; the file has columns: {', '.join(map(str, have))}")
        return column
    for cand in PROMPT_COLUMNS:
        if cand in have:
            return cand
    lower = {str(k).lower(): k for k in have}
    for cand in PROMPT_COLUMNS:
        if cand.lower() in lower:
            return lower[cand.lower()]
    raise DataError(
        f"{path}: cannot find a prompt column (looked for {', '.join(PROMPT_COLUMNS)}); "
        f"the file has columns: {', '.join(map(str, have))}; pass column=..."
    )


def _read_text(path: Path, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # permissions, a file removed since the check, ...
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_csv(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    text = _read_text(path, "utf-8-sig")  # -sig: Excel-exported CSVs start with a BOM
    # csv.reader (not DictReader) so blank lines are seen and every record's first physical line is known,
    # even when a quoted field spans several lines.
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    header: list[str] | None = None
    rows = []
    end = 0
    try:
        for rec in reader:
            start, end = end + 1, reader.line_num
            if not rec:
                continue
            if header is None:
                header = rec
                continue
            if len(rec) != len(header):
                raise DataError(f"{path}:{start}: {len(rec)} fields but the header has {len(header)}")
            rows.append((f"{path}:{start}", dict(zip(header, rec))))
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None
    if header is None:
        raise DataError(f"{path}: empty CSV (no header row)")
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    lines = _read_text(path).split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, 4300+ digit integer, very deep nesting
            raise DataError(f"{path}:{n}: {json_error_reason(e)}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        rows.append((f"{path}:{n}", obj))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    text = _read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # 4300+ digit integer, very deep nesting (no position known)
        raise DataError(f"{path}: {json_error_reason(e)}") from None
    if isinstance(obj, dict):
        for key in ("data", "rows", "examples", "prompts"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise DataError(f"{path}: expected a JSON list (or an object with a 'data' list)")
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON list, got {type(obj).__name__}")
    rows = []
    for i, item in enumerate(obj):
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict):
            raise DataError(f"{path}[{i}]: expected an object or string, got {type(item).__name__}")
        rows.append((f"{path}[{i}]", item))
    return rows
