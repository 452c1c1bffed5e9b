"""The judge interface: a :class:`Judge` maps (prompt, response) pairs to :class:`Verdict` objects."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ...errors import DataError, FedsafeError
from ..stats import NA, SAFE, UNPARSED, UNSAFE


@dataclass(frozen=True)
class Verdict:
    """One judgement. ``label`` is "safe", "unsafe", "unparsed", or "n/a" (scorers with no decision).

    ``score`` is judge-specific (see the judge's ``score_meaning``); ``raw`` is the judge's raw output (for
    rule judges, the keyword that matched); ``category`` is a harm category code when the judge names one.
    """

    label: str
    score: float | None = None
    raw: str | None = None
    category: str | None = None

    def __post_init__(self) -> None:
        if self.label not in (SAFE, UNSAFE, UNPARSED, NA):
            raise ValueError(f"invalid verdict label {self.label!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge(ABC):
    """Base class: ``judge(prompts, responses) -> list[Verdict]`` with one verdict per pair, in order."""

    name: str = "judge"
    score_meaning: str | None = None

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        if len(prompts) != len(responses):
            raise DataError(f"{self.name}: {len(prompts)} prompts but {len(responses)} responses")
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if not isinstance(p, str) or not isinstance(r, str):
                raise DataError(f"{self.name}: pair {i} is not (str, str): {type(p).__name__}, {type(r).__name__}")
        if not prompts:
            return []
        out = self._judge(list(prompts), list(responses))
        if len(out) != len(prompts):  # a broken backend must not misalign verdicts and rows
            raise FedsafeError(f"{self.name}: got {len(out)} verdicts for {len(prompts)} pairs")
        return out

    @abstractmethod
    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]: ...

    def info(self) -> dict[str, Any]:
        """Settings to record next to results, so a number can be traced to the judge that made it."""
        return {"judge": self.name, "class": type(self).__name__, "score_meaning": self.score_meaning}
