"""Local data files: JSON, JSONL, CSV/TSV and Parquet, mapped to :class:`Record` by column.

Every error names the file, the row or line, and what was wrong; a missing column lists the columns
that *are* there. Rows are yielded with a location label ("line 7", "row 3") so the mapping code and the
hub-schema filters in :mod:`fedsafe.data.hub` report positions the same way whatever the format.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DataError
from ..io import json_error_reason
from .records import KINDS, Record

# Tried in order (case-insensitive) when no column is named. "Behavior" is HarmBench's,
# "forbidden_prompt" StrongREJECT's, "goal"/"target" AdvBench's.
INSTRUCTION_COLUMNS = ("instruction", "prompt", "goal", "forbidden_prompt", "question", "behavior", "query", "user")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion", "target", "assistant")

Row = tuple[str, dict[str, Any]]  # (location label, row)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet"}


def expand_path(path: str | Path) -> Path:
    """``Path(path).expanduser()``, but '~user' with no such user is a DataError, not a RuntimeError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # "Could not determine home directory"
        raise DataError(f"{path}: file not found (cannot expand {str(path).split('/', 1)[0]!r})") from None


def iter_rows(path: str | Path) -> Iterator[Row]:
    """Rows of a data file with a human-readable location for error messages."""
    path = expand_path(path)
    try:
        is_file = path.is_file()
    except OSError as e:  # e.g. a name over NAME_MAX
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not is_file:
        raise DataError(f"{path}: " + ("is a directory, not a data file" if path.is_dir() else "file not found"))
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; supported: {', '.join(sorted(FORMATS))}")
    if fmt == "jsonl":
        yield from _jsonl_rows(path)
    elif fmt == "json":
        yield from _json_rows(path)
    elif fmt in ("csv", "tsv"):
        yield from _csv_rows(path, "\t" if fmt == "tsv" else ",")
    else:
        yield from _parquet_rows(path)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # permissions, a file removed since the check, ...
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    text = _read_text(path)
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        except (ValueError, RecursionError) as e:  # 4300+ digit integer, very deep nesting
            raise DataError(f"{path}, line {lineno}: {json_error_reason(e)}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield f"line {lineno}", obj


def _json_rows(path: Path) -> Iterator[Row]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # 4300+ digit integer, very deep nesting (no position known)
        raise DataError(f"{path}: {json_error_reason(e)}") from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]}: accept exactly one list-valued key
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON array of objects (or an object with one list), got keys {sorted(data)}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        if not isinstance(obj, dict):
            raise DataError(f"{path}, item {i}: expected an object, got {type(obj).__name__}")
        yield f"item {i}", obj


def _csv_rows(path: Path, delimiter: str) -> Iterator[Row]:
    try:
        # -sig: an Excel-exported CSV starts with a BOM, which would otherwise stick to the first header
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if not reader.fieldnames:
                raise DataError(f"{path}: empty file (no header row)")
            start = reader.line_num + 1
            for i, row in enumerate(reader, 1):
                loc = f"row {i} (line {start})"
                start = reader.line_num + 1
                if None in row:
                    raise DataError(f"{path}, {loc}: more fields than the {len(reader.fieldnames)} header columns")
                if any(v is None for v in row.values()):
                    raise DataError(f"{path}, {loc}: fewer fields than the {len(reader.fieldnames)} header columns")
                yield loc, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            i += 1
            yield f"row {i}", row


# ---------------------------------------------------------------- column mapping


def pick_column(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str | None:
    """The named column (must exist), else the first auto-detected candidate, else None."""
    cols = list(columns)
    if wanted:
        if wanted in cols:
            return wanted
        lower = {c.lower(): c for c in cols}
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise DataError(f"{where}: no {what} column {wanted!r}; columns present: {', '.join(map(str, cols)) or '(none)'}")
    lower = {str(c).lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def rows_to_records(
    rows: Iterable[Row],
    where: str,
    source: str,
    instruction_col: str | None = None,
    response_col: str | None = None,
    kind: str | None = None,
    input_col: str | None = None,
    limit: int | None = None,
) -> list[Record]:
    """Map rows to records by column, validating every row.

    Without ``kind``, rows are ``normal`` when a response column exists and ``prompt`` otherwise.
    An AdvBench-style (goal, target) file is read as prompts: its target is an affirmative opening
    ("Sure, here is ..."), not a response. An Alpaca-style non-empty ``input`` is appended to the
    instruction.
    """
    if kind is not None and kind not in KINDS:
        raise DataError(f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    limit = parse_limit(limit, "limit", where)
    out: list[Record] = []
    icol = rcol = xcol = None
    first = True
    for loc, row in rows:
        if first:
            cols = list(row)
            icol = pick_column(cols, instruction_col, INSTRUCTION_COLUMNS, "instruction", where)
            if icol is None:
                raise DataError(
                    f"{where}: no instruction column found (tried {', '.join(INSTRUCTION_COLUMNS)}); "
                    f"columns present: {', '.join(map(str, cols))}. Name one with instruction_col=..."
                )
            rcol = pick_column(cols, response_col, RESPONSE_COLUMNS, "response", where)
            if rcol is not None and response_col is None and icol.lower() == "goal" and rcol.lower() == "target" and kind is None:
                rcol = None
            xcol = pick_column(cols, input_col, ("input",), "input", where) if input_col is not None or "input" in cols else None
            if kind is None:
                kind = "normal" if rcol is not None else "prompt"
            if kind != "prompt" and rcol is None:
                raise DataError(f"{where}: kind {kind!r} needs a response column; columns present: {', '.join(map(str, cols))}")
            first = False
        instr = _text_cell(row, icol, where, loc)
        if xcol is not None and row.get(xcol):
            instr = f"{instr}\n\n{_text_cell(row, xcol, where, loc)}"
        resp = _text_cell(row, rcol, where, loc) if rcol is not None else ""
        try:
            out.append(Record(instr.strip(), resp.strip(), kind, source, {"row": loc}))
        except DataError as e:
            raise DataError(f"{where}, {loc}: {str(e).split(': ', 1)[-1]}") from None
        if limit is not None and len(out) >= limit:
            break
    if first:
        raise DataError(f"{where}: no rows")
    return out


def parse_limit(value: Any, what: str, where: str) -> int | None:
    """An optional count option (``?limit=5000`` arrives as text): None, '' or 'none' for no limit,
    else a whole number >= 1. Zero is refused rather than read as "no limit" or "one record"."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):  # 'abc', NaN, inf
        n = 0
    if isinstance(value, bool) or n < 1 or (isinstance(value, float) and not value.is_integer()):
        raise DataError(f"{where}: {what} must be a whole number >= 1, got {value!r}")
    return n


def _text_cell(row: dict, col: str, where: str, loc: str) -> str:
    if col not in row:
        raise DataError(f"{where}, {loc}: missing column {col!r}; columns present: {', '.join(map(str, row))}")
    v = row[col]
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}, {loc}: column {col!r} should be text, got {type(v).__name__}")
    return v


def load_file(
    path: str | Path,
    instruction_col: str | None = None,
    response_col: str | None = None,
    kind: str | None = None,
    input_col: str | None = None,
    source: str | None = None,
    limit: int | str | None = None,
) -> list[Record]:
    """Records from a local file by column mapping (see :func:`rows_to_records`).

    The record source defaults to ``file:<file name>``: ids stay stable when the file moves.
    """
    p = expand_path(path)
    return rows_to_records(iter_rows(p), str(p), source or f"file:{p.name}", instruction_col, response_col, kind,
                           input_col, limit)
