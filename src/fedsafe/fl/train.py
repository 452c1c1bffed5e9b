"""Local SFT of the shared LoRA adapter: response-only loss, AdamW, FedProx and SCAFFOLD hooks.

The frozen base is shared by all clients; only the LoRA parameters (``LoraHandle.params``) train.
The loss evaluates the LM head only at response positions: with a 49k vocabulary the head costs as
much as several transformer layers, and prompt positions carry no loss anyway.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.templates import IGNORE, Example, collate


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
def prefix_hidden(model, examples: Sequence[Example], first: int, device, batch_size: int = 16,
                  autocast: str = "none") -> list[torch.Tensor]:
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


@dataclass
class LocalResult:
    loss: float  # token-weighted mean training loss over the local steps
    steps: int
    tokens: int


def batch_plan(n_examples: int, steps: int, batch_size: int, grad_accum: int, gen: torch.Generator) -> list[list[int]]:
    """Indices of every micro-batch for one client's round: a seeded random subset of
    ``steps * batch_size * grad_accum`` examples (with wrap-around for small clients), as the paper's
    per-round subsampling does."""
    need = steps * batch_size * grad_accum
    order = []
    while len(order) < need:
        order.extend(torch.randperm(n_examples, generator=gen).tolist())
    order = order[:need]
    return [order[i : i + batch_size] for i in range(0, need, batch_size)]


def train_local(
    handle,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int,
    grad_accum: int,
    lr: float,
    pad_id: int,
    device: torch.device,
    gen: torch.Generator,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    autocast: str = "none",
    optimizer_state: dict | None = None,
    prox_mu: float = 0.0,
    prox_center: torch.Tensor | None = None,
    grad_correction: torch.Tensor | None = None,
    lr_fn=None,
    prefix_fn=None,
    first_layer: int = 0,
) -> tuple[LocalResult, dict]:
    """Run ``steps`` optimiser steps on the live LoRA parameters of ``handle``.

    ``prox_center`` + ``prox_mu``: FedProx's proximal term mu/2 ||w - w_global||^2.
    ``grad_correction``: SCAFFOLD's (c - c_i), added to the gradient before each step.
    ``prefix_fn(indices)``: cached hidden states entering layer ``first_layer`` for those examples.
    ``lr_fn(step)``: a per-step learning rate (the server-side defense uses a cosine over its steps).
    Returns the result and the optimiser state (kept by the caller only if it wants to).
    """
    model = handle.model
    params = handle.params
    model.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
        for g in opt.param_groups:
            g["lr"] = lr
    prox_parts = split_flat(prox_center, params, device) if (prox_mu > 0 and prox_center is not None) else None
    corr_parts = split_flat(grad_correction, params, device) if grad_correction is not None else None
    plan = batch_plan(len(examples), steps, batch_size, grad_accum, gen)
    tot_loss, tot_tok = 0.0, 0
    for s in range(steps):
        if lr_fn is not None:
            for g in opt.param_groups:
                g["lr"] = lr_fn(s)
        opt.zero_grad(set_to_none=True)
        micro = plan[s * grad_accum : (s + 1) * grad_accum]
        for idx in micro:
            if prefix_fn is not None:  # frozen-prefix caching: hidden states below the adapted layers
                batch = collate_prefix([examples[i] for i in idx], prefix_fn(idx), first_layer, device)
            else:
                batch = collate([examples[i] for i in idx], pad_id, device)
            loss, n = response_loss(model, batch, autocast)
            obj = loss / grad_accum
            if prox_parts is not None:
                obj = obj + (prox_mu / 2) * sum(((p - c) ** 2).sum() for p, c in zip(params, prox_parts)) / grad_accum
            obj.backward()
            tot_loss += float(loss.detach()) * n
            tot_tok += n
        if corr_parts is not None:
            for p, c in zip(params, corr_parts):
                if p.grad is not None:
                    p.grad.add_(c)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    model.eval()
    mean = tot_loss / tot_tok if tot_tok else float("nan")
    return LocalResult(loss=mean, steps=steps, tokens=tot_tok), opt.state_dict()


def split_flat(vec: torch.Tensor, params, device) -> list[torch.Tensor]:
    """A flat adapter vector as tensors shaped (and typed) like ``params``."""
    out, i = [], 0
    for p in params:
        out.append(vec[i : i + p.numel()].view_as(p).to(device=device, dtype=p.dtype))
        i += p.numel()
    return out


def lr_at_round(round_idx: int, rounds: int, lr: float, lr_min: float, schedule: str = "cosine") -> float:
    """The paper's learning rate: cosine across rounds from ``lr`` to ``lr_min``, constant within a round
    (OpenFedLLM ``cosine_learning_rate``). ``round_idx`` counts from 0."""
    if schedule == "constant" or rounds <= 1:
        return lr
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * round_idx / rounds))
