"""Local data files: JSON, JSONL, CSV/TSV and Parquet, mapped to :class:`Record` -- the one reader for
client data, defense pools, attack data and evaluation prompts (``fedsafe eval --bench FILE``).

Recognised without options (first row decides, names case-insensitive):

* columns: ``instruction`` [+ ``input``] -> ``output``/``response``, ``prompt`` -> ``completion``,
  ``question`` -> ``answer``, ``goal`` [+ ``target``] (AdvBench: read as prompts), StrongREJECT's
  ``forbidden_prompt``, HarmBench's ``Behavior``, MT-Bench's ``turns`` (first turn);
* conversations: ShareGPT ``conversations`` with ``from``/``value`` turns, OpenAI ``messages`` with
  ``role``/``content`` turns (leading system turns skipped; the first user turn and the reply to it);
* a ``kind`` column holding one of the record kinds (files written by ``fedsafe attack generate``).

``instruction_col=`` / ``response_col=`` / ``input_col=`` name unusual columns (a list-of-turns column
named by ``instruction_col`` is read as a conversation). Rows that are empty, or over the length
limits, are dropped and counted in a :class:`FileReport` (``fedsafe data inspect`` prints it); every
other problem is a :class:`DataError` naming the file, the row or line, and what was wrong.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DataError
from ..io import json_error_reason
from .records import KINDS, Record

# Tried in order (case-insensitive) when no column is named. "Behavior" is HarmBench's,
# "forbidden_prompt" StrongREJECT's, "goal"/"target" AdvBench's.
# "turns" is MT-Bench's (a list; its first turn is the prompt).
INSTRUCTION_COLUMNS = ("instruction", "prompt", "goal", "forbidden_prompt", "question", "behavior", "query", "user", "turns")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion", "target", "assistant")
CONVERSATION_COLUMNS = ("conversations", "messages", "conversation")
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant", "chatgpt", "bard", "bing", "model")
#: What the error for an unrecognised file lists.
ACCEPTED_MAPPINGS = ("instruction[/input]/output, instruction/response, prompt/completion, question/answer, goal/target, "
                     "conversations [{from, value}] (ShareGPT), messages [{role, content}] (OpenAI)")

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
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON Lines saved as .json
            yield from _jsonl_rows(path)
            return
        raise DataError(f"{path}, line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    except (ValueError, RecursionError) as e:  # 4300+ digit integer, very deep nesting (no position known)
        raise DataError(f"{path}: {json_error_reason(e)}") from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]}: one list-valued key, or one of the usual wrapper names
        lists = [k for k, v in data.items() if isinstance(v, list)]
        named = [k for k in ("data", "rows", "examples", "prompts", "train") if k in lists]
        if len(lists) != 1 and not named:
            raise DataError(f"{path}: expected a JSON array of objects (or an object with one list), got keys {sorted(data)}")
        data = data[lists[0] if len(lists) == 1 else named[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    for i, obj in enumerate(data, 1):
        if isinstance(obj, str):
            obj = {"prompt": obj}  # a plain list of prompts
        if not isinstance(obj, dict):
            raise DataError(f"{path}, item {i}: expected an object or a string, got {type(obj).__name__}")
        yield f"item {i}", obj


def _csv_rows(path: Path, delimiter: str) -> Iterator[Row]:
    try:
        # -sig: an Excel-exported CSV starts with a BOM, which would otherwise stick to the first header.
        # csv.reader (not DictReader) sees blank lines, so every record's first physical line is known,
        # even when a quoted field spans several lines.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header: list[str] | None = None
            end, i = 0, 0
            for rec in reader:
                start, end = end + 1, reader.line_num
                if not rec:
                    continue
                if header is None:
                    header = rec
                    continue
                i += 1
                loc = f"row {i} (line {start})"
                if len(rec) != len(header):
                    more = "more" if len(rec) > len(header) else "fewer"
                    raise DataError(f"{path}, {loc}: {more} fields than the {len(header)} header columns")
                yield loc, dict(zip(header, rec))
            if header is None:
                raise DataError(f"{path}: empty file (no header row)")
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
        lower = {str(c).lower(): c for c in cols}
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise DataError(f"{where}: no {what} column {wanted!r}; columns present: {', '.join(map(str, cols)) or '(none)'}")
    lower = {str(c).lower(): c for c in cols}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


@dataclass
class FileReport:
    """What a file loader recognised and how many rows it kept or dropped, and why."""

    path: str
    format: str
    mapping: str = ""
    kind: str = ""
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    def dropped_text(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.dropped.most_common())

    def line(self) -> str:
        """One line for ``fedsafe data inspect`` and error messages."""
        s = f"{self.path} ({self.format}): {self.mapping or '-'}, kind {self.kind or '-'}; {self.rows} row(s), kept {self.kept}"
        return s + (f", dropped {sum(self.dropped.values())} ({self.dropped_text()})" if self.dropped else "")

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "mapping": self.mapping, "kind": self.kind, "rows": self.rows,
                "kept": self.kept, "dropped": dict(self.dropped.most_common())}


class FileRecords(list):
    """The records of a file (a plain list) with the :class:`FileReport` of how they were read."""

    report: FileReport | None = None


def file_report(records: Any) -> FileReport | None:
    return getattr(records, "report", None)


@dataclass
class _Mapping:
    instruction: str | None = None  # column of the instruction (or of a conversation when ``conversation``)
    response: str | None = None
    input: str | None = None
    conversation: bool = False
    kind_col: str | None = None

    def describe(self, default_kind: str) -> str:
        if self.conversation:
            return f"conversation {self.instruction!r} (first user turn -> reply)"
        s = self.instruction + (f" + {self.input}" if self.input else "")
        return f"{s} -> {self.response}" if self.response else f"{s} (prompts)"


def _detect(cols: list, row: dict, instruction_col: str | None, response_col: str | None, input_col: str | None,
            kind: str | None, where: str) -> _Mapping:
    m = _Mapping()
    icol = pick_column(cols, instruction_col, INSTRUCTION_COLUMNS, "instruction", where)
    ccol = pick_column(cols, None, CONVERSATION_COLUMNS, "conversation", where) if instruction_col is None else None
    if icol is not None and instruction_col is not None and _is_turn_list(row.get(icol)):
        ccol, icol = icol, None  # instruction_col names a conversation column
    if icol is None and ccol is not None:
        m.instruction, m.conversation = ccol, True
    elif icol is None:
        raise DataError(
            f"{where}: no instruction/response fields recognised; columns present: {', '.join(map(str, cols)) or '(none)'}. "
            f"Accepted without options: {ACCEPTED_MAPPINGS}; otherwise name them with instruction_col=...&response_col=..."
        )
    else:
        m.instruction = icol
        m.response = pick_column(cols, response_col, RESPONSE_COLUMNS, "response", where)
        if m.response is not None and response_col is None and icol.lower() == "goal" and m.response.lower() == "target" and kind is None:
            m.response = None  # AdvBench's target is an affirmative opening ("Sure, here is"), not a response
        if input_col is not None or any(str(c).lower() == "input" for c in cols):
            m.input = pick_column(cols, input_col or "input", (), "input", where)
    if kind is None and "kind" in row and row["kind"] in KINDS:
        m.kind_col = "kind"
    return m


def _is_turn_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, dict) for t in v)


def _turn(t: dict) -> tuple[str, Any]:
    role = t.get("from", t.get("role"))
    text = t.get("value", t.get("content"))
    if isinstance(text, list):  # OpenAI multi-part content: [{"type": "text", "text": ...}, ...]
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict) and isinstance(p.get("text"), str))
    return str(role).lower(), text


def _first_exchange(conv: Any) -> tuple[Any, Any] | None:
    """(first user turn, the assistant reply to it or "") of a ShareGPT/OpenAI turn list; None if no user turn leads.
    A CSV or a flattened export holds the list as JSON text in the cell; that is read too."""
    if isinstance(conv, str) and conv.lstrip().startswith("["):
        try:
            conv = json.loads(conv)
        except (ValueError, RecursionError):
            return None
    if not _is_turn_list(conv):
        return None
    turns = [_turn(t) for t in conv]
    while turns and turns[0][0] == "system":
        turns = turns[1:]
    if not turns or turns[0][0] not in USER_ROLES:
        return None
    reply = turns[1][1] if len(turns) > 1 and turns[1][0] in ASSISTANT_ROLES else ""
    return turns[0][1], reply


def rows_to_records(
    rows: Iterable[Row],
    where: str,
    source: str,
    instruction_col: str | None = None,
    response_col: str | None = None,
    kind: str | None = None,
    input_col: str | None = None,
    limit: int | None = None,
    max_instruction_chars: int | str | None = None,
    max_response_chars: int | str | None = None,
    default_kind: str | None = None,
    report: FileReport | None = None,
) -> FileRecords:
    """Map rows to records (see the module docstring for what is recognised).

    Kind: ``kind`` if given, else a row's ``kind`` column, else ``default_kind`` (what the file is used
    for: the partitioner passes ``unaligned`` for a malicious group), else ``normal`` when there is a
    response and ``prompt`` when there is not. An Alpaca-style non-empty ``input`` is appended to the
    instruction. Empty rows and rows over the length limits are dropped and counted in the report.
    """
    for k in (kind, default_kind):
        if k is not None and k not in KINDS:
            raise DataError(f"{where}: unknown kind {k!r}; expected one of {', '.join(KINDS)}")
    limit = parse_limit(limit, "limit", where)
    max_i = parse_limit(max_instruction_chars, "max_instruction_chars", where)
    max_r = parse_limit(max_response_chars, "max_response_chars", where)
    rep = report if report is not None else FileReport(where, "rows")
    out = FileRecords()
    out.report = rep
    m: _Mapping | None = None
    file_kind = kind
    for loc, row in rows:
        if m is None:
            m = _detect(list(row), row, instruction_col, response_col, input_col, kind, where)
            if file_kind is None:
                has_response = m.conversation or m.response is not None
                file_kind = default_kind if default_kind is not None else ("normal" if has_response else "prompt")
                if file_kind != "prompt" and not has_response:
                    file_kind = "prompt"  # e.g. a malicious group given bare prompts: the check below says so
            if file_kind != "prompt" and not (m.conversation or m.response is not None):
                raise DataError(f"{where}: kind {file_kind!r} needs a response column; columns present: {', '.join(map(str, row))}. "
                                f"Name it with response_col=...")
            rep.mapping, rep.kind = m.describe(file_kind), file_kind + (" (or the row's 'kind')" if m.kind_col else "")
        rep.rows += 1
        if m.conversation:
            pair = _first_exchange(row.get(m.instruction))
            if pair is None:
                rep.drop("no leading user turn")
                continue
            instr, resp = _text(pair[0], m.instruction, where, loc), _text(pair[1], m.instruction, where, loc)
        else:
            instr = _text(row.get(m.instruction), m.instruction, where, loc)
            if m.input is not None and row.get(m.input):
                instr = f"{instr}\n\n{_text(row.get(m.input), m.input, where, loc)}"
            resp = _text(row.get(m.response), m.response, where, loc) if m.response is not None else ""
        rk = row.get(m.kind_col) if m.kind_col else None
        rk = rk if rk in KINDS else file_kind
        instr, resp = instr.strip(), resp.strip()
        if not instr:
            rep.drop("empty instruction")
            continue
        if rk != "prompt" and not resp:
            rep.drop("empty response")
            continue
        if max_i is not None and len(instr) > max_i:
            rep.drop(f"instruction over {max_i} chars")
            continue
        if max_r is not None and len(resp) > max_r:
            rep.drop(f"response over {max_r} chars")
            continue
        try:
            out.append(Record(instr, resp, rk, source, {"row": loc}))
        except DataError as e:
            raise DataError(f"{where}, {loc}: {str(e).split(': ', 1)[-1]}") from None
        rep.kept += 1
        if limit is not None and len(out) >= limit:
            break
    if m is None:
        raise DataError(f"{where}: no rows")
    if not out:
        raise DataError(f"{where}: no usable records: all {rep.rows} row(s) dropped ({rep.dropped_text()})")
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


def _text(v: Any, col: str, where: str, loc: str) -> str:
    """A cell as text: missing/None is empty (dropped and counted); MT-Bench ``turns`` gives its first turn."""
    if v is None:
        return ""
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        v = v[0]
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
    max_instruction_chars: int | str | None = None,
    max_response_chars: int | str | None = None,
    default_kind: str | None = None,
) -> FileRecords:
    """Records from a local file (see :func:`rows_to_records`); ``.report`` says what was read.

    The record source defaults to ``file:<file name>``: ids stay stable when the file moves.
    """
    p = expand_path(path)
    rep = FileReport(str(p), FORMATS.get(p.suffix.lower(), p.suffix))
    return rows_to_records(iter_rows(p), str(p), source or f"file:{p.name}", instruction_col, response_col, kind,
                           input_col, limit, max_instruction_chars, max_response_chars, default_kind, rep)
