"""Local transformers backend for the :class:`~fedsafe.llm.base.Generator` protocol.

Works with any ``AutoModelForCausalLM`` (a ``peft.PeftModel`` wrapping one works unchanged, since it
forwards ``generate``). Design choices and why:

* **Left padding**: decoder-only models continue from the last position, so pads must sit on the left.
  Prompts are tokenised one by one and padded by hand so each can use its own special-token policy.
* **Length-sorted batches**: prompts are sorted by token length before batching (less padding, fewer
  wasted FLOPs) and the outputs are put back into input order.
* **Decoding**: ``temperature == 0`` -> greedy (``do_sample=False``); otherwise multinomial sampling with
  ``top_k=0`` (disabled) so that temperature/top-p mean the same as in vLLM/OpenAI, which the paper
  used for answer generation (T=0.7, top-p 1). Seeding happens inside ``torch.random.fork_rng`` so the
  caller's global RNG state is left untouched.
* **Prompt formatting**: a plain-string prompt goes through ``format_prompt`` (e.g. the Alpaca template
  the model was fine-tuned with). With ``format_prompt=None``, or for message lists with more than one
  user turn, the tokenizer's chat template is used instead.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from ..errors import ConfigError
from .base import ProgressBar, Prompt, check_sampling, to_messages


class HFGenerator:
    """Batched generation with a local causal LM.

    Parameters
    ----------
    model : transformers.PreTrainedModel or peft.PeftModel
    tokenizer : transformers.PreTrainedTokenizerBase
        A pad token is needed for batching; if absent, the EOS token is used as pad (the standard
        workaround for Llama/Mistral tokenizers). The tokenizer is not modified.
    format_prompt : callable(str) -> str, or None
        Turns an instruction into the full model input text. ``None`` -> use the tokenizer's chat template.
    batch_size : int, default 16
    device : str or torch.device, optional
        If given, the model is moved there; otherwise inputs go to the model's current device.
    progress : bool, default False
        Show a rich progress bar over batches.
    prefill : callable, optional
        ``prefill(token_lists, input_ids, attention_mask) -> dict | None``: keyword arguments that hand
        ``generate`` a cache for all but the batch's last column (e.g. computed from cached frozen-layer
        states, :meth:`fedsafe.runtime.Runtime.prompt_prefill`); ``None`` -> an ordinary prefill.
    """

    def __init__(
        self,
        model,
        tokenizer,
        format_prompt: Callable[[str], str] | None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        progress: bool = False,
        prefill: Callable | None = None,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.format_prompt = format_prompt
        self.batch_size = int(batch_size)
        self.progress = progress
        self.prefill = prefill
        if device is not None:
            self.model.to(device)
            self.device = torch.device(device)
        else:
            self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise ConfigError("tokenizer has neither a pad nor an eos token; cannot pad a batch")

    def __repr__(self) -> str:
        name = getattr(getattr(self.model, "config", None), "_name_or_path", "") or type(self.model).__name__
        return f"HFGenerator(model={name!r}, batch_size={self.batch_size}, device={str(self.device)!r})"

    # -- prompt rendering -------------------------------------------------------------------------
    def render(self, prompt: Prompt, system: str | None = None) -> tuple[str, bool]:
        """Full input text for one prompt, and whether the tokenizer should add special tokens.

        Chat-template output already contains BOS etc., so it is tokenised with
        ``add_special_tokens=False`` to avoid a doubled BOS.
        """
        if self.format_prompt is not None:
            if isinstance(prompt, str) and system is None:
                return self.format_prompt(prompt), True
            msgs = to_messages(prompt, system)
            if len(msgs) == 1 and msgs[0]["role"] == "user":
                return self.format_prompt(msgs[0]["content"]), True
        msgs = to_messages(prompt, system)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "this prompt needs a chat template (a system message or several turns, or format_prompt=None) "
                "but the tokenizer has none; pass single-turn prompts with format_prompt, or use a chat model"
            )
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text, False

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        system: str | None = None,
    ) -> list[str]:
        check_sampling(max_new_tokens, temperature, top_p)
        encoded = []
        for p in prompts:
            text, special = self.render(p, system)
            ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
            if not ids:
                raise ConfigError(f"prompt {len(encoded)} encodes to zero tokens; nothing to condition on")
            encoded.append(ids)
        if not encoded:
            return []
        # Longest first: an OOM shows up on the first batch rather than at the end of a long run.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        outputs: list[str | None] = [None] * len(encoded)
        sample = temperature > 0
        gen_kwargs = dict(
            max_new_tokens=int(max_new_tokens),
            do_sample=sample,
            pad_token_id=self.pad_id,
        )
        if sample:
            gen_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            # Explicit None silences warnings about sampling-only fields in the model's generation_config.
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)

        was_training = self.model.training
        self.model.eval()
        bar = ProgressBar(len(order), "generating", enabled=self.progress)
        fork_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        rng_ctx = torch.random.fork_rng(devices=fork_devices) if seed is not None else contextlib.nullcontext()
        try:
            with rng_ctx, torch.inference_mode(), bar:
                if seed is not None:
                    torch.manual_seed(int(seed))
                for start in range(0, len(order), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    input_ids, attn = self._left_pad([encoded[i] for i in idx])
                    cached = None
                    if self.prefill is not None and input_ids.shape[1] > 1:
                        cached = self.prefill([encoded[i] for i in idx], input_ids, attn)
                    out = self.model.generate(input_ids=input_ids, attention_mask=attn, **gen_kwargs, **(cached or {}))
                    new = out[:, input_ids.shape[1] :]
                    texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
                    for i, t in zip(idx, texts):
                        outputs[i] = t.strip()
                    bar.advance(len(idx))
        finally:
            if was_training:
                self.model.train()
        return outputs  # type: ignore[return-value]

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            attn[row, width - len(s) :] = 1
        return ids.to(self.device), attn.to(self.device)
