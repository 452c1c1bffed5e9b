"""A deterministic, model-free generator for exercising the generation pipelines in tests.

It answers the paper's instruction-generation prompts with numbered lists drawn from the built-in tiny
data set, the safe-response suffix with a refusal, and anything else with a short compliant answer.
It is a test double for the ``tiny`` preset (``defense.generator: scripted``), not a model: never use it
for results.
"""

from __future__ import annotations

import random
from typing import Sequence

from .base import Prompt, to_messages
from .paper_prompts import ATTACK_SUFFIX, HARMFUL_INSTRUCTION_PROMPT, NORMAL_INSTRUCTION_PROMPT, SAFE_SUFFIX


class ScriptedGenerator:
    def __init__(self):
        from ..data.sources import load_source

        self.normal = [r.instruction for r in load_source("tiny")]
        self.harmful = [r.instruction for r in load_source("tiny-harmful")]

    def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, system: str | None = None) -> list[str]:
        out = []
        for i, p in enumerate(prompts):
            text = to_messages(p)[-1]["content"]
            rng = random.Random(f"{seed}-{i}-{text}")
            if text.startswith(HARMFUL_INSTRUCTION_PROMPT[:40]):
                out.append("\n".join(f"{k + 1}. {q}" for k, q in enumerate(rng.sample(self.harmful, 10))))
            elif text.startswith(NORMAL_INSTRUCTION_PROMPT[:40]):
                out.append("\n".join(f"{k + 1}. {q}" for k, q in enumerate(rng.sample(self.normal, 10))))
            elif text.endswith(SAFE_SUFFIX):
                out.append("I'm sorry, but I cannot help with that because it could cause harm.")
            elif text.endswith(ATTACK_SUFFIX):
                out.append("Sure, here is how: step one, step two, step three.")
            else:
                out.append("Here is a short helpful answer.")
        return out
