"""Property-based fuzzing of every input parser: configs, overrides, data files, JSONL, prompt files, CLI.

The contract under test: malformed *user input* ends in :class:`~fedsafe.errors.FedsafeError` (usually
its subclasses ``ConfigError`` / ``DataError``) or in success, never in any other exception; on the
command line that means exit code 2, a one-line message and no traceback.

Bounded for the default test run (``FEDSAFE_FUZZ_EXAMPLES``, default 40 examples per property, no
deadline). ``scripts/fuzz_long.py --examples 2000`` runs the same properties much longer.

The crashes this fuzzer found (RELIABILITY.md, "Bugs found") are fixed; ``REGRESSIONS`` at the end pins
each one to the clean error it gives now, and the random strategies no longer steer around them.
"""

from __future__ import annotations

import collections
import copy
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsafe.config import ALIASES, RunConfig, _read_yaml, load_config, parse_override, set_dotted
from fedsafe.errors import FedsafeError

EXAMPLES = int(os.environ.get("FEDSAFE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])

# ------------------------------------------------------------------------------------------ strategies

ODD_STRINGS = [
    "", " ", "\t\n", "\x00", "a\x00b", "\ufeff", "\u200b", "\u202e\u202dRTL", "e\u0301\u0301\u0301", "\U0001F600" * 3,
    "\u2028line\u2029", "\r\n", "\r", "%s%n{0}", "${HOME}", "../../../etc/passwd", "/", ".", "..", "NaN", "Infinity",
    "-0", "1e309", "0x10", "1_000", "yes", "no", "null", "~", "[", "]", "{", "}", "'", '"', "\\", ":", "?", "&", "#",
    "=", "==", "a=b=c", "file:", "aligned:", "aligned:aligned:", "hf:", "hub_file::", "tiny?", "tiny?a", "tiny?=1",
    "x" * 5000, "é" * 300, "中文テキスト", "\x7f\x1b[31m", "\ud800", "a\udfffb", "~nosuchuser_fedsafe/x.jsonl",
    "~/x.jsonl",
]
ODD_TEXT = st.one_of(st.sampled_from(ODD_STRINGS), st.text(max_size=40),
                     st.text(alphabet=st.characters(codec="utf-8"), max_size=20))  # lone surrogates: ODD_STRINGS
# Bounded: json.dumps cannot write integers over 4300 digits, so the data-file tests could not serialise
# them; reading such a number is pinned in REGRESSIONS.
INTS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**100]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, ODD_TEXT)
# JSON/YAML-like values; YAML mappings may have non-string keys (`1:`, `yes:`, `null:`).
MAP_KEYS = st.one_of(ODD_TEXT, ODD_TEXT, INTS, st.booleans(), st.none())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(MAP_KEYS, inner, max_size=4)), max_leaves=12)


def _dataclass_keys(cls, prefix="") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _dataclass_keys(hints[f.name], key + ".")
    return out


DOTTED = _dataclass_keys(RunConfig) + list(ALIASES) + ["data.groups.0.mix", "fl.aggregator_params.f", "base"]
KEYS = st.one_of(st.sampled_from(DOTTED), ODD_TEXT)
TINY_RAW = _read_yaml("tiny")[0]
YAML_SNIPPETS = ["[1, 2]", "{a: 1}", "{f: 1}", "[{clients: 1, mix: {tiny: 1.0}}]", "1.0e+400", "-.inf", ".nan", "~",
                 "null", "yes", "0x1F", "0o17", "1_000", "2001-12-14", "2001-12-14t21:59:43.10-05:00", "!!binary aGk=",
                 "!!python/object:os.system x", "&a [*a]", "&a {x: *a}", "'unterminated", "[1, [2, [3, [4]]]]",
                 "- a\n- b", "a: b: c", "|\n  block", ">-\n x", "!!set {a, b}", "!!omap [a: 1]", "? a", "*undefined",
                 "%YAML 1.1\n---\n1", "---\n1\n---\n2", "\t1"]
# Values that are valid somewhere, so a good share of examples gets past validation (and into the next check).
PLAUSIBLE = ["1", "2", "3", "0", "0.5", "1.0e-3", "true", "false", "cosine", "constant", "fedavg", "fedprox",
             "scaffold",
             "mean", "krum", "median", "trimmed_mean", "chat", "alpaca", "float32", "bf16", "none", "deltas", "weights",
             "stratified", "[q_proj, v_proj]", "all-linear", "tiny", "tiny-harmful", "aligned:tiny-harmful", "iid",
             "dirichlet", "{}", "sign_flip", "scale", "[{clients: 4, mix: {tiny: 1.0}}]"]

def _leaf_overrides() -> list[str]:
    """key=value for every scalar field: its tiny-preset value, nearby numbers, or another allowed choice."""
    import yaml

    from fedsafe.config import CHOICES, dump_yaml

    out: list[str] = []

    def walk(prefix, obj):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, bool):
                out.append(f"{key}={str(not v).lower()}")
            elif isinstance(v, int):
                out.extend([f"{key}={v}", f"{key}={v + 1}", f"{key}={max(v - 1, 0)}"])
            elif isinstance(v, float):
                out.extend([f"{key}={v!r}", f"{key}={v * 2!r}", f"{key}={v / 2!r}"])
            elif isinstance(v, str) and v:
                out.extend(f"{key}={c}" for c in CHOICES.get(key, (v,)))
    walk("", yaml.safe_load(dump_yaml(load_config("tiny"))))
    return out


LEAF_OVERRIDES = _leaf_overrides()
PLAUSIBLE_VALUES = st.sampled_from(PLAUSIBLE).map(lambda v: parse_override("k=" + v)[1])
OVERRIDE_VALUES = st.one_of(st.sampled_from(PLAUSIBLE), st.sampled_from(YAML_SNIPPETS), ODD_TEXT, INTS.map(str),
                            FLOATS.map(repr))


STATS: collections.Counter = collections.Counter()  # (property, outcome) -> count; read by scripts/fuzz_long.py
CURRENT = ["?"]


def _expect_user_error_or_success(fn, *args, **kw):
    try:
        out = fn(*args, **kw)
    except FedsafeError as e:
        assert str(e), "a user error needs a message"
        STATS[CURRENT[0], type(e).__name__] += 1
        return None
    STATS[CURRENT[0], "accepted"] += 1
    return out


# ------------------------------------------------------------------------------------------ config


@FUZZ
@given(raw=st.dictionaries(KEYS, VALUES, max_size=6))
def test_load_config_random_dict(raw):
    _expect_user_error_or_success(load_config, raw)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(DOTTED), st.one_of(PLAUSIBLE_VALUES, VALUES)), min_size=1, max_size=4))
def test_load_config_tiny_with_random_values_at_real_keys(edits):
    """Start from the valid tiny preset so random values get past key checks into coercion/validation."""
    raw = copy.deepcopy(TINY_RAW)
    for key, value in edits:
        set_dotted(raw, key, value)
    cfg = _expect_user_error_or_success(load_config, raw)
    if cfg is not None:
        assert isinstance(cfg, RunConfig)
        assert cfg.fl.rounds > 0 and cfg.fl.sample_clients <= cfg.num_clients


@FUZZ
@given(items=st.one_of(
    st.lists(st.sampled_from(LEAF_OVERRIDES), min_size=1, max_size=4),
    st.lists(st.one_of(st.sampled_from(LEAF_OVERRIDES),
                       st.tuples(st.sampled_from(DOTTED), st.sampled_from(PLAUSIBLE)).map("=".join),
                       st.tuples(KEYS, OVERRIDE_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}"), ODD_TEXT),
             min_size=1, max_size=4)))
def test_dotted_overrides(items):
    _expect_user_error_or_success(load_config, "tiny", items)


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.sampled_from(YAML_SNIPPETS),
                      st.dictionaries(st.sampled_from(["name", "seed", "fl", "data", "model", "lora", "base", "eval"]),
                                      VALUES, max_size=4).map(lambda d: json.dumps(d))))
def test_yaml_config_file(text):
    """A YAML file as the CONFIG argument (JSON is YAML too)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "cfg.yaml"
        p.write_text(text, encoding="utf-8")
        _expect_user_error_or_success(load_config, str(p))


# ------------------------------------------------------------------------------------------ data files

COLUMNS = ["instruction", "prompt", "goal", "target", "response", "output", "input", "kind", "Behavior", "question",
           "turns", "forbidden_prompt", "answer"]
COLS = st.one_of(st.sampled_from(COLUMNS), ODD_TEXT)
HUGE = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=3), st.integers(1, 70_000))
CELL = st.one_of(ODD_TEXT, HUGE, SCALARS, st.lists(ODD_TEXT, max_size=3))
GOOD_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), min_size=1, max_size=30)
# half plausible rows (text instruction + response, maybe extra columns), half anything
GOOD_ROW = st.fixed_dictionaries({"instruction": GOOD_TEXT, "response": st.one_of(GOOD_TEXT, HUGE)},
                                 optional={"input": st.one_of(GOOD_TEXT, st.just("")), "category": CELL})
ROWS = st.one_of(st.lists(GOOD_ROW, min_size=1, max_size=6),
                 st.lists(st.dictionaries(COLS, CELL, max_size=5), max_size=6))
OPTIONS = st.dictionaries(
    st.sampled_from(["instruction_col", "response_col", "kind", "input_col", "source", "limit", "schema", "nope"]),
    st.one_of(st.sampled_from(COLUMNS + ["normal", "prompt", "aligned", "unaligned", "lmsys", "generic", "0", "3",
                                         "-2", ""]), st.text(alphabet="abc_?=&", max_size=6)),
    max_size=3) | st.just({})


def _serialise(rows: list[dict], fmt: str) -> bytes:
    if fmt in ("jsonl", "ndjson"):
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "json":
        return json.dumps(rows).encode()
    buf = io.StringIO()
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["instruction"]
    w = csv.writer(buf, delimiter="\t" if fmt == "tsv" else ",")
    w.writerow(cols)
    for r in rows:
        w.writerow([r.get(c, "") for c in cols])
    return buf.getvalue().encode("utf-8", "surrogatepass")


def _spec(path: Path, options: dict) -> str:
    q = "&".join(f"{k}={v}" for k, v in options.items())
    return f"file:{path}" + (f"?{q}" if q else "")


def _check_records(recs):
    from fedsafe.data.records import KINDS, Record

    assert isinstance(recs, list)
    for r in recs:
        assert isinstance(r, Record) and r.kind in KINDS and r.instruction.strip()


def _load(path: Path, options: dict | None = None):
    from fedsafe.data.sources import load_source

    recs = _expect_user_error_or_success(load_source, _spec(path, dict(options or {})))
    if recs is not None:
        _check_records(recs)
    return recs


FORMATS = ["jsonl", "ndjson", "json", "csv", "tsv"]


@FUZZ
@given(data=st.binary(max_size=600), fmt=st.sampled_from(FORMATS + ["parquet"]))
def test_file_loader_random_bytes(data, fmt):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"data.{fmt}"
        p.write_bytes(data)
        _load(p)


@FUZZ
@given(rows=ROWS, fmt=st.sampled_from(FORMATS), options=OPTIONS, cut=st.one_of(st.none(), st.floats(0, 1)),
       prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"\n\n", b"\x00", b"\xff"]))
def test_file_loader_structured_truncated(rows, fmt, options, cut, prefix):
    """Plausible files (right and wrong types, huge fields, odd unicode), optionally cut at a random byte."""
    data = prefix + _serialise(rows, fmt)
    if cut is not None:
        data = data[: int(len(data) * cut)]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"data.{fmt}"
        p.write_bytes(data)
        _load(p, options)


def _parquet_storable(v):
    """A Parquet string is UTF-8, so a lone surrogate cannot be stored at all: write '?' instead."""
    if isinstance(v, str):
        return v.encode("utf-8", "replace").decode()
    return [_parquet_storable(x) for x in v] if isinstance(v, list) else v


@FUZZ
@given(rows=st.one_of(st.lists(GOOD_ROW, min_size=1, max_size=5),
                      st.lists(st.dictionaries(st.sampled_from(["instruction", "response", "prompt", "x", ""]),
                                               st.one_of(st.none(), INTS, FLOATS, st.booleans(), ODD_TEXT, HUGE),
                                               max_size=4),
                               min_size=1, max_size=5)), options=OPTIONS)
def test_parquet_loader(rows, options):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["instruction"]
    arrays = {}
    for c in cols:
        vals = [_parquet_storable(r.get(c)) for r in rows]
        try:
            arrays[c] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types: store as text
            arrays[c] = pa.array([None if v is None else str(v) for v in vals])
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "data.parquet"
        pq.write_table(pa.table(arrays), p)
        _load(p, options)


# ------------------------------------------------------------------------------------------ files as client data
# The path a user takes (issue 17): a file named in a YAML that extends a preset, as a client group, a defense
# pool or the harmful evaluation set -> load_config -> build_federation (what `data inspect` and `run` do first)
# -> the tiny runtime's tokenizer (what training does first). The defaults the partitioner passes (length
# limits, a role's kind) must never surface as an error about an option the user did not write.

TURN = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system", "bard", "x"]),
                                           "role": st.sampled_from(["user", "assistant", "system", "tool"]),
                                           "value": st.one_of(GOOD_TEXT, CELL), "content": st.one_of(GOOD_TEXT, CELL)})
CONV_ROW = st.fixed_dictionaries({}, optional={"conversations": st.one_of(st.lists(TURN, max_size=4), CELL),
                                               "messages": st.one_of(st.lists(TURN, max_size=4), CELL), "id": CELL})
PAIR_ROW = st.builds(lambda names, q, a: {names[0]: q, names[1]: a},
                     st.sampled_from([("instruction", "output"), ("instruction", "response"), ("prompt", "completion"),
                                      ("question", "answer"), ("goal", "target"), ("Instruction", "Output")]),
                     st.one_of(GOOD_TEXT, HUGE, st.just("")), st.one_of(GOOD_TEXT, HUGE, st.just("")))
GROUP_ROWS = st.one_of(st.lists(PAIR_ROW, min_size=1, max_size=24), st.lists(CONV_ROW, max_size=12),
                       st.lists(st.one_of(PAIR_ROW, GOOD_ROW, st.dictionaries(COLS, CELL, max_size=4)), max_size=12))
UNWRITTEN = ("max_instruction_chars", "max_response_chars", "default_kind", "needs a hub schema")


def _write_any(rows: list[dict], path: Path) -> None:
    if path.suffix != ".parquet":
        path.write_bytes(_serialise(rows, path.suffix.lstrip(".")))
        return
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["instruction"]
    arrays = {}
    for c in cols:
        vals = [_parquet_storable(r.get(c)) for r in rows]
        try:
            arrays[c] = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            arrays[c] = pa.array([None if v is None else json.dumps(v) for v in vals])
    pq.write_table(pa.table(arrays), path)


@settings(FUZZ, max_examples=max(8, EXAMPLES // 4))  # each example builds a whole federation
@given(rows=GROUP_ROWS, fmt=st.sampled_from(["json", "jsonl", "csv", "tsv", "parquet"]),
       role=st.sampled_from(["malicious", "benign", "defense_aligned", "eval_harmful", "aligned"]),
       options=st.sampled_from(["", "?kind=unaligned", "?instruction_col=prompt&response_col=completion", "?limit=3",
                                "?instruction_col=messages"]))
def test_file_as_client_group_through_config(rows, fmt, role, options):
    from fedsafe.data.partition import build_federation
    from fedsafe.runtime import get_runtime

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"mine.{fmt}"
        _write_any(rows, path)
        spec = f"file:{path}{options}"
        data: dict = {"samples_per_client": 4}
        if role in ("malicious", "benign", "aligned"):
            mix = {spec if role != "aligned" else f"aligned:{spec}": 1.0}
            data["groups"] = [{"name": "benign", "clients": 2, "mix": mix if role != "malicious" else {"tiny": 1.0}},
                              {"name": "malicious", "clients": 1, "malicious": True,
                               "mix": mix if role == "malicious" else {"tiny-unaligned": 1.0}}]
        else:
            data[role] = spec
        cfg_path = Path(d) / "my.yaml"
        cfg_path.write_text(json.dumps({"base": "tiny", "data": data}))
        try:
            cfg = load_config(str(cfg_path))
            fed = build_federation(cfg.data, seed=cfg.seed)
        except FedsafeError as e:
            msg = str(e)
            assert msg and "Traceback" not in msg
            wrote = spec + json.dumps(data)
            assert not [w for w in UNWRITTEN if w in msg and w not in wrote], msg
            STATS[CURRENT[0], type(e).__name__] += 1
            return
        STATS[CURRENT[0], "accepted"] += 1
        rt = get_runtime(cfg.model, cfg.lora)
        for c in fed.clients:
            assert all(r.response.strip() for r in c.records)  # clients train on pairs, never on bare prompts
            assert rt.tokenize(c.records)


# ------------------------------------------------------------------------------------------ JSONL


@FUZZ
@given(data=st.binary(max_size=400), tolerate=st.booleans())
def test_read_jsonl_random_bytes(data, tolerate):
    from fedsafe.io import read_jsonl

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.jsonl"
        p.write_bytes(data)
        rows = _expect_user_error_or_success(read_jsonl, p, tolerate_torn_tail=tolerate)
        assert rows is None or all(isinstance(r, dict) for r in rows)


ASCII_ROWS = st.lists(st.dictionaries(st.text(alphabet="abcxyz_", max_size=5),
                                      st.one_of(INTS, st.text(alphabet="ab cé\u4e2d\"\\", max_size=8), st.booleans()),
                                      max_size=3), min_size=1, max_size=6)


@FUZZ
@given(rows=ASCII_ROWS, data=st.data())
def test_read_jsonl_torn_tail_property(rows, data):
    """A crash while appending tears at most the last line: with tolerate_torn_tail the complete lines
    come back exactly; without it (or when a *middle* line is damaged) it is a DataError."""
    from fedsafe.errors import DataError
    from fedsafe.io import read_jsonl

    lines = [json.dumps(r) for r in rows]  # ASCII escapes: cutting never splits a UTF-8 sequence here
    head = "".join(x + "\n" for x in lines[:-1])
    last = lines[-1]
    cut = data.draw(st.integers(0, len(last) - 1), label="cut")
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.jsonl"
        p.write_text(head + last[:cut])
        assert read_jsonl(p, tolerate_torn_tail=True) == rows[:-1]
        if cut:
            with pytest.raises(DataError):
                read_jsonl(p)
        p.write_text(head + last + "\n")
        assert read_jsonl(p, tolerate_torn_tail=True) == rows
        if len(lines) >= 3:  # damage a middle line: never silently dropped
            k = data.draw(st.integers(0, len(lines) - 3), label="middle")
            bad = lines[:k] + [lines[k][: max(1, len(lines[k]) // 2)]] + lines[k + 1:]
            p.write_text("".join(x + "\n" for x in bad))
            with pytest.raises(DataError):
                read_jsonl(p, tolerate_torn_tail=True)


# ------------------------------------------------------------------------------------------ prompt files

PROMPT_COLS = st.one_of(st.sampled_from(["prompt", "goal", "forbidden_prompt", "Behavior", "behavior", "PROMPT",
                                         "instruction", "question", "turns", "category"]), ODD_TEXT)


@FUZZ
@given(rows=st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"prompt": GOOD_TEXT}, optional={"category": CELL}),
                                         GOOD_TEXT), min_size=1, max_size=6),
                      st.lists(st.one_of(st.dictionaries(PROMPT_COLS, CELL, max_size=4), ODD_TEXT, INTS), max_size=6)),
       fmt=st.sampled_from(["jsonl", "json", "csv", "tsv"]), wrap=st.sampled_from([None, "data", "rows", "other"]),
       column=st.one_of(st.none(), PROMPT_COLS), cut=st.one_of(st.none(), st.floats(0, 1)),
       prefix=st.sampled_from([b"", b"\xef\xbb\xbf", b"\xfe"]))
def test_prompt_file_loader(rows, fmt, wrap, column, cut, prefix):
    from fedsafe.eval.prompts import load_prompt_file

    if fmt == "json":
        data = json.dumps(rows if wrap is None else {wrap: rows}).encode()
    else:
        dict_rows = [r if isinstance(r, dict) else {"prompt": r} for r in rows]
        data = _serialise(dict_rows, fmt)
    data = prefix + data
    if cut is not None:
        data = data[: int(len(data) * cut)]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"prompts.{fmt}"
        p.write_bytes(data)
        out = _expect_user_error_or_success(load_prompt_file, p, column)
        assert out is None or all(isinstance(s, str) and s.strip() for s in out)


@FUZZ
@given(data=st.binary(max_size=400), fmt=st.sampled_from(["jsonl", "json", "csv", "tsv", "txt"]))
def test_prompt_file_random_bytes(data, fmt):
    from fedsafe.eval.prompts import load_prompt_file

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"prompts.{fmt}"
        p.write_bytes(data)
        _expect_user_error_or_success(load_prompt_file, p)


# ------------------------------------------------------------------------------------------ CLI

CLI_CASES = {
    # name: (argv, files to create {name: content}, expected text in stderr)
    "unknown preset": (["run", "tinyy"], {}, "unknown preset"),
    "malformed YAML": (["run", "bad.yaml"], {"bad.yaml": "fl: {rounds: [1\n"}, "invalid YAML"),
    "bad override value": (["run", "tiny", "fl.rounds=abc"], {}, "expected an integer"),
    "resume missing dir": (["run", "--resume", "no_such_run"], {}, "not a run directory"),
    "judge malformed JSONL": (["judge", "gen.jsonl"], {"gen.jsonl": '{"prompt": "a", "response": "b"}\n{"prompt": \n'},
                              "invalid JSON"),
}
# the same contract, checked in-process (cheaper than a process each)
CLI_CASES_IN_PROCESS = {
    "override without =": (["run", "tiny", "fl.rounds"], {}, "must look like key=value"),
    "unknown key": (["config", "show", "tiny", "fl.roundz=3"], {}, "did you mean 'rounds'"),
    "unknown preset in sweep": (["sweep", "nope", "--grid", "fl.rounds=1"], {}, "unknown preset"),
    "judge missing field": (["judge", "gen.jsonl"], {"gen.jsonl": '{"prompt": "a"}\n'}, "needs a string 'response'"),
    "judge empty file": (["judge", "gen.jsonl"], {"gen.jsonl": ""}, "no rows"),
    "judge not UTF-8": (["judge", "gen.jsonl"], {"gen.jsonl": b"\xff\xfe{}\n"}, "not UTF-8"),
    "judge unknown judge": (["judge", "gen.jsonl", "--judge", "nope"],
                            {"gen.jsonl": '{"prompt": "a", "response": "b"}\n'}, "unknown judge"),
    "sweep bad grid": (["sweep", "tiny", "--grid", "fl.rounds"], {}, "must look like key=v1,v2"),
    "defend no adapter": (["defend", "no_such_run"], {}, "no final adapter"),
    "resume a file": (["run", "--resume", "gen.jsonl"], {"gen.jsonl": "{}\n"}, "not a run directory"),
}


def _make_files(cwd: Path, files: dict) -> None:
    cwd.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        (cwd / fname).write_bytes(content if isinstance(content, bytes) else content.encode())


def test_cli_bad_inputs_exit_2_without_traceback(tmp_path):
    """Real ``python -m fedsafe.cli`` processes, all started together."""
    env = {k: v for k, v in os.environ.items() if k != "FEDSAFE_DEBUG"}
    env.update(FEDSAFE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", COLUMNS="200")
    procs = {}
    for i, (name, (argv, files, _)) in enumerate(CLI_CASES.items()):
        _make_files(tmp_path / f"case{i}", files)
        procs[name] = subprocess.Popen([sys.executable, "-m", "fedsafe.cli", *argv], cwd=tmp_path / f"case{i}", env=env,
                                       text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    problems = []
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        want = CLI_CASES[name][2]
        if p.returncode != 2 or "Traceback" in err or want not in " ".join(err.split()) or "error:" not in err:
            problems.append(f"{name}: exit {p.returncode}, stderr: {err[-600:]!r}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(CLI_CASES_IN_PROCESS))
def test_cli_bad_inputs_in_process(name, tmp_path, capsys, monkeypatch):
    argv, files, want = CLI_CASES_IN_PROCESS[name]
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("FEDSAFE_DEBUG", raising=False)
    _make_files(tmp_path, files)
    rc = _cli_main(argv, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "error:" in err and want in " ".join(err.split()), err


# ------------------------------------------------------------------------------------------ regressions
# Each case is a crash this fuzzer once found (RELIABILITY.md, "Bugs found"), now fixed: it pins the clean
# error (or the correct result) that the input gives instead.


def _cli_main(argv, cwd: Path) -> int:
    """In-process CLI (cheap); a non-FedsafeError escapes exactly as it would as a traceback."""
    from fedsafe.cli import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return main(argv)
    finally:
        os.chdir(old)


def _cli_error(argv, tmp: Path, capsys, want: str) -> None:
    """The CLI exits 2 with ``error: <message containing want>`` on stderr."""
    capsys.readouterr()
    rc = _cli_main(argv, tmp)
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "error:" in err and want in err, (rc, err)


def _load_file_source(spec: str):
    from fedsafe.data.sources import load_source

    return load_source(spec)


def _fixed_yaml_int_key(tmp: Path, capsys):
    (tmp / "c.yaml").write_text("fl: {1: 2}\n")
    _cli_error(["config", "show", "c.yaml"], tmp, capsys, "fl.1' must be a string, not int")


def _fixed_dict_int_key(tmp: Path, capsys):
    from fedsafe.errors import ConfigError

    for raw in ({"fl": {3: 1}}, {True: 1}, {"model": {None: "x"}}):
        with pytest.raises(ConfigError, match="must be a string, not"):
            load_config(raw)


def _fixed_yaml_base_cycle(tmp: Path, capsys):
    from fedsafe.errors import ConfigError

    p = tmp / "loop.yaml"
    p.write_text(f"base: {p}\n")
    with pytest.raises(ConfigError, match="'base' chain loops back on itself"):
        load_config(str(p))
    (tmp / "a.yaml").write_text(f"base: {tmp / 'b.yaml'}\nseed: 1\n")
    (tmp / "b.yaml").write_text(f"base: {tmp / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match=r"a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(str(tmp / "a.yaml"))
    (tmp / "ok.yaml").write_text("base: tiny\nseed: 7\n")  # a chain that ends still works
    assert load_config(str(tmp / "ok.yaml")).seed == 7


def _fixed_yaml_not_utf8(tmp: Path, capsys):
    (tmp / "b.yaml").write_bytes(b"\xff\xfe fl: 1\n")
    _cli_error(["config", "show", "b.yaml"], tmp, capsys, "b.yaml: not UTF-8 text")


def _fixed_config_is_directory(tmp: Path, capsys):
    from fedsafe.errors import ConfigError

    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp))
    (tmp / "d.yaml").mkdir()
    with pytest.raises(ConfigError, match="d.yaml is a directory"):
        load_config(str(tmp / "d.yaml"))


def _fixed_tilde_user_spec(tmp: Path, capsys):
    from fedsafe.errors import DataError

    # a path that does not exist is fine in a config (as for any missing file); loading it says so
    cfg = load_config("tiny", ["data.eval_harmful=~nosuchuser_fedsafe/x.jsonl"])
    with pytest.raises(DataError, match="~nosuchuser_fedsafe.*file not found"):
        _load_file_source(cfg.data.eval_harmful)


def _fixed_tilde_user_file(tmp: Path, capsys):
    from fedsafe.errors import DataError

    for spec in ("file:~nosuchuser_fedsafe/x.jsonl", "file:~nosuchuser_fedsafe/x.jsonl?schema=advbench",
                 "hub_file:advbench:~nosuchuser_fedsafe/x.csv"):
        with pytest.raises(DataError, match="~nosuchuser_fedsafe.*file not found"):
            _load_file_source(spec)


def _fixed_lone_surrogate_record(tmp: Path, capsys):
    from fedsafe.data.records import Record
    from fedsafe.errors import DataError

    p = tmp / "s.jsonl"
    p.write_text('{"instruction": "ok", "response": "x"}\n{"instruction": "\\ud800 hi", "response": "x"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl, line 2: instruction is not valid Unicode \(unpaired surrogate "
                                        r"U\+D800 at character 0\)"):
        _load_file_source(f"file:{p}")
    with pytest.raises(DataError, match="response is not valid Unicode"):
        Record("q", "a\udfff", "normal", "test")
    from fedsafe.eval.prompts import load_prompt_file

    (tmp / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt": "x\\udfff"}\n')  # prompts are written out with generations
    with pytest.raises(DataError, match=r"p\.jsonl, line 2: instruction is not valid Unicode \(unpaired surrogate U\+DFFF"):
        load_prompt_file(tmp / "p.jsonl")


def _fixed_lone_surrogate_judge(tmp: Path, capsys):
    (tmp / "g.jsonl").write_text('{"prompt": "\\ud800", "response": "b"}\n')
    _cli_error(["judge", "g.jsonl"], tmp, capsys, "g.jsonl, record 1: field 'prompt' is not valid Unicode")
    assert not list(tmp.glob("g.judged.*"))  # refused before judging, nothing half-written


def _fixed_deep_json(tmp: Path, capsys):
    from fedsafe.errors import DataError

    p = tmp / "deep.json"
    p.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(DataError, match=r"deep\.json: JSON nested too deeply"):
        _load_file_source(f"file:{p}")
    p = tmp / "deep.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n' + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(DataError, match=r"deep\.jsonl, line 2: JSON nested too deeply"):
        _load_file_source(f"file:{p}")


def _fixed_deep_jsonl_read(tmp: Path, capsys):
    from fedsafe.errors import DataError
    from fedsafe.io import read_jsonl

    p = tmp / "deep.jsonl"
    p.write_text("[" * 50_000 + "]" * 50_000 + "\n")
    for tolerate in (False, True):
        with pytest.raises(DataError, match=r"deep\.jsonl, line 1: JSON nested too deeply"):
            read_jsonl(p, tolerate_torn_tail=tolerate)


def _fixed_deep_prompt_file(tmp: Path, capsys):
    from fedsafe.errors import DataError
    from fedsafe.eval.prompts import load_prompt_file

    for name, want in (("deep.jsonl", r"deep\.jsonl, line 1: JSON nested too deeply"),
                       ("deep.json", r"deep\.json: JSON nested too deeply")):
        (tmp / name).write_text("[" * 50_000 + "]" * 50_000 + "\n")
        with pytest.raises(DataError, match=want):
            load_prompt_file(tmp / name)


def _fixed_huge_int(tmp: Path, capsys):
    from fedsafe.errors import DataError
    from fedsafe.eval.prompts import load_prompt_file
    from fedsafe.io import read_jsonl

    big = "1" + "0" * 5000
    (tmp / "big.json").write_text('[{"instruction": ' + big + ', "response": "x"}]')
    with pytest.raises(DataError, match=r"big\.json: unreadable JSON \(Exceeds the limit \(4300 digits\)"):
        _load_file_source(f"file:{tmp / 'big.json'}")
    (tmp / "big.jsonl").write_text('{"prompt": "a"}\n{"prompt": ' + big + "}\n")
    with pytest.raises(DataError, match=r"big\.jsonl, line 2: unreadable JSON"):
        _load_file_source(f"file:{tmp / 'big.jsonl'}")
    with pytest.raises(DataError, match=r"big\.jsonl, line 2: unreadable JSON"):
        read_jsonl(tmp / "big.jsonl")
    with pytest.raises(DataError, match=r"big\.jsonl, line 2: unreadable JSON"):  # one reader, one error format
        load_prompt_file(tmp / "big.jsonl")


def _fixed_data_path_is_directory(tmp: Path, capsys):
    from fedsafe.errors import DataError
    from fedsafe.eval.prompts import load_prompt_file

    (tmp / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory"):
        _load_file_source(f"file:{tmp / 'd.jsonl'}")
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory"):
        load_prompt_file(tmp / "d.jsonl")


def _fixed_read_jsonl_directory(tmp: Path, capsys):
    from fedsafe.errors import DataError
    from fedsafe.io import read_jsonl

    (tmp / "d.jsonl").mkdir()
    with pytest.raises(DataError, match=r"d\.jsonl: is a directory"):
        read_jsonl(tmp / "d.jsonl")
    _cli_error(["judge", "d.jsonl"], tmp, capsys, "d.jsonl: is a directory")


def _fixed_limit_not_int(tmp: Path, capsys):
    from fedsafe.errors import DataError

    p = tmp / "a.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n')
    for bad in ("abc", "1.5", "nan"):
        with pytest.raises(DataError, match=rf"a\.jsonl: limit must be a whole number >= 1, got '{bad}'"):
            _load_file_source(f"file:{p}?limit={bad}")
    q = tmp / "adv.csv"
    q.write_text("goal,target\nhow to x,Sure\n")
    with pytest.raises(DataError, match="limit must be a whole number"):
        _load_file_source(f"hub_file:advbench:{q}?limit=abc")


def _fixed_limit_zero(tmp: Path, capsys):
    from fedsafe.errors import DataError

    p = tmp / "a.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n')
    for bad in ("0", "-2"):
        with pytest.raises(DataError, match=rf"a\.jsonl: limit must be a whole number >= 1, got '{bad}'"):
            _load_file_source(f"file:{p}?limit={bad}")
    assert len(_load_file_source(f"file:{p}?limit=1")) == 1
    assert len(_load_file_source(f"file:{p}?limit=5")) == 2


def _fixed_torn_utf8_tail(tmp: Path, capsys):
    from fedsafe.errors import DataError
    from fedsafe.io import read_jsonl

    p = tmp / "metrics.jsonl"
    p.write_bytes(('{"round": 0}\n{"round": 1, "note": "\u00e9').encode()[:-1])  # killed mid-character
    assert read_jsonl(p, tolerate_torn_tail=True) == [{"round": 0}]
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(p)
    p.write_bytes(b'{"round": 0, "x": "\xff"}\n{"round": 1}')  # bad byte in a complete line: damage
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(p, tolerate_torn_tail=True)


def _fixed_group_missing_clients(tmp: Path, capsys):
    _cli_error(["config", "show", "tiny", "data.groups=[{}]"], tmp, capsys,
               "data.groups[0]: missing required key(s) clients, mix")
    _cli_error(["config", "show", "tiny", "data.groups=[{clients: 2}]"], tmp, capsys,
               "data.groups[0]: missing required key(s) mix")


def _fixed_resume_corrupt_config(tmp: Path, capsys):
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("{[\n")  # e.g. hand-edited, or a disk error
    _cli_error(["run", "--resume", "run", "--quiet", "--no-eval"], tmp, capsys, "config.yaml: unreadable run config")


def _fixed_run_dir_is_file(tmp: Path, capsys):
    (tmp / "afile").write_text("x")
    for extra in ([], ["--overwrite"]):
        _cli_error(["run", "tiny", "fl.rounds=1", "--run-dir", "afile", "--quiet", "--no-eval", *extra], tmp, capsys,
                   "run directory afile exists and is not a directory")
    assert (tmp / "afile").read_text() == "x"


def _fixed_file_group_in_preset_yaml(tmp: Path, capsys):
    (tmp / "pairs.json").write_text(json.dumps([{"instruction": f"q{i}", "response": f"a{i}"} for i in range(30)]))
    (tmp / "my.yaml").write_text('base: tiny\ndata:\n  groups:\n    - {name: benign, clients: 3, mix: {tiny: 1.0}}\n'
                                 '    - {name: malicious, clients: 1, malicious: true, mix: {"file:./pairs.json": 1.0}}\n')
    capsys.readouterr()
    assert _cli_main(["data", "inspect", "my.yaml"], tmp) == 0, capsys.readouterr().err
    assert "unaligned" in capsys.readouterr().out


def _fixed_csv_bom(tmp: Path, capsys):
    p = tmp / "excel.csv"
    p.write_bytes(b"\xef\xbb\xbfinstruction,response\nq,a\n")  # Excel's UTF-8 export starts with a BOM
    recs = _load_file_source(f"file:{p}")
    assert [(r.instruction, r.response) for r in recs] == [("q", "a")]


REGRESSIONS = {
    "config: non-string key in a YAML file (was TypeError, config.py from_dict)": _fixed_yaml_int_key,
    "config: non-string key in a dict (was TypeError, config.py from_dict)": _fixed_dict_int_key,
    "config: 'base:' cycle (was RecursionError, config.py _read_yaml)": _fixed_yaml_base_cycle,
    "config: YAML file not UTF-8 (was UnicodeDecodeError, config.py _read_yaml)": _fixed_yaml_not_utf8,
    "config: CONFIG is a directory (was IsADirectoryError, config.py _read_yaml)": _fixed_config_is_directory,
    "spec: '~nosuchuser/..' (was RuntimeError, data/sources.py parse_spec)": _fixed_tilde_user_spec,
    "file: '~nosuchuser/..' (was RuntimeError, data/files.py, data/hub.py)": _fixed_tilde_user_file,
    "file: lone surrogate escape (was UnicodeEncodeError, data/records.py record_id)": _fixed_lone_surrogate_record,
    "judge: lone surrogate escape (was UnicodeEncodeError, io.py write_jsonl)": _fixed_lone_surrogate_judge,
    "file: deeply nested JSON (was RecursionError, data/files.py)": _fixed_deep_json,
    "read_jsonl: deeply nested line (was RecursionError, io.py iter_jsonl)": _fixed_deep_jsonl_read,
    "prompts: deeply nested JSON (was RecursionError, eval/prompts.py)": _fixed_deep_prompt_file,
    "file: integer over 4300 digits (was ValueError, data/files.py, io.py, eval/prompts.py)": _fixed_huge_int,
    "file: data path is a directory (was IsADirectoryError, data/files.py iter_rows)": _fixed_data_path_is_directory,
    "read_jsonl: path is a directory (was IsADirectoryError, io.py iter_jsonl)": _fixed_read_jsonl_directory,
    "file: ?limit=abc (was ValueError, data/files.py load_file)": _fixed_limit_not_int,
    "file: ?limit=0 (returned 1 record, data/files.py rows_to_records)": _fixed_limit_zero,
    "read_jsonl: torn multi-byte UTF-8 tail (was DataError on resume, io.py iter_jsonl)": _fixed_torn_utf8_tail,
    "config: data.groups entry without clients/mix (was TypeError, config.py from_dict)": _fixed_group_missing_clients,
    "run --resume: unparsable config.yaml (was yaml ParserError, fl/run.py load_run_config)":
        _fixed_resume_corrupt_config,
    "run --run-dir: an existing file (was NotADirectoryError, fl/run.py new_run_dir)": _fixed_run_dir_is_file,
    "file: CSV with a UTF-8 BOM (header was not found, data/files.py _csv_rows)": _fixed_csv_bom,
    "config: file: client group in a YAML extending a preset (was \"option 'max_instruction_chars' needs a hub "
    "schema\", an option the user never wrote, data/partition.py)": _fixed_file_group_in_preset_yaml,
}


@pytest.mark.parametrize("name", [pytest.param(n, id=n.split(" (")[0]) for n in REGRESSIONS])
def test_regression(name, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.delenv("FEDSAFE_DEBUG", raising=False)
    REGRESSIONS[name](tmp_path, capsys)
