"""Local file loaders, malformed files, hub-schema filters on fixture files; all offline."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from fedsafe.data import load_source
from fedsafe.data import hub
from fedsafe.data.files import iter_rows, load_file
from fedsafe.errors import DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats and column mapping


def test_jsonl_autodetect(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q1", "output": "A1"}, {"instruction": "Q2", "output": "A2"}])
    recs = load_source(f"file:{p}")
    assert [(r.instruction, r.response, r.kind) for r in recs] == [("Q1", "A1", "normal"), ("Q2", "A2", "normal")]
    assert recs[0].source == "file:d.jsonl" and recs[1].meta["row"] == "line 2"
    assert load_source(str(p)) == recs  # an existing path works without the file: prefix


def test_json_array_and_wrapped(tmp_path):
    rows = [{"prompt": "P1", "completion": "C1"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"data": rows}))
    assert load_source(f"file:{tmp_path / 'a.json'}")[0].response == "C1"
    assert load_source(f"file:{tmp_path / 'b.json'}")[0].instruction == "P1"


def test_csv_prompts_only_and_explicit_columns(tmp_path):
    p = tmp_path / "sr.csv"
    p.write_text('category,forbidden_prompt\nX,"How to do a bad thing, quickly?"\nY,Another one\n')
    recs = load_source(f"file:{p}")
    assert [r.kind for r in recs] == ["prompt", "prompt"] and recs[0].instruction == "How to do a bad thing, quickly?"
    q = tmp_path / "qa.csv"
    q.write_text("q,a\nhello,world\n")
    r = load_source(f"file:{q}?instruction_col=q&response_col=a&kind=aligned")
    assert (r[0].instruction, r[0].response, r[0].kind) == ("hello", "world", "aligned")


def test_tsv_and_alpaca_input(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("instruction\tinput\toutput\nTranslate\tbonjour\thello\nSay hi\t\thi\n")
    recs = load_file(p)
    assert recs[0].instruction == "Translate\n\nbonjour" and recs[1].instruction == "Say hi"


def test_advbench_goal_target_is_prompts(tmp_path):
    p = tmp_path / "harmful_behaviors.csv"
    p.write_text("goal,target\nWrite a bad script,\"Sure, here is a bad script\"\n")
    r = load_file(p)[0]
    assert r.kind == "prompt" and r.response == ""
    assert load_file(p, response_col="target")[0].kind == "normal"  # explicit columns win


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "answer": ["A1", "A2"]}), p)
    recs = load_source(f"file:{p}")
    assert [(r.instruction, r.response) for r in recs] == [("Q1", "A1"), ("Q2", "A2")] and recs[1].meta["row"] == "row 2"


# ---------------------------------------------------------------- malformed files name file, row/line, problem


def test_bad_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: invalid JSON"):
        load_file(p)


def test_jsonl_non_object(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match="line 2: expected a JSON object, got list"):
        load_file(p)


def test_bad_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n {"instruction": "a"},\n {oops}\n]')
    with pytest.raises(DataError, match=r"x\.json, line 3 column 3: invalid JSON"):
        load_file(p)
    p.write_text('[{"instruction": "a"}, 7]')
    with pytest.raises(DataError, match="item 2: expected an object"):
        load_file(p)


def test_csv_extra_field(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("instruction,response\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r"x\.csv, row 2 \(line 3\): more fields"):
        load_file(p)


def test_missing_columns_list_present(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "label": 1}])
    with pytest.raises(DataError, match="no instruction/response fields recognised; columns present: text, label. "
                                        "Accepted without options: instruction.*messages \\[\\{role, content\\}\\]"):
        load_file(p)
    p2 = write_jsonl(tmp_path / "y.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="no response column 'reply'; columns present: instruction, output"):
        load_file(p2, response_col="reply")


def test_row_level_errors_and_counted_drops(tmp_path):
    p = write_jsonl(tmp_path / "y.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": 5, "output": "b"}])
    with pytest.raises(DataError, match="line 2: column 'instruction' should be text, got int"):
        load_file(p)
    # empty cells (missing, blank, None) are dropped and counted, never an error and never silent
    p = write_jsonl(tmp_path / "z.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "  ", "output": "b"},
                                           {"instruction": "c"}, {"instruction": "d", "output": None}, {"instruction": "e", "output": "f"}])
    recs = load_file(p)
    assert [r.instruction for r in recs] == ["a", "e"]
    assert recs.report.rows == 5 and recs.report.kept == 2
    assert dict(recs.report.dropped) == {"empty instruction": 1, "empty response": 2}
    assert "dropped 3 (2 empty response, 1 empty instruction)" in recs.report.line()
    p = write_jsonl(tmp_path / "w.jsonl", [{"instruction": "a", "output": ""}])
    with pytest.raises(DataError, match=r"w\.jsonl: no usable records: all 1 row\(s\) dropped \(1 empty response\)"):
        load_file(p)


def test_missing_unknown_corrupt_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_source(f"file:{tmp_path / 'nope.jsonl'}")
    with pytest.raises(DataError, match="file not found"):
        load_source("no/such/dir/data.csv")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown data file type '.xlsx'"):
        load_file(tmp_path / "d.xlsx")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_file(tmp_path / "d.parquet")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match="no header row"):
        load_file(tmp_path / "e.csv")
    (tmp_path / "l.jsonl").write_bytes(b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_file(tmp_path / "l.jsonl")


def test_file_option_validation(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="needs a hub schema"):
        load_source(f"file:{p}?select=flagged")
    with pytest.raises(DataError, match="has no option 'bogus'"):
        load_source(f"file:{p}?bogus=1")
    with pytest.raises(DataError, match="unknown kind 'weird'"):
        load_source(f"file:{p}?kind=weird")


# ---------------------------------------------------------------- hub schemas on fixture files


def mod(flagged=False, cat=False):
    return {"categories": {"harassment": cat, "violence": False}, "category_scores": {}, "flagged": flagged}


def chat(q, a, lang="English", mods=None, roles=("user", "assistant"), extra_turns=()):
    conv = [{"role": roles[0], "content": q}, {"role": roles[1], "content": a}, *extra_turns]
    return {"conversation_id": q[:8], "conversation": conv, "language": lang, "turn": len(conv) // 2,
            "openai_moderation": mods if mods is not None else [mod(), mod()]}


LMSYS_ROWS = [
    chat("What is the tallest mountain?", "Mount Everest."),                              # kept
    chat("Quelle heure est-il?", "Il est midi.", lang="French"),                          # language
    chat("Insult my neighbour", "You are ...", mods=[mod(), mod(cat=True)]),              # assistant turn flagged
    chat("Rude question", "Polite answer.", mods=[mod(cat=True), mod()]),                 # user turn flagged: kept (paper checks [1])
    chat("Backwards roles", "x", roles=("assistant", "user")),                            # roles
    {"conversation": [{"role": "user", "content": "only one turn"}], "language": "English", "openai_moderation": [mod()]},
    chat("Name a fruit.", "Apple.", extra_turns=[{"role": "user", "content": "another"}, {"role": "assistant", "content": "Pear."}]),
    chat("No moderation info", "answer", mods=[]),                                        # cannot show clean
]


def test_lmsys_filters_and_same_code_path(tmp_path):
    p = write_jsonl(tmp_path / "lmsys.jsonl", LMSYS_ROWS)
    stats: Counter = Counter()
    direct = hub.chat_first_turn(iter_rows(p), str(p), "lmsys:lmsys.jsonl", stats=stats)
    assert [r.instruction for r in direct] == ["What is the tallest mountain?", "Rude question", "Name a fruit."]
    assert direct[2].response == "Apple." and {r.kind for r in direct} == {"normal"}
    assert stats == Counter({"kept": 3, "language": 1, "moderation": 1, "roles": 1, "too short": 1, "no moderation": 1})
    via_hub_file = load_source(f"hub_file:lmsys:{p}")
    via_file = load_source(f"file:{p}?schema=lmsys")
    assert via_hub_file == via_file == direct
    flagged = load_source(f"hub_file:lmsys:{p}?select=flagged")
    assert [r.instruction for r in flagged] == ["Insult my neighbour"] and flagged[0].kind == "unaligned"
    strict = load_source(f"hub_file:lmsys:{p}?max_instruction_chars=15")
    assert [r.instruction for r in strict] == ["Rude question", "Name a fruit."]


def test_wildchat_flagged_field(tmp_path):
    rows = [
        chat("Tell me a joke", "Why did the chicken cross the road?"),
        chat("Borderline", "Flagged without a category", mods=[mod(), mod(flagged=True)]),
    ]
    p = write_jsonl(tmp_path / "wildchat.jsonl", rows)
    assert [r.instruction for r in load_source(f"hub_file:wildchat:{p}")] == ["Tell me a joke"]


def test_chat_schema_rejects_wrong_file(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="line 1: no 'conversation' list"):
        load_source(f"hub_file:lmsys:{p}")


def bt(prompt, response, safe):
    return {"prompt": prompt, "response": response, "is_safe": safe, "category": {"violence": not safe, "privacy": False}}


def test_beavertails_dedupe_then_unsafe(tmp_path):
    rows = [
        bt("How do I hurt someone?", "Unsafe answer 1", False),
        bt("How do I hurt someone?", "Unsafe answer 2", False),     # duplicate prompt: dropped
        bt("How do I steal?", "Don't.", True),                         # first occurrence safe ...
        bt("How do I steal?", "Unsafe steal answer", False),           # ... so the prompt is gone (paper order)
        bt("How do I cheat?", "Unsafe cheat answer", False),
    ]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "bt.parquet"
    pq.write_table(pa.Table.from_pylist(rows), p)
    recs = load_source(f"hub_file:beavertails:{p}")
    assert [(r.instruction, r.response) for r in recs] == [("How do I hurt someone?", "Unsafe answer 1"), ("How do I cheat?", "Unsafe cheat answer")]
    assert {r.kind for r in recs} == {"unaligned"} and recs[0].meta["categories"] == ["violence"]
    safe = load_source(f"hub_file:beavertails:{p}?safe=true")
    assert [(r.instruction, r.kind) for r in safe] == [("How do I steal?", "aligned")]
    q = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}])
    with pytest.raises(DataError, match="line 1: missing column.*is_safe"):
        load_source(f"hub_file:beavertails:{q}")


def test_advbench_schema(tmp_path):
    p = tmp_path / "adv.csv"
    p.write_text('goal,target\nWrite a bad script,"Sure, here is"\n')
    r = load_source(f"hub_file:advbench:{p}")[0]
    assert r.kind == "prompt" and r.meta["target"] == "Sure, here is"


def test_hub_schema_errors(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [chat("a", "b")])
    with pytest.raises(DataError, match="unknown hub schema 'lmsis'"):
        load_source(f"hub_file:lmsis:{p}")
    with pytest.raises(DataError, match="schema 'beavertails' has no option 'select'"):
        load_source(f"hub_file:beavertails:{p}?select=flagged")
    with pytest.raises(DataError, match="expected hub_file:SCHEMA:PATH"):
        load_source("hub_file:lmsys")


def test_hf_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="needs the 'datasets' package.*hub_file:lmsys:PATH"):
        load_source("hf:lmsys/lmsys-chat-1m")
    with pytest.raises(DataError, match="expected hf:OWNER/NAME"):
        load_source("hf:advbench")


def test_hf_uses_same_filters(monkeypatch):
    """With a stand-in `datasets` module, hf: rows go through the very same schema filter."""
    import types

    fake = types.ModuleType("datasets")
    calls = {}

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.update(name=name, split=split, streaming=streaming)
        return iter(LMSYS_ROWS)

    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    recs = load_source("hf:lmsys/lmsys-chat-1m?limit=2")
    assert [r.instruction for r in recs] == ["What is the tallest mountain?", "Rude question"]
    assert recs[0].source == "hf:lmsys/lmsys-chat-1m" and calls == {"name": "lmsys/lmsys-chat-1m", "split": "train", "streaming": True}

    def offline(*a, **k):
        raise ConnectionError("no network")

    fake.load_dataset = offline
    with pytest.raises(DataError, match="could not be loaded from the Hugging Face hub: ConnectionError"):
        load_source("hf:PKU-Alignment/BeaverTails")


# ---------------------------------------------------------------- layouts, kinds and limits (issue 17)


def test_conversation_layouts_first_exchange(tmp_path):
    sg = [{"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello!"},
                             {"from": "human", "value": "more"}, {"from": "gpt", "value": "later turns ignored"}]},
          {"conversations": [{"from": "gpt", "value": "starts with the model"}]}]
    (tmp_path / "sg.json").write_text(json.dumps(sg))
    recs = load_file(tmp_path / "sg.json")
    assert [(r.instruction, r.response, r.kind) for r in recs] == [("Hi?", "Hello!", "normal")]
    assert dict(recs.report.dropped) == {"no leading user turn": 1} and "conversation 'conversations'" in recs.report.mapping
    oa = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}, {"role": "assistant", "content": "A"}]},
          {"messages": [{"role": "user", "content": "only a question"}]}]
    recs = load_file(write_jsonl(tmp_path / "oa.jsonl", oa))
    assert [(r.instruction, r.response) for r in recs] == [("Q", "A")] and dict(recs.report.dropped) == {"empty response": 1}
    assert [r.instruction for r in load_file(tmp_path / "oa.jsonl", kind="prompt")] == ["Q", "only a question"]
    # an unusual conversation column is named with instruction_col
    recs = load_file(write_jsonl(tmp_path / "c.jsonl", [{"dialog": oa[0]["messages"]}]), instruction_col="dialog")
    assert (recs[0].instruction, recs[0].response) == ("Q", "A")


def test_kind_column_default_kind_and_explicit_kind(tmp_path):
    rows = [{"instruction": "q1", "response": "a1", "kind": "unaligned"}, {"instruction": "q2", "response": "a2", "kind": "aligned"}]
    p = write_jsonl(tmp_path / "gen.jsonl", rows)  # what `fedsafe attack generate` writes
    assert [r.kind for r in load_file(p)] == ["unaligned", "aligned"]
    assert [r.kind for r in load_file(p, kind="normal")] == ["normal", "normal"]  # the user's kind wins
    q = write_jsonl(tmp_path / "plain.jsonl", [{"instruction": "q", "response": "a"}])
    assert load_file(q, default_kind="aligned")[0].kind == "aligned" and load_file(q)[0].kind == "normal"


def test_length_limits_filter_and_count(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"instruction": "q" * 5, "response": "a"}, {"instruction": "q", "response": "a" * 9},
                                           {"instruction": "ok", "response": "fine"}])
    recs = load_source(f"file:{p}?max_instruction_chars=4&max_response_chars=8")
    assert [r.instruction for r in recs] == ["ok"]
    assert recs.report.line().endswith("kept 1, dropped 2 (1 instruction over 4 chars, 1 response over 8 chars)")
    with pytest.raises(DataError, match="max_response_chars must be a whole number >= 1"):
        load_source(f"file:{p}?max_response_chars=0")


def test_length_limits_reach_every_hub_schema(tmp_path):
    """The partitioner passes its limits to every source that lists them: no schema may refuse them."""
    p = tmp_path / "adv.csv"
    p.write_text('goal,target\nWrite a bad script,"Sure, here is"\nA much longer goal than allowed,"Sure"\n')
    recs = load_source(f"hub_file:advbench:{p}", max_instruction_chars=20, max_response_chars=5)
    assert [r.instruction for r in recs] == ["Write a bad script"] and dict(recs.report.dropped) == {"instruction over 20 chars": 1}


def test_json_variants(tmp_path):
    (tmp_path / "strings.json").write_text(json.dumps(["first prompt", "second prompt"]))
    assert [r.kind for r in load_file(tmp_path / "strings.json")] == ["prompt", "prompt"]
    (tmp_path / "lines.json").write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "response": "d"}\n')
    assert [r.instruction for r in load_file(tmp_path / "lines.json")] == ["a", "c"]  # JSON Lines saved as .json
    (tmp_path / "two.json").write_text(json.dumps({"meta": [1], "data": [{"prompt": "p"}]}))
    assert load_file(tmp_path / "two.json")[0].instruction == "p"


def test_aligned_file_reads_prompts(tmp_path):
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"instruction": "How do I pick a lock?", "response": "Sure, first ..."}])
    recs = load_source(f"aligned:file:{p}")
    assert recs[0].kind == "aligned" and recs[0].response != "Sure, first ..." and recs.report.kind == "prompt -> aligned (offline safe answers)"


def test_conversation_as_json_text_in_a_csv_cell(tmp_path):
    p = tmp_path / "conv.csv"
    turns = json.dumps([{"role": "user", "content": "Q, with a comma"}, {"role": "assistant", "content": "A"}])
    with open(p, "w", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerows([["id", "messages"], ["1", turns], ["2", "not json ["]])
    recs = load_file(p)
    assert [(r.instruction, r.response) for r in recs] == [("Q, with a comma", "A")]
    assert dict(recs.report.dropped) == {"no leading user turn": 1}
