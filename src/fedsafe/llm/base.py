"""The one text-generation interface shared by attack-data generation and LLM judges.

Two backends implement it: :class:`~fedsafe.llm.endpoint.EndpointGenerator` (any OpenAI-compatible
``/chat/completions`` server: vLLM, llama.cpp, TGI, OpenAI) and :class:`~fedsafe.llm.hf.HFGenerator`
(a local transformers causal LM, optionally with a peft adapter). Callers only see :class:`Generator`.
"""

from __future__ import annotations

from typing import Protocol, Sequence, Union, runtime_checkable

from ..errors import ConfigError

#: One chat message in the OpenAI wire format: ``{"role": "user", "content": "..."}``.
Message = dict[str, str]
#: A prompt is either a plain instruction (becomes one user message) or a full message list.
Prompt = Union[str, Sequence[Message]]

_ROLES = {"system", "user", "assistant"}


@runtime_checkable
class Generator(Protocol):
    """Anything that turns a batch of prompts into a batch of completions, order preserved.

    ``temperature == 0`` means greedy / deterministic decoding. ``system`` is prepended as a system
    message to every prompt. Implementations return only the newly generated text.
    """

    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
    ) -> list[str]: ...


def to_messages(prompt: Prompt, system: str | None = None) -> list[Message]:
    """Normalise a prompt to a message list (validated), prepending ``system`` if given."""
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    else:
        msgs = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise ConfigError(
                    f"prompt message {i} must be a dict with role in {sorted(_ROLES)} and string content, got {m!r:.120}"
                )
            msgs.append({"role": m["role"], "content": m["content"]})
        if not msgs:
            raise ConfigError("empty message list given as a prompt")
    if system is not None:
        if msgs[0]["role"] == "system":
            raise ConfigError("system= given but the prompt already starts with a system message")
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Reject nonsense decoding settings early (before any network call or model load)."""
    if int(max_new_tokens) < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")


class ProgressBar:
    """A rich progress bar used as a context manager; a no-op when ``enabled`` is false."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self._prog = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._prog = Progress(
                TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
            )
            self._task = self._prog.add_task(label, total=total)

    def __enter__(self) -> "ProgressBar":
        if self._prog is not None:
            self._prog.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._prog is not None:
            self._prog.stop()
        return False

    def advance(self, n: int = 1) -> None:
        if self._prog is not None:
            self._prog.advance(self._task, n)
