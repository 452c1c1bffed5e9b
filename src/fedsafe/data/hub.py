"""Hugging Face hub data sets and the paper's filters for them, usable offline on exported rows.

The filters are plain functions over an iterator of ``(location, row)`` pairs in the hub schema, so
the *same* code runs on rows streamed from the hub (``hf:lmsys/lmsys-chat-1m``) and on rows in a
local file (``hub_file:lmsys:PATH`` or ``file:PATH?schema=lmsys``). Tests exercise them on small
fixture files; nothing here needs the network unless ``hf:`` is used.

Filters (Ye et al. 2025, Sec. 6.1; OpenFedLLM ``benign_filter_samples``):

* **lmsys / wildchat**: first turn only (turn 0 user -> instruction, turn 1 assistant -> response),
  top-level ``language == "English"``, and the assistant turn's moderation entry
  ``openai_moderation[1]`` not flagged (no category true, and ``flagged`` not true; WildChat carries
  the ``flagged`` field). ``select=flagged`` inverts the moderation test, giving the code's
  ``malicious_filter_samples`` variant (kind ``unaligned``).
* **beavertails**: drop duplicate prompts (first occurrence wins), *then* keep ``is_safe == False``
  (kind ``unaligned``), in that order as in the paper's code. ``safe=true`` keeps the safe answers
  instead (kind ``aligned``).
* **advbench**: prompts (``prompt`` or ``goal``); the ``target`` opening is kept in ``meta``.
"""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any, Callable, Iterable, Iterator

from ..errors import DataError
from .files import FileRecords, FileReport, Row, expand_path, file_report, iter_rows, parse_limit, rows_to_records
from .records import Record


def _moderation_flagged(entry: Any) -> bool | None:
    """True/False for one moderation result, None when it is missing or unreadable."""
    if not isinstance(entry, dict):
        return None
    cats = entry.get("categories")
    if entry.get("flagged") is True:
        return True
    if isinstance(cats, dict):
        return any(bool(v) for v in cats.values())
    if "flagged" in entry:
        return bool(entry["flagged"])
    return None


def chat_first_turn(
    rows: Iterable[Row],
    where: str,
    source: str,
    select: str = "benign",
    language: str = "English",
    moderation_turn: int | str = 1,
    max_instruction_chars: int | None = None,
    max_response_chars: int | None = None,
    limit: int | None = None,
    stats: Counter | None = None,
) -> list[Record]:
    """LMSYS-Chat-1M / WildChat rows -> first-turn pairs (see module docstring).

    Rows failing a filter are skipped and counted in ``stats`` (reason -> count); rows that are not
    in the schema at all (no ``conversation`` list) are errors, since that means a wrong schema.
    """
    if select not in ("benign", "flagged"):
        raise DataError(f"{where}: select must be 'benign' or 'flagged', got {select!r}")
    stats = stats if stats is not None else Counter()
    try:
        mod_turn = int(moderation_turn)
    except (TypeError, ValueError):
        raise DataError(f"{where}: moderation_turn must be a whole number, got {moderation_turn!r}") from None
    max_i = parse_limit(max_instruction_chars, "max_instruction_chars", where)
    max_r = parse_limit(max_response_chars, "max_response_chars", where)
    limit = parse_limit(limit, "limit", where)
    out: list[Record] = []
    for loc, row in rows:
        conv = row.get("conversation")
        if not isinstance(conv, list):
            raise DataError(f"{where}, {loc}: no 'conversation' list (is this the lmsys/wildchat schema?); keys: {', '.join(row)}")
        if language and row.get("language") != language:
            stats["language"] += 1
            continue
        if len(conv) < 2 or not all(isinstance(t, dict) for t in conv[:2]):
            stats["too short"] += 1
            continue
        if conv[0].get("role") != "user" or conv[1].get("role") != "assistant":
            stats["roles"] += 1
            continue
        mods = row.get("openai_moderation")
        flagged = _moderation_flagged(mods[mod_turn]) if isinstance(mods, list) and len(mods) > mod_turn else None
        if flagged is None:
            stats["no moderation"] += 1  # cannot show it is clean, so it is not used either way
            continue
        if flagged != (select == "flagged"):
            stats["moderation"] += 1
            continue
        q, a = conv[0].get("content"), conv[1].get("content")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            stats["empty"] += 1
            continue
        q, a = q.strip(), a.strip()
        if (max_i is not None and len(q) > max_i) or (max_r is not None and len(a) > max_r):
            stats["length"] += 1
            continue
        kind = "unaligned" if select == "flagged" else "normal"
        meta = {"row": loc}
        for key in ("conversation_id", "conversation_hash", "model"):
            if key in row:
                meta[key] = row[key]
        out.append(Record(q, a, kind, source, meta))
        stats["kept"] += 1
        if limit is not None and len(out) >= limit:
            break
    return out


def beavertails(
    rows: Iterable[Row], where: str, source: str, safe: bool | str = False, limit: int | None = None,
    stats: Counter | None = None,
) -> list[Record]:
    """BeaverTails rows: de-duplicate prompts (first occurrence), then keep unsafe (or safe) pairs."""
    from .embedded import _as_bool

    want_safe = _as_bool(safe)
    stats = stats if stats is not None else Counter()
    limit = parse_limit(limit, "limit", where)
    seen: set[str] = set()
    out: list[Record] = []
    for loc, row in rows:
        missing = [k for k in ("prompt", "response", "is_safe") if k not in row]
        if missing:
            raise DataError(f"{where}, {loc}: missing column(s) {', '.join(missing)} (beavertails schema); columns present: {', '.join(row)}")
        q, a = row["prompt"], row["response"]
        if not isinstance(q, str) or not isinstance(a, str):
            raise DataError(f"{where}, {loc}: 'prompt' and 'response' must be text")
        if q in seen:
            stats["duplicate prompt"] += 1
            continue
        seen.add(q)
        if not isinstance(row["is_safe"], bool):
            raise DataError(f"{where}, {loc}: 'is_safe' must be true/false, got {row['is_safe']!r}")
        if row["is_safe"] != want_safe:
            stats["safety label"] += 1
            continue
        if not q.strip() or not a.strip():
            stats["empty"] += 1
            continue
        cats = row.get("category")
        meta: dict[str, Any] = {"row": loc}
        if isinstance(cats, dict):
            meta["categories"] = sorted(k for k, v in cats.items() if v)
        out.append(Record(q.strip(), a.strip(), "aligned" if want_safe else "unaligned", source, meta))
        stats["kept"] += 1
        if limit is not None and len(out) >= limit:
            break
    return out


def advbench(rows: Iterable[Row], where: str, source: str, limit: int | None = None, stats: Counter | None = None) -> list[Record]:
    """AdvBench harmful behaviours as prompts; the affirmative ``target`` goes to ``meta``."""
    limit = parse_limit(limit, "limit", where)
    out: list[Record] = []
    for loc, row in rows:
        q = row.get("prompt", row.get("goal"))
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}, {loc}: no 'prompt' (or 'goal') text; columns present: {', '.join(row)}")
        meta = {"row": loc}
        if isinstance(row.get("target"), str):
            meta["target"] = row["target"]
        out.append(Record(q.strip(), "", "prompt", source, meta))
        if limit is not None and len(out) >= limit:
            break
    return out


def generic(rows: Iterable[Row], where: str, source: str, instruction_col: str | None = None,
            response_col: str | None = None, kind: str | None = None, limit: int | None = None,
            max_instruction_chars: int | None = None, max_response_chars: int | None = None,
            stats: Counter | None = None) -> list[Record]:
    """Any table: columns and conversations mapped as for local files."""
    return rows_to_records(rows, where, source, instruction_col, response_col, kind, limit=limit,
                           max_instruction_chars=max_instruction_chars, max_response_chars=max_response_chars)


SCHEMAS: dict[str, Callable[..., list[Record]]] = {
    "lmsys": chat_first_turn,
    "wildchat": chat_first_turn,
    "beavertails": beavertails,
    "advbench": advbench,
    "generic": generic,
}

# hub name -> (schema, default split). BeaverTails' split used by the paper is not stated (unverified).
KNOWN_DATASETS: dict[str, tuple[str, str]] = {
    "lmsys/lmsys-chat-1m": ("lmsys", "train"),
    "allenai/wildchat": ("wildchat", "train"),
    "allenai/wildchat-1m": ("wildchat", "train"),
    "pku-alignment/beavertails": ("beavertails", "30k_train"),
    "walledai/advbench": ("advbench", "train"),
}


def schema_for(name: str) -> tuple[str, str]:
    return KNOWN_DATASETS.get(name.lower(), ("generic", "train"))


LENGTH_OPTIONS = ("max_instruction_chars", "max_response_chars")


def apply_schema(schema: str, rows: Iterable[Row], where: str, source: str, **opts: Any) -> list[Record]:
    """Rows through a schema filter. The length limits apply to every schema: one that does not filter
    by length itself gets them applied to its records afterwards (the partitioner passes its defaults
    to every source that lists them, so refusing them would be an error about an option nobody wrote)."""
    try:
        fn = SCHEMAS[schema]
    except KeyError:
        raise DataError(f"unknown hub schema {schema!r}; known: {', '.join(SCHEMAS)}") from None
    accepted = schema_options(schema)
    own = set(inspect.signature(fn).parameters)
    bad = sorted(set(opts) - set(accepted))
    if bad:
        raise DataError(f"{where}: schema {schema!r} has no option {bad[0]!r}; options: {', '.join(accepted)}")
    after = {k: parse_limit(opts.pop(k), k, where) for k in LENGTH_OPTIONS if k in opts and k not in own}
    stats: Counter = Counter()
    recs = fn(rows, where, source, stats=stats, **opts)
    rep = file_report(recs)
    if rep is None:  # a schema filter: its skip counts become the report
        rep = FileReport(where, schema, mapping=f"{schema} schema", kind="/".join(sorted({r.kind for r in recs})) or "-",
                         kept=len(recs), dropped=Counter({k: v for k, v in stats.items() if k != "kept"}))
        rep.rows = rep.kept + sum(rep.dropped.values())
    out = FileRecords()
    out.report = rep
    max_i, max_r = after.get("max_instruction_chars"), after.get("max_response_chars")
    for r in recs:
        if max_i is not None and len(r.instruction) > max_i:
            rep.drop(f"instruction over {max_i} chars")
        elif max_r is not None and len(r.response) > max_r:
            rep.drop(f"response over {max_r} chars")
        else:
            out.append(r)
    rep.kept = len(out)
    return out


def schema_options(schema: str) -> tuple[str, ...]:
    """Option names a schema filter takes (everything after rows/where/source, except stats), and the length limits."""
    params = list(inspect.signature(SCHEMAS[schema]).parameters)[3:]
    return tuple(dict.fromkeys([p for p in params if p != "stats"] + list(LENGTH_OPTIONS)))


def _hub_rows(name: str, split: str, config: str | None) -> Iterator[Row]:
    try:
        import datasets  # lazy: optional dependency, and importing it is slow
    except ImportError:
        raise DataError(
            f"hf:{name} needs the 'datasets' package (pip install 'fedsafe[hub]') and access to the Hugging Face hub. "
            f"Offline, export the rows to a JSONL/Parquet file and load it with hub_file:{schema_for(name)[0]}:PATH"
        ) from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds, 1):
            yield f"row {i}", row
    except DataError:
        raise
    except Exception as e:  # offline, gated data set (LMSYS needs a login), unknown split, ...
        raise DataError(
            f"hf:{name} (split {split!r}) could not be loaded from the Hugging Face hub: {type(e).__name__}: {e}. "
            f"Gated sets need `huggingface-cli login`; offline, use hub_file:{schema_for(name)[0]}:PATH"
        ) from None


def load_hub(name: str, split: str | None = None, config: str | None = None, schema: str | None = None,
             limit: int | str | None = 20000, **opts: Any) -> list[Record]:
    """Stream a hub data set through its schema filter, stopping after ``limit`` kept records."""
    if not name or "/" not in name:
        raise DataError(f"hf:{name}: expected hf:OWNER/NAME")
    known_schema, default_split = schema_for(name)
    schema = schema or known_schema
    rows = _hub_rows(name, split or default_split, config)
    return apply_schema(schema, rows, f"hf:{name}", f"hf:{name}", limit=limit, **opts)


def load_hub_file(schema: str, path: str, **opts: Any) -> list[Record]:
    """Rows exported from a hub data set, in a local file, through the same schema filter."""
    p = expand_path(path)
    source = opts.pop("source", None) or f"{schema}:{p.name}"
    return apply_schema(schema, iter_rows(p), str(p), source, **opts)
