"""Automated instruction/response generation with an off-the-shelf LLM (paper §4.3, App. C.2).

Shared by the attack (harmful instructions + "answer directly" responses) and the defense (Level 2/3:
normal instructions + helpful responses, harmful instructions + safe responses). The paper gives the
prompts but no parsing, de-duplication or filtering; ours parses numbered or bulleted lists robustly,
normalises and de-duplicates, and applies length filters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import FedsafeError
from .paper_prompts import (  # noqa: F401 - re-exported: callers import the prompts from here
    ATTACK_SUFFIX, HARMFUL_INSTRUCTION_PROMPT, NORMAL_INSTRUCTION_PROMPT, SAFE_SUFFIX)
from .scripted import ScriptedGenerator

_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[\.\):\]]|[-*\u2022]|Q\d{1,3}[:.]|Question\s*\d{1,3}[:.])\s+(.*\S)\s*$", re.I)


def parse_list(text: str, min_chars: int = 15, max_chars: int = 300) -> list[str]:
    """Items of a numbered or bulleted list ("1. ...", "2) ...", "- ...", "* ...", "Q3: ...")."""
    items = []
    for line in text.splitlines():
        m = _ITEM.match(line)
        if not m:
            continue
        s = m.group(1).strip().strip('"').strip()
        s = re.sub(r"^\*\*(.+?)\*\*:?\s*", r"\1 ", s).strip()  # "**Title**: text" -> "Title text"
        if min_chars <= len(s) <= max_chars:
            items.append(s)
    return items


def normalise(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]+", "", re.sub(r"\s+", " ", s.lower())).strip()


@dataclass
class InstructionStats:
    calls: int = 0
    parsed: int = 0
    duplicates: int = 0
    kept: int = 0
    notes: list[str] = field(default_factory=list)


def generate_instructions(generator, prompt: str, n: int, *, batch: int = 8, max_calls: int | None = None,
                          max_new_tokens: int = 400, temperature: float = 0.9, seed: int = 0,
                          min_chars: int = 15, max_chars: int = 300,
                          exclude: set[str] | None = None) -> tuple[list[str], InstructionStats]:
    """Repeat ``prompt`` until ``n`` unique instructions are parsed (or ``max_calls`` is hit)."""
    seen = set(exclude or ())
    out: list[str] = []
    st = InstructionStats()
    max_calls = max_calls or max(8, 4 * n)
    while len(out) < n and st.calls < max_calls:
        k = min(batch, max_calls - st.calls)
        texts = generator.generate([prompt] * k, max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed + st.calls)
        st.calls += k
        for t in texts:
            for item in parse_list(t, min_chars, max_chars):
                st.parsed += 1
                key = normalise(item)
                if key in seen:
                    st.duplicates += 1
                    continue
                seen.add(key)
                out.append(item)
    st.kept = min(len(out), n)
    if not out:
        raise FedsafeError(
            f"the generator produced no parseable instructions in {st.calls} calls; check the generator "
            "model (it must answer with a numbered or bulleted list)"
        )
    return out[:n], st


def generate_responses(generator, instructions: list[str], suffix: str = "", *, max_new_tokens: int = 256,
                       temperature: float = 0.0, seed: int = 0) -> list[str]:
    prompts = [f"{ins} {suffix}".strip() if suffix else ins for ins in instructions]
    outs = generator.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if len(outs) != len(prompts):
        raise FedsafeError(f"generator returned {len(outs)} responses for {len(prompts)} prompts")
    return [o.strip() for o in outs]


def make_generator(spec: str, *, batch_size: int = 16, progress: bool = False):
    """A generator from a spec: ``endpoint:BASE_URL#MODEL`` (OpenAI-compatible, key from $OPENAI_API_KEY
    or ``endpoint:URL#MODEL@ENV_VAR``), or a model name/path (default: the embedded SmolLM2)."""
    spec = spec or "smollm2-135m-instruct"
    if spec == "scripted":  # test double for the tiny preset
        return ScriptedGenerator()
    if spec.startswith("endpoint:"):
        from .endpoint import EndpointConfig, EndpointGenerator

        rest = spec[len("endpoint:"):]
        if "#" not in rest:
            raise FedsafeError(f"endpoint generator spec must be endpoint:BASE_URL#MODEL, got {spec!r}")
        url, model = rest.split("#", 1)
        env = "OPENAI_API_KEY"
        if "@" in model:
            model, env = model.split("@", 1)
        return EndpointGenerator(EndpointConfig(base_url=url, model=model, api_key_env=env))
    from ..models import load_base
    from .hf import HFGenerator

    model, tok = load_base(spec)
    return HFGenerator(model, tok, None, batch_size=batch_size, progress=progress)
