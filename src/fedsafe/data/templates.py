"""Prompt templates and response-only tokenisation.

``alpaca`` is the paper's template exactly (paper.md §1; OpenFedLLM ``utils/template.py``):
    "Below is an instruction ... request.\n\n### Instruction:\n{instr} \n\n### Response: {resp}{eos}"
Its prompt part ends at "### Response:" (what the paper's evaluation feeds the model) and the response
part is " {resp}" + EOS. ``chat`` uses the tokenizer's own chat template (ChatML for SmolLM2) with the
generation prompt, and ends the response with the template's end-of-turn token.

Loss is on response tokens only: prompt tokens get label -100. Prompt and response are tokenised
separately so the mask boundary is exact (no BPE merge across it), which also makes the paper's
"response template token ids [2:]" trick unnecessary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
TEMPLATES = ("chat", "alpaca")
IGNORE = -100


def format_prompt(template: str, tokenizer, instruction: str) -> str:
    """The model input for an instruction, ending where the response starts."""
    if template == "alpaca":
        return f"{ALPACA_HEADER}\n\n### Instruction:\n{instruction} \n\n### Response:"
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("model.template=chat but this tokenizer has no chat template; use model.template=alpaca")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    raise ConfigError(f"unknown template {template!r}; choose one of: {', '.join(TEMPLATES)}")


def format_response(template: str, tokenizer, response: str) -> str:
    if template == "alpaca":
        return " " + response + (tokenizer.eos_token or "")
    # ChatML-style templates close the turn with the eos token (<|im_end|> for SmolLM2)
    return response + (tokenizer.eos_token or "")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def tokenize_pair(tokenizer, template: str, instruction: str, response: str, seq_length: int,
                  max_prompt_length: int, loss_from: int = 0) -> Example:
    """``loss_from > 0``: the first ``loss_from`` characters of ``response`` are context, not targets (a
    safety-recovery example's harmful opening, :func:`fedsafe.defense.data.with_recovery`); they keep at most
    half of the response budget so that the part trained on is never cut away."""
    # add_special_tokens=True for the prompt (a BOS where the tokenizer uses one) matches how the
    # evaluation generator tokenises prompts, so training and generation see the same inputs
    p = tokenizer(format_prompt(template, tokenizer, instruction), add_special_tokens=True)["input_ids"]
    text = format_response(template, tokenizer, response)
    if len(p) > max_prompt_length:
        # keep the end of the prompt: it carries the template's "assistant" marker the model must see
        head = max_prompt_length // 2
        p = p[:head] + p[len(p) - (max_prompt_length - head):]
    budget = max(1, seq_length - len(p))
    if loss_from > 0:
        cut = max(text.find(response), 0) + loss_from
        pre = tokenizer(text[:cut], add_special_tokens=False)["input_ids"][: budget // 2]
        r = tokenizer(text[cut:], add_special_tokens=False)["input_ids"][: max(1, budget - len(pre))]
        return Example(input_ids=p + pre + r, labels=[IGNORE] * (len(p) + len(pre)) + r)
    r = tokenizer(text, add_special_tokens=False)["input_ids"][:budget]
    return Example(input_ids=p + r, labels=[IGNORE] * len(p) + r)


def tokenize_records(tokenizer, template: str, records: Sequence, seq_length: int, max_prompt_length: int) -> list[Example]:
    """Tokenise once per run (not per round): records with ``instruction`` and ``response``."""
    return [tokenize_pair(tokenizer, template, r.instruction, r.response, seq_length, max_prompt_length) for r in records]


def collate(examples: Sequence[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example."""
    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e.input_ids)
        ids[i, :L] = torch.tensor(e.input_ids)
        labels[i, :L] = torch.tensor(e.labels)
        mask[i, :L] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
