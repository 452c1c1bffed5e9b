"""Local SFT of the shared LoRA adapter: response-only loss, AdamW, FedProx and SCAFFOLD hooks.

The frozen base is shared by all clients; only the LoRA parameters (``LoraHandle.params``) train.
The loss and the frozen-prefix cache live in :mod:`fedsafe.lm` (evaluation and the defense use them too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..data.templates import Example, collate
from ..lm import collate_prefix, response_loss


@dataclass
class AuxTerm:
    """An extra loss term of local training: ``weight`` x the response loss on a second data set.

    Its batches come from its own generator ``gen``, so the main data's batches (drawn from the client's
    generator) are exactly those of training without the term. ``prefix_fn`` indexes ``examples``.
    """

    examples: Sequence[Example]
    weight: float
    gen: torch.Generator
    prefix_fn: object = None


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
    aux: AuxTerm | None = None,
) -> tuple[LocalResult, dict]:
    """Run ``steps`` optimiser steps on the live LoRA parameters of ``handle``.

    ``prox_center`` + ``prox_mu``: FedProx's proximal term mu/2 ||w - w_global||^2.
    ``grad_correction``: SCAFFOLD's (c - c_i), added to the gradient before each step.
    ``prefix_fn(indices)``: cached hidden states entering layer ``first_layer`` for those examples.
    ``lr_fn(step)``: a per-step learning rate (the server-side defense uses a cosine over its steps).
    ``aux``: an extra loss term added to every micro-batch's objective (the reported loss stays the main one).
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
    aux_plan = batch_plan(len(aux.examples), steps, batch_size, grad_accum, aux.gen) if aux is not None else None
    tot_loss, tot_tok = 0.0, 0
    for s in range(steps):
        if lr_fn is not None:
            for g in opt.param_groups:
                g["lr"] = lr_fn(s)
        opt.zero_grad(set_to_none=True)
        micro = plan[s * grad_accum : (s + 1) * grad_accum]
        for j, idx in enumerate(micro):
            loss, n = response_loss(model, _batch(examples, idx, prefix_fn, first_layer, pad_id, device), autocast)
            obj = loss / grad_accum
            if aux_plan is not None and aux.weight > 0:
                a_idx = aux_plan[s * grad_accum + j]
                a_loss, _ = response_loss(model, _batch(aux.examples, a_idx, aux.prefix_fn, first_layer, pad_id, device),
                                          autocast)
                obj = obj + aux.weight * a_loss / grad_accum
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


def _batch(examples, idx, prefix_fn, first_layer, pad_id, device) -> dict:
    if prefix_fn is not None:  # frozen-prefix caching: hidden states below the adapted layers
        return collate_prefix([examples[i] for i in idx], prefix_fn(idx), first_layer, device)
    return collate([examples[i] for i in idx], pad_id, device)


def split_flat(vec: torch.Tensor, params, device) -> list[torch.Tensor]:
    """A flat adapter vector as tensors shaped (and typed) like ``params``."""
    out, i = [], 0
    for p in params:
        out.append(vec[i : i + p.numel()].view_as(p).to(device=device, dtype=p.dtype))
        i += p.numel()
    return out
