"""MT-Bench first-turn ("MT-1") helpfulness: question loading, single-answer judge prompts, rating parsing.

Follows FastChat's ``llm_judge`` (Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot
Arena"), which the paper uses with a GPT-4 judge on the first turn only (paper.md section 5):

* questions: JSONL with ``question_id``, ``category``, ``turns`` (80 questions, 8 categories);
* reference answers: FastChat model-answer JSONL (``question_id``, ``choices[0].turns``), used for the
  ``math``, ``reasoning`` and ``coding`` categories with the ``single-math-v1`` prompt; all other categories
  use ``single-v1``;
* judge prompts: FastChat ``judge_prompts.jsonl`` (``name``, ``system_prompt``, ``prompt_template``,
  ``output_format``), loaded from a user path, with a built-in copy of the two single-answer prompts;
* judge decoding: temperature 0, up to 2048 new tokens; the rating is the first ``[[x]]`` in the
  judgement (falling back to the first ``[x]``), else the answer is "unparsed" (FastChat records -1).

No MT-Bench data ships with fedsafe: pass the FastChat files (or download them from the hub).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import DataError
from ..io import iter_jsonl
from ..llm.base import Generator, Message
from .stats import mean_std

#: Categories graded against a reference answer (FastChat ``NEED_REF_CATS``).
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")

#: FastChat's per-category sampling temperature for *answer generation* (``gen_model_answer.py``).
#: Useful when reproducing MT-Bench answers; the paper's fork reads it with a stale variable (paper.md 7).
TEMPERATURE_CONFIG = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
    "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}  # fmt: skip

_SINGLE_INSTRUCTION = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. "
)
_RATING_RULE = (
    "Be as objective as possible. After providing your explanation, you must rate the response on a scale of 1 "
    'to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".\n\n'
)


@dataclass(frozen=True)
class JudgePrompt:
    """One FastChat judge prompt (only single-answer grading is supported here)."""

    name: str
    system_prompt: str
    prompt_template: str
    output_format: str = "[[rating]]"
    category: str = "general"


#: Built-in fallback: FastChat's two first-turn single-answer prompts, written out here.
BUILTIN_JUDGE_PROMPTS: dict[str, JudgePrompt] = {
    "single-v1": JudgePrompt(
        name="single-v1",
        system_prompt="You are a helpful assistant.",
        prompt_template=_SINGLE_INSTRUCTION
        + "Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, "
        "creativity, and level of detail of the response. Begin your evaluation by providing a short explanation. "
        + _RATING_RULE
        + "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
    ),
    "single-math-v1": JudgePrompt(
        name="single-math-v1",
        system_prompt="You are a helpful assistant.",
        prompt_template=_SINGLE_INSTRUCTION
        + "Your evaluation should consider correctness and helpfulness. You will be given a reference answer and "
        "the assistant's answer. Begin your evaluation by comparing the assistant's answer with the reference "
        "answer. Identify and correct any mistakes. "
        + _RATING_RULE
        + "[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference "
        "Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
        category="math",
    ),
}


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = field(default=None, compare=False)

    @property
    def first_turn(self) -> str:
        return self.turns[0]

    @property
    def needs_reference(self) -> bool:
        return self.category in NEED_REF_CATS


# -- loading ---------------------------------------------------------------------------------------


def load_questions(path: str | Path) -> list[MTBenchQuestion]:
    """Read a FastChat ``question.jsonl``; validates ids (unique ints), category and turns."""
    out: list[MTBenchQuestion] = []
    seen: set[int] = set()
    for n, row in enumerate(iter_jsonl(path), 1):
        where = f"{path}, record {n}"
        qid, cat, turns = row.get("question_id"), row.get("category"), row.get("turns")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise DataError(f"{where}: 'question_id' must be an integer, got {qid!r}")
        if qid in seen:
            raise DataError(f"{where}: duplicate question_id {qid}")
        if not isinstance(cat, str) or not cat:
            raise DataError(f"{where}: 'category' must be a non-empty string")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise DataError(f"{where}: 'turns' must be a non-empty list of strings")
        ref = row.get("reference")
        seen.add(qid)
        out.append(MTBenchQuestion(qid, cat, tuple(turns), tuple(ref) if isinstance(ref, list) else None))
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def first_turn_prompts(questions: Sequence[MTBenchQuestion]) -> list[str]:
    """The first user turn of each question (MT-1 input), in order."""
    return [q.first_turn for q in questions]


def load_reference_answers(path: str | Path) -> dict[int, str]:
    """``question_id -> first-turn reference answer`` from a FastChat model-answer JSONL."""
    refs = load_answers(path)
    if not refs:
        raise DataError(f"{path}: no reference answers")
    return refs


def load_answers(path: str | Path) -> dict[int, str]:
    """First-turn answers from FastChat model-answer JSONL (``choices[0].turns[0]``) or from simple rows
    with ``question_id`` and ``response`` / ``answer`` / ``output``."""
    out: dict[int, str] = {}
    for n, row in enumerate(iter_jsonl(path), 1):
        where = f"{path}, record {n}"
        qid = row.get("question_id")
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise DataError(f"{where}: 'question_id' must be an integer, got {qid!r}")
        text = None
        if "choices" in row:
            try:
                text = row["choices"][0]["turns"][0]
            except (KeyError, IndexError, TypeError):
                raise DataError(f"{where}: 'choices' is not FastChat's [{{'turns': [...]}}] shape") from None
        else:
            text = next((row[k] for k in ("response", "answer", "output") if k in row), None)
        if not isinstance(text, str):
            raise DataError(f"{where}: no first-turn answer text (expected choices[0].turns[0] or 'response')")
        out[qid] = text
    return out


def load_judge_prompts(path: str | Path | None = None) -> dict[str, JudgePrompt]:
    """Judge prompts by name from a FastChat ``judge_prompts.jsonl``; the built-ins when ``path`` is None.

    Prompts in the file override the built-ins of the same name; built-ins fill any gap, so a file with
    only ``single-v1`` still grades math with ``single-math-v1``.
    """
    prompts = dict(BUILTIN_JUDGE_PROMPTS)
    if path is None:
        return prompts
    for n, row in enumerate(iter_jsonl(path), 1):
        missing = [k for k in ("name", "system_prompt", "prompt_template") if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}, record {n}: missing string field(s) {missing}")
        prompts[row["name"]] = JudgePrompt(
            row["name"], row["system_prompt"], row["prompt_template"],
            row.get("output_format", "[[rating]]"), row.get("category", "general"),
        )  # fmt: skip
    return prompts


# -- judging ---------------------------------------------------------------------------------------


def build_judge_messages(
    question: str, answer: str, prompt: JudgePrompt, ref_answer: str | None = None
) -> list[Message]:
    """System + user messages for one single-answer judgement, exactly as FastChat formats them."""
    fields = {"question": question, "answer": answer}
    if "{ref_answer_1}" in prompt.prompt_template:
        if ref_answer is None:
            raise DataError(f"judge prompt {prompt.name!r} needs a reference answer")
        fields["ref_answer_1"] = ref_answer
    user = prompt.prompt_template.format(**fields)
    return [{"role": "system", "content": prompt.system_prompt}, {"role": "user", "content": user}]


_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str) -> float | None:
    """FastChat's rule: the first ``[[x]]``, else the first ``[x]``; None unless 1 <= x <= 10."""
    m = _SCORE.search(text) or _SCORE_BACKUP.search(text)
    if not m:
        return None
    value = float(m.group(1))
    return value if 1.0 <= value <= 10.0 else None


def grade_first_turn(
    questions: Sequence[MTBenchQuestion],
    answers: Mapping[int, str] | Sequence[str],
    generator: Generator,
    *,
    judge_prompts: Mapping[str, JudgePrompt] | None = None,
    references: Mapping[int, str] | None = None,
    max_new_tokens: int = 2048,
    temperature: float = 0.0,
) -> list[dict[str, Any]]:
    """Grade each question's first-turn answer with an LLM judge (1-10).

    ``answers`` is ``{question_id: text}`` or a list aligned with ``questions``. Reference categories use
    ``single-math-v1`` when a reference answer exists; with ``references=None`` they fall back to
    ``single-v1`` with a warning (the record's ``judge_prompt`` says which was used). Returns one record
    per question: ``question_id, category, judge_prompt, score (None if unparsed), label, judgment``.
    """
    prompts = dict(judge_prompts) if judge_prompts is not None else load_judge_prompts()
    for name in ("single-v1", "single-math-v1"):
        if name not in prompts:
            raise DataError(f"judge prompts lack {name!r}")
    if isinstance(answers, Mapping):
        missing = [q.question_id for q in questions if q.question_id not in answers]
        if missing:
            raise DataError(f"no answer for question_id(s) {missing[:10]}")
        texts = [answers[q.question_id] for q in questions]
    else:
        if len(answers) != len(questions):
            raise DataError(f"{len(answers)} answers for {len(questions)} questions")
        texts = list(answers)

    msgs, used = [], []
    no_ref = []
    for q, a in zip(questions, texts):
        ref = references.get(q.question_id) if references is not None else None
        if q.needs_reference and ref is not None:
            name = "single-math-v1"
        else:
            if q.needs_reference:
                no_ref.append(q.question_id)
            name = "single-v1"
        used.append(name)
        msgs.append(build_judge_messages(q.first_turn, a, prompts[name], ref))
    if no_ref:
        warnings.warn(
            f"{len(no_ref)} math/reasoning/coding question(s) graded without a reference answer "
            f"(single-v1), unlike FastChat: {no_ref[:10]}",
            stacklevel=2,
        )
    judgments = generator.generate(msgs, max_new_tokens=max_new_tokens, temperature=temperature)
    records = []
    for q, name, text in zip(questions, used, judgments):
        score = parse_rating(text)
        records.append(
            {
                "question_id": q.question_id,
                "category": q.category,
                "judge_prompt": name,
                "score": score,
                "label": "n/a" if score is not None else "unparsed",
                "judgment": text,
            }
        )
    return records


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """MT-1 = mean score over parsed judgements, plus the unparsed count and per-category means."""
    scores = [r["score"] for r in records if r.get("score") is not None]
    mean, std = mean_std(scores)
    per_cat: dict[str, list[float]] = {}
    for r in records:
        if r.get("score") is not None:
            per_cat.setdefault(r["category"], []).append(r["score"])
    return {
        "n": len(records),
        "n_scored": len(scores),
        "unparsed": len(records) - len(scores),
        "mean": mean,
        "std": std,
        "per_category": {c: mean_std(v)[0] for c, v in sorted(per_cat.items())},
    }


def dump_judge_prompts(prompts: Mapping[str, JudgePrompt]) -> str:
    """JSONL text of prompts in FastChat's format (for recording exactly what was used)."""
    return "".join(
        json.dumps(
            {"name": p.name, "type": "single", "system_prompt": p.system_prompt,
             "prompt_template": p.prompt_template, "category": p.category, "output_format": p.output_format},
            ensure_ascii=False,
        ) + "\n"
        for p in prompts.values()
    )  # fmt: skip
