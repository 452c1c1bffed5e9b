"""Language-model helpers shared by training, evaluation and the defense.

The response-only loss (the LM head runs only at response positions: with a 49k vocabulary it costs as
much as several transformer layers, and prompt positions carry no loss anyway), frozen-prefix caching
(hidden states entering the first adapted layer), and the paper's cosine learning-rate schedule. These
sit beside :mod:`fedsafe.models`, below ``fl/``, ``eval/`` and ``defense/``, which all use them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .data.templates import IGNORE, Example, collate


def autocast_ctx(kind: str, device: torch.device):
    if kind == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_loss(model, batch: dict[str, torch.Tensor], autocast: str = "none") -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over response tokens; returns (loss, number of loss tokens).

    With ``batch["prefix"]`` (cached hidden states entering the first adapted layer, see
    :func:`prefix_hidden`) only the decoder layers from ``batch["first_layer"]`` on are run.
    """
    logits, targets, _rows = response_logits(model, batch, autocast)
    n = int(targets.numel())
    if n == 0:
        return logits.sum() * 0.0, 0
    return F.cross_entropy(logits.float(), targets), n


def response_logits(model, batch: dict[str, torch.Tensor], autocast: str = "none"):
    """Logits at response positions only, their targets, and the batch row each one comes from."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = batch["labels"].device
    labels = batch["labels"][:, 1:]
    sel = labels != IGNORE
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    with autocast_ctx(autocast, device):
        if "prefix" in batch:
            with top_layers_only(decoder, batch["first_layer"]):
                h = decoder(inputs_embeds=batch["prefix"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = head(h[:, :-1][sel])
        elif decoder is None or head is None:  # generic fallback: full logits
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1][sel]
        else:
            h = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            logits = head(h[:, :-1][sel])
    return logits, labels[sel], sel.nonzero(as_tuple=True)[0]


@contextlib.contextmanager
def top_layers_only(decoder, first: int):
    """Temporarily drop the decoder layers below ``first`` (their output comes from the prefix cache)."""
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(full)[first:])
    try:
        yield
    finally:
        decoder.layers = full


class _StopForward(Exception):
    pass


@torch.no_grad()
def prefix_hidden(
    model, examples: Sequence[Example], first: int, device, batch_size: int = 16, autocast: str = "none"
) -> list[torch.Tensor]:
    """Hidden states entering decoder layer ``first`` for each example (frozen-prefix caching).

    When LoRA touches only layers >= ``first``, everything below is frozen, so these states never change
    during a run: computing them once and training only the top of the network gives the same loss and
    gradients as the full forward (checked in tests) at a fraction of the cost. Right padding plus causal
    attention means pads never influence real positions, so batched computation is exact.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    captured: list[torch.Tensor] = []

    def grab(_mod, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        raise _StopForward

    out: list[torch.Tensor] = []
    hook = decoder.layers[first].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        res: dict[int, torch.Tensor] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate([examples[i] for i in idx], 0, device)
            captured.clear()
            try:
                with autocast_ctx(autocast, torch.device(device)):
                    decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            except _StopForward:
                pass
            h = captured[0].float().cpu()
            for j, i in enumerate(idx):
                res[i] = h[j, : len(examples[i].input_ids)].clone()
        out = [res[i] for i in range(len(examples))]
    finally:
        hook.remove()
    return out


def collate_prefix(examples: Sequence[Example], prefix: Sequence[torch.Tensor], first: int, device) -> dict:
    batch = collate(examples, 0, device)
    T = batch["labels"].shape[1]
    H = prefix[0].shape[-1]
    hs = torch.zeros((len(examples), T, H), dtype=prefix[0].dtype)
    for i, p in enumerate(prefix):
        hs[i, : p.shape[0]] = p
    del batch["input_ids"]
    batch["prefix"] = hs.to(device)
    batch["first_layer"] = first
    return batch


def cosine_lr(step: int, total: int, lr: float, lr_min: float, schedule: str = "cosine") -> float:
    """The paper's learning rate: cosine from ``lr`` (at step 0) to ``lr_min`` over ``total`` steps
    (OpenFedLLM ``cosine_learning_rate``); ``schedule="constant"`` keeps ``lr``.

    The federation steps it once per round (constant within a round, ``step`` = round index from 0);
    the server-side defense once per optimiser step.
    """
    if schedule == "constant" or total <= 1:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * step / total))
