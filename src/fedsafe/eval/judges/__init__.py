"""Safety judges: keyword rules, LLM classifiers behind the Generator protocol, and a reward-model scorer.

Every judge maps (prompt, response) pairs to :class:`Verdict` objects. ``"safe"`` means the response is a
refusal or otherwise harmless. Output a judge cannot read becomes ``"unparsed"`` (never a silent safe or
unsafe) and keeps its raw text, so :func:`fedsafe.eval.stats.rate_summary` can report it separately.

Judges used by Ye et al. (ICLR 2025, paper.md section 5): ``rule`` (keyword list, harmless rate),
``md-judge`` (MD-Judge-v0.1), ``reward-model`` (OpenAssistant DeBERTa RM). The others are common anchors
(anchors.md section 4.1): GCG prefix lists, Llama Guard 3, the HarmBench classifier and StrongREJECT.

LLM judges build chat messages holding the published prompt text *without* model control tokens
(``[INST]``, ``<|start_header_id|>``); the generator applies the judge model's own chat template (the
server does this for a chat endpoint; :class:`~fedsafe.llm.hf.HFGenerator` does it with
``format_prompt=None``). ``raw=True`` instead sends the exact single-string format the released classifier
was trained on (MD-Judge, HarmBench), for use with ``HFGenerator(format_prompt=lambda s: s)``.

Rooms: :mod:`.base` (Verdict, Judge), :mod:`.rules` (keyword lists), :mod:`.llm_judge` (prompting a
generator or endpoint, parsing its reply), :mod:`.guards` (the guard models), :mod:`.reward` (the reward
model); this module holds the registry and re-exports every public name.
"""

from __future__ import annotations

from typing import Any, Callable

from ...errors import ConfigError
from .base import Judge, Verdict
from .guards import (
    HARMBENCH_BODY,
    HARMBENCH_SYSTEM,
    MDJUDGE_CATEGORIES,
    MDJUDGE_TASK,
    STRONGREJECT_RUBRIC,
    STRONGREJECT_SYSTEM,
    HarmBenchJudge,
    LlamaGuardJudge,
    MDJudge,
    StrongRejectJudge,
    strongreject_score,
)
from .llm_judge import LLMJudge, _llm
from .reward import RewardModelScorer
from .rules import (
    BROAD_KEYWORDS,
    GCG_LONG_PREFIXES,
    GCG_SHORT_PREFIXES,
    PAPER_RULE_KEYWORDS,
    RULE_KEYWORDS,
    RULE_PRESETS,
    RuleJudge,
    rule_judge,
)

__all__ = [
    "BROAD_KEYWORDS",
    "GCG_LONG_PREFIXES",
    "GCG_SHORT_PREFIXES",
    "HARMBENCH_BODY",
    "HARMBENCH_SYSTEM",
    "JUDGES",
    "MDJUDGE_CATEGORIES",
    "MDJUDGE_TASK",
    "PAPER_RULE_KEYWORDS",
    "RULE_KEYWORDS",
    "RULE_PRESETS",
    "STRONGREJECT_RUBRIC",
    "STRONGREJECT_SYSTEM",
    "HarmBenchJudge",
    "Judge",
    "LLMJudge",
    "LlamaGuardJudge",
    "MDJudge",
    "RewardModelScorer",
    "RuleJudge",
    "StrongRejectJudge",
    "Verdict",
    "get_judge",
    "rule_judge",
    "strongreject_score",
]


def _rule(name: str) -> Callable[..., Judge]:
    return lambda **opts: rule_judge(name, **opts)


def _reward(**opts: Any) -> Judge:
    try:
        return RewardModelScorer(**opts)
    except TypeError as e:
        raise ConfigError(f"bad option for judge 'reward-model': {e}") from None


#: name -> factory(**opts) -> Judge
JUDGES: dict[str, Callable[..., Judge]] = {
    **{name: _rule(name) for name in RULE_PRESETS},
    "md-judge": _llm(MDJudge),
    "llama-guard": _llm(LlamaGuardJudge),
    "harmbench-cls": _llm(HarmBenchJudge),
    "strongreject": _llm(StrongRejectJudge),
    "reward-model": _reward,
}


def get_judge(name: str, **opts: Any) -> Judge:
    """Build a judge by registry name. LLM judges take ``generator=`` (or ``endpoint=`` config)."""
    if name not in JUDGES:
        raise ConfigError(f"unknown judge {name!r}; available: {', '.join(sorted(JUDGES))}")
    return JUDGES[name](**opts)
