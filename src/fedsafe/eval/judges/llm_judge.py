"""LLM judges in general: the prompt sent through a :class:`~fedsafe.llm.base.Generator` (a local model or
an OpenAI-compatible endpoint), and the parsing of what comes back."""

from __future__ import annotations

import re
from abc import abstractmethod
from typing import Any, Callable

from ...errors import ConfigError, FedsafeError
from ...llm.base import Generator, Message, Prompt
from ...llm.endpoint import EndpointConfig, EndpointGenerator
from .base import Judge, Verdict


class LLMJudge(Judge):
    """A judge that prompts a :class:`~fedsafe.llm.base.Generator` and parses its text.

    Decoding defaults to greedy (temperature 0) as in every anchor judge.
    """

    default_max_new_tokens = 64

    def __init__(
        self,
        generator: Generator,
        *,
        raw: bool = False,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ):
        if generator is None or not callable(getattr(generator, "generate", None)):
            raise ConfigError(f"judge {self.name!r} needs a generator (EndpointGenerator or HFGenerator)")
        self.generator = generator
        self.raw = raw
        self.max_new_tokens = max_new_tokens or self.default_max_new_tokens
        self.temperature = temperature
        self.seed = seed
        if raw:
            self.render_raw("p", "r")  # fail at construction if this judge has no raw format

    def build(self, prompt: str, response: str) -> Prompt:
        """What is sent to the generator for one pair."""
        return self.render_raw(prompt, response) if self.raw else self.messages(prompt, response)

    @abstractmethod
    def messages(self, prompt: str, response: str) -> list[Message]: ...

    def render_raw(self, prompt: str, response: str) -> str:
        raise ConfigError(f"judge {self.name!r} has no raw prompt format; use raw=False with a chat template")

    @abstractmethod
    def parse(self, text: str) -> Verdict: ...

    def _judge(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        inputs = [self.build(p, r) for p, r in zip(prompts, responses)]
        texts = self.generator.generate(
            inputs, max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed
        )
        if len(texts) != len(inputs):
            raise FedsafeError(f"{self.name}: generator returned {len(texts)} outputs for {len(inputs)} inputs")
        return [self.parse(t if isinstance(t, str) else "") for t in texts]

    def info(self) -> dict[str, Any]:
        return super().info() | {
            "generator": repr(self.generator),
            "raw": self.raw,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
        }


_WORD = re.compile(r"[A-Za-z]+")


def _first_word(text: str) -> str | None:
    """Lower-cased first alphabetic word of the first non-empty line (tolerates "**Safe**", " safe.")."""
    for line in text.strip().splitlines():
        m = _WORD.search(line)
        if m and not line[: m.start()].strip("*_`'\" #>:-"):
            return m.group(0).lower()
        if line.strip():
            return None
    return None


def _second_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else ""


def _llm(cls: type[LLMJudge]) -> Callable[..., Judge]:
    def make(**opts: Any) -> Judge:
        gen = opts.pop("generator", None)
        endpoint = opts.pop("endpoint", None)
        if gen is None and endpoint is not None:
            cfg = endpoint if isinstance(endpoint, EndpointConfig) else EndpointConfig(**dict(endpoint))
            gen = EndpointGenerator(cfg)
        if gen is None:
            raise ConfigError(f"judge {cls.name!r} needs generator=... or endpoint=EndpointConfig(...)")
        try:
            return cls(gen, **opts)
        except TypeError as e:
            raise ConfigError(f"bad option for judge {cls.name!r}: {e}") from None

    return make
