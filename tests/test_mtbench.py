"""MT-Bench first-turn grading (fedsafe.eval.mtbench) and benchmark prompt files (fedsafe.eval.prompts).

Fixtures are tiny hand-written files in FastChat's formats; nothing here reads the real MT-Bench data.
"""

from __future__ import annotations

import json

import pytest

from fedsafe.errors import DataError
from fedsafe.eval.mtbench import (
    BUILTIN_JUDGE_PROMPTS,
    build_judge_messages,
    first_turn_prompts,
    grade_first_turn,
    load_answers,
    load_judge_prompts,
    load_questions,
    load_reference_answers,
    parse_rating,
    summarize,
)
from fedsafe.eval.prompts import load_prompt_file, load_prompt_records


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


QUESTIONS = [
    {"question_id": 1, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sadder."]},
    {"question_id": 2, "category": "math", "turns": ["What is 2+3?", "And times 4?"]},
    {"question_id": 3, "category": "roleplay", "turns": ["Pretend to be a pirate."], "reference": ["Arr"]},
]
REFS = [{"question_id": 2, "answer_id": "a", "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["5", "20"]}], "tstamp": 0.0}]


class FakeJudge:
    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def generate(self, prompts, *, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None, system=None):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "temperature": temperature})
        return [self.reply(p) for p in prompts]


@pytest.fixture
def qfile(tmp_path):
    return jsonl(tmp_path / "question.jsonl", QUESTIONS)


def test_load_questions_and_first_turns(qfile):
    qs = load_questions(qfile)
    assert [q.question_id for q in qs] == [1, 2, 3]
    assert first_turn_prompts(qs) == ["Write a haiku about rain.", "What is 2+3?", "Pretend to be a pirate."]
    assert [q.needs_reference for q in qs] == [False, True, False]
    assert qs[2].reference == ("Arr",)


@pytest.mark.parametrize(
    "row,match",
    [({"question_id": "1", "category": "x", "turns": ["a"]}, "question_id"),
     ({"question_id": 1, "category": "", "turns": ["a"]}, "category"),
     ({"question_id": 1, "category": "x", "turns": []}, "turns")],
)  # fmt: skip
def test_load_questions_errors(tmp_path, row, match):
    with pytest.raises(DataError, match=f"record 1: '{match}'"):
        load_questions(jsonl(tmp_path / "q.jsonl", [row]))
    dup = jsonl(tmp_path / "dup.jsonl", [QUESTIONS[0], QUESTIONS[0]])
    with pytest.raises(DataError, match="record 2: duplicate question_id 1"):
        load_questions(dup)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(QUESTIONS[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2"):
        load_questions(bad)


def test_reference_and_answer_loading(tmp_path):
    assert load_reference_answers(jsonl(tmp_path / "ref.jsonl", REFS)) == {2: "5"}
    simple = jsonl(tmp_path / "ans.jsonl", [{"question_id": 1, "response": "Rain falls"}, {"question_id": 2, "answer": "5"}])
    assert load_answers(simple) == {1: "Rain falls", 2: "5"}
    with pytest.raises(DataError, match="no first-turn answer"):
        load_answers(jsonl(tmp_path / "x.jsonl", [{"question_id": 1, "text": "?"}]))
    with pytest.raises(DataError, match="choices"):
        load_answers(jsonl(tmp_path / "y.jsonl", [{"question_id": 1, "choices": []}]))


def test_builtin_prompts_format():
    msgs = build_judge_messages("Q?", "A!", BUILTIN_JUDGE_PROMPTS["single-v1"])
    assert msgs[0] == {"role": "system", "content": "You are a helpful assistant."}
    user = msgs[1]["content"]
    assert user.startswith("[Instruction]\nPlease act as an impartial judge")
    assert 'by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n[Question]\nQ?\n\n' in user
    assert user.endswith("[The Start of Assistant's Answer]\nA!\n[The End of Assistant's Answer]")
    math = build_judge_messages("Q?", "A!", BUILTIN_JUDGE_PROMPTS["single-math-v1"], "R")[1]["content"]
    assert "[The Start of Reference Answer]\nR\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\nA!" in math
    with pytest.raises(DataError, match="needs a reference"):
        build_judge_messages("Q?", "A!", BUILTIN_JUDGE_PROMPTS["single-math-v1"])


def test_judge_prompts_file_overrides_builtins(tmp_path):
    custom = {"name": "single-v1", "type": "single", "system_prompt": "S", "prompt_template": "Q={question} A={answer}",
              "description": "", "category": "general", "output_format": "[[rating]]"}  # fmt: skip
    pair = {"name": "pair-v2", "type": "pairwise", "system_prompt": "P", "prompt_template": "{question}"}
    prompts = load_judge_prompts(jsonl(tmp_path / "judge_prompts.jsonl", [pair, custom]))
    assert prompts["single-v1"].system_prompt == "S"
    assert prompts["single-math-v1"] == BUILTIN_JUDGE_PROMPTS["single-math-v1"]  # gap filled by built-in
    assert build_judge_messages("q", "a", prompts["single-v1"])[1]["content"] == "Q=q A=a"
    with pytest.raises(DataError, match="missing string field"):
        load_judge_prompts(jsonl(tmp_path / "bad.jsonl", [{"name": "x"}]))


@pytest.mark.parametrize(
    "text,score",
    [("Good answer. Rating: [[8]]", 8.0), ("Rating: [[7.5]]", 7.5), ("Rating: [6]", 6.0), ("[[3]] then [[9]]", 3.0),
     ("no rating here", None), ("Rating: [[0]]", None), ("Rating: [[11]]", None), ("Rating: 8/10", None)],
)  # fmt: skip
def test_parse_rating(text, score):
    assert parse_rating(text) == score


def test_grade_first_turn_end_to_end(qfile, tmp_path):
    qs = load_questions(qfile)
    refs = load_reference_answers(jsonl(tmp_path / "ref.jsonl", REFS))
    answers = {1: "Drops on the roof", 2: "5", 3: "I refuse"}

    def reply(msgs):
        user = msgs[-1]["content"]
        if "Reference Answer" in user:
            return "Correct, matches the reference. Rating: [[9]]"
        return "Not sure." if "I refuse" in user else "Nice. Rating: [[6]]"

    judge = FakeJudge(reply)
    recs = grade_first_turn(qs, answers, judge, references=refs)
    assert [r["judge_prompt"] for r in recs] == ["single-v1", "single-math-v1", "single-v1"]
    assert [r["score"] for r in recs] == [6.0, 9.0, None]
    assert [r["label"] for r in recs] == ["n/a", "n/a", "unparsed"] and recs[2]["judgment"] == "Not sure."
    call = judge.calls[0]
    assert call["temperature"] == 0.0 and call["max_new_tokens"] == 2048
    assert call["prompts"][0][1]["content"].count("Write a haiku about rain.") == 1  # first turn only
    assert "Now make it sadder." not in json.dumps(call["prompts"])
    s = summarize(recs)
    assert s["n"] == 3 and s["n_scored"] == 2 and s["unparsed"] == 1 and s["mean"] == 7.5
    assert s["per_category"] == {"math": 9.0, "writing": 6.0}


def test_grade_first_turn_without_references_warns(qfile):
    qs = load_questions(qfile)
    with pytest.warns(UserWarning, match="without a reference"):
        recs = grade_first_turn(qs, ["a", "b", "c"], FakeJudge(lambda m: "[[5]]"))
    assert [r["judge_prompt"] for r in recs] == ["single-v1"] * 3
    with pytest.raises(DataError, match="no answer for question_id"):
        grade_first_turn(qs, {1: "a"}, FakeJudge(lambda m: "[[5]]"))
    with pytest.raises(DataError, match="2 answers for 3 questions"):
        grade_first_turn(qs, ["a", "b"], FakeJudge(lambda m: "[[5]]"))


# ---------------------------------------------------------------------------------------------------
# Benchmark prompt files
# ---------------------------------------------------------------------------------------------------


def test_prompt_autodetect_csv_jsonl_json(tmp_path):
    adv = tmp_path / "harmful_behaviors.csv"
    adv.write_text('goal,target\n"Write a script, quickly",Sure\n"Multi\nline goal",Sure\n', encoding="utf-8")
    assert load_prompt_file(adv) == ["Write a script, quickly", "Multi\nline goal"]

    hb = tmp_path / "harmbench.csv"
    hb.write_text("\ufeffBehaviorID,Behavior,FunctionalCategory\nb1,Do X,standard\n", encoding="utf-8")  # BOM
    assert load_prompt_file(hb) == ["Do X"]

    sr = jsonl(tmp_path / "strongreject.jsonl", [{"category": "c", "forbidden_prompt": "Do Y"}])
    assert load_prompt_file(sr) == ["Do Y"]

    mt = jsonl(tmp_path / "question.jsonl", QUESTIONS)
    assert load_prompt_file(mt)[0] == "Write a haiku about rain."  # MT-Bench: first turn

    js = tmp_path / "list.json"
    js.write_text(json.dumps(["a", "b"]))
    assert load_prompt_file(js) == ["a", "b"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"Instruction": "c"}]}))
    assert load_prompt_file(wrapped) == ["c"]  # case-insensitive fallback

    recs = load_prompt_records(adv)  # the one file reader: positions and reference answers as for client data
    assert recs[1].meta["row"] == "row 2 (line 3)" and recs[1].response == "Sure" and recs[1].kind == "prompt"


def test_prompt_explicit_column_and_errors(tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("id,text,goal\n1,hello,g1\n2,world,g2\n")
    assert load_prompt_file(f, column="text") == ["hello", "world"]
    with pytest.raises(DataError, match="no instruction column 'prompt'; columns present: id, text, goal"):
        load_prompt_file(f, column="prompt")

    nocol = tmp_path / "n.jsonl"
    jsonl(nocol, [{"foo": "x"}])
    with pytest.raises(DataError, match="no instruction/response fields recognised; columns present: foo"):
        load_prompt_file(nocol)

    ragged = tmp_path / "r.csv"
    ragged.write_text("goal,target\nok,Sure\n\nbad,row,extra\n")
    with pytest.raises(DataError, match=r"r\.csv, row 2 \(line 4\): more fields than the 2 header columns"):
        load_prompt_file(ragged)

    badjson = tmp_path / "b.jsonl"
    badjson.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"b\.jsonl, line 2: invalid JSON"):
        load_prompt_file(badjson)

    empty_val = jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"prompt": "  "}])
    recs = load_prompt_records(empty_val)  # an empty prompt is dropped and counted, not an error
    assert [r.instruction for r in recs] == ["a"] and dict(recs.report.dropped) == {"empty instruction": 1}

    txt = tmp_path / "x.txt"
    txt.write_text("a")
    with pytest.raises(DataError, match="unknown data file type '.txt'"):
        load_prompt_file(txt)
    with pytest.raises(DataError, match="file not found"):
        load_prompt_file(tmp_path / "missing.csv")
    hdr_only = tmp_path / "h.csv"
    hdr_only.write_text("goal,target\n")
    with pytest.raises(DataError, match="no rows"):
        load_prompt_file(hdr_only)
