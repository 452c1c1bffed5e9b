"""Batched clients: train several sampled clients of a round together, one forward per micro-batch.

Every adapted Linear gets per-client LoRA factors stacked on a leading client axis, A (m, r, in) and
B (m, out, r). The m clients' micro-batches are concatenated (client i owns rows i*b .. (i+1)*b - 1), the
frozen base runs once on all rows, and each client's rows meet its own factors through two ``bmm``.

Why this equals m separate runs (checked in tests/test_batched_clients.py):
* the objective is the sum of the clients' mean response losses, and client i's loss depends only on its
  own factors, so each slice of the gradient is exactly that client's gradient;
* AdamW is elementwise, so one optimiser over the stacked tensors is m independent optimisers;
* gradient clipping and SCAFFOLD corrections are applied per client by hand, FedProx's term is a sum;
* right padding + causal attention: padding a client's rows to the group's longest example does not
  change its real positions (the same argument as frozen-prefix caching).

Limits: with LoRA dropout > 0 the masks are drawn from a different random stream than the sequential
path (same distribution, different draws); per-client optimiser state across rounds
(``fl.reset_optimizer: false``) is not supported and is refused by the config check.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..data.templates import Example, collate
from ..errors import FedsafeError
from ..lm import collate_prefix, response_logits
from .train import LocalResult, batch_plan, split_flat

ADAPTER = "default"


def _lora_layers(handle) -> list[tuple[torch.nn.Module, int, int]]:
    """(peft LoRA module, index of its A in ``handle.params``, index of its B) for every adapted Linear."""
    index = {n: i for i, n in enumerate(handle.names)}
    found, covered = [], set()
    for name, mod in handle.model.named_modules():
        a = index.get(f"{name}.lora_A.{ADAPTER}.weight")
        b = index.get(f"{name}.lora_B.{ADAPTER}.weight")
        if a is None or b is None:
            continue
        if getattr(mod, "lora_variant", {}).get(ADAPTER) is not None or getattr(mod, "lora_bias", {}).get(ADAPTER):
            raise FedsafeError(f"batched clients support plain LoRA only; {name} uses a LoRA variant or bias")
        found.append((mod, a, b))
        covered.update((a, b))
    if len(covered) != len(handle.params):
        extra = [n for i, n in enumerate(handle.names) if i not in covered]
        raise FedsafeError(f"batched clients: trainable parameters outside LoRA A/B factors: {extra[:3]}")
    return found


@contextlib.contextmanager
def per_client_lora(handle, stacked: Sequence[torch.Tensor]):
    """Route every adapted Linear through the stacked per-client factors instead of the live adapter.

    The module's own ``forward`` is shadowed by an instance attribute for the duration, so peft's code,
    the live adapter weights and their gradients are untouched.
    """
    layers = _lora_layers(handle)

    def make_forward(a_idx: int, b_idx: int):
        def forward(self, x, *args, **kwargs):
            out = self.base_layer(x, *args, **kwargs)
            A, B = stacked[a_idx], stacked[b_idx]  # (m, r, in), (m, out, r)
            m = A.shape[0]
            xs = self.lora_dropout[ADAPTER](x.to(A.dtype)).reshape(m, -1, x.shape[-1])  # rows are client-major
            delta = torch.bmm(torch.bmm(xs, A.transpose(1, 2)), B.transpose(1, 2)) * self.scaling[ADAPTER]
            return (out + delta.reshape(*x.shape[:-1], -1)).to(out.dtype)

        return forward

    try:
        for mod, a, b in layers:
            mod.forward = types.MethodType(make_forward(a, b), mod)
        yield
    finally:
        for mod, _a, _b in layers:
            mod.__dict__.pop("forward", None)


def train_clients_batched(
    handle,
    client_examples: Sequence[Sequence[Example]],
    start: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    grad_accum: int,
    lr: float,
    pad_id: int,
    device: torch.device,
    gens: Sequence[torch.Generator],
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
    autocast: str = "none",
    prox_mu: float = 0.0,
    grad_corrections: Sequence[torch.Tensor | None] | None = None,
    prefix_fns: Sequence[Callable] | None = None,
    first_layer: int = 0,
) -> list[tuple[LocalResult, torch.Tensor]]:
    """Train ``len(client_examples)`` clients from the flat adapter ``start`` at once.

    Same arguments as :func:`fedsafe.fl.train.train_local`, one entry per client where they differ
    (``gens``, ``grad_corrections``, ``prefix_fns``); FedProx's centre is ``start``. Each client draws the
    same micro-batches from its own generator as the sequential path. Returns (result, flat adapter) per
    client, in order.
    """
    m = len(client_examples)
    base = split_flat(start, handle.params, device)
    stacked = [p.unsqueeze(0).repeat(m, *([1] * p.dim())).requires_grad_(True) for p in base]
    opt = torch.optim.AdamW(stacked, lr=lr, weight_decay=weight_decay)
    corr = [None if c is None else split_flat(c, handle.params, device) for c in grad_corrections] \
        if grad_corrections else None
    plans = [batch_plan(len(ex), steps, batch_size, grad_accum, g) for ex, g in zip(client_examples, gens)]
    # running sums stay on the device: no host sync per micro-batch on GPUs
    tot_loss = torch.zeros(m, dtype=torch.float64, device=device)
    tot_tok = torch.zeros(m, dtype=torch.long, device=device)
    model = handle.model
    model.train()
    try:
        with per_client_lora(handle, stacked):
            for s in range(steps):
                opt.zero_grad(set_to_none=True)
                for k in range(s * grad_accum, (s + 1) * grad_accum):
                    batch = _group_batch(client_examples, plans, k, prefix_fns, first_layer, pad_id, device)
                    logits, targets, rows = response_logits(model, batch, autocast)
                    owner = rows // batch_size
                    tok_loss = F.cross_entropy(logits.float(), targets, reduction="none")
                    sums = torch.zeros(m, device=tok_loss.device).index_add(0, owner, tok_loss)
                    counts = torch.bincount(owner, minlength=m)
                    means = sums / counts.clamp(min=1)  # a client with no response tokens contributes 0
                    obj = means.sum() / grad_accum
                    if prox_mu > 0:
                        obj = obj + (prox_mu / 2) * sum(((p - c) ** 2).sum() for p, c in zip(stacked, base)) / grad_accum
                    obj.backward()
                    tot_loss += (means.detach() * counts).double()
                    tot_tok += counts
                _per_client_grad_fixes(stacked, corr, max_grad_norm)
                opt.step()
    finally:
        model.eval()
    tot_loss, tot_tok = tot_loss.cpu(), tot_tok.cpu()
    out = []
    for i in range(m):
        flat = torch.cat([p[i].detach().reshape(-1).float() for p in stacked]).cpu()
        n = int(tot_tok[i])
        out.append((LocalResult(loss=float(tot_loss[i] / n) if n else float("nan"), steps=steps, tokens=n), flat))
    return out


def _group_batch(client_examples, plans, k, prefix_fns, first_layer, pad_id, device) -> dict:
    """Micro-batch ``k`` of every client, concatenated client-major."""
    exs, pres = [], []
    for i, (ex, plan) in enumerate(zip(client_examples, plans)):
        idx = plan[k]
        exs.extend(ex[j] for j in idx)
        if prefix_fns is not None:
            pres.extend(prefix_fns[i](idx))
    if prefix_fns is not None:
        return collate_prefix(exs, pres, first_layer, device)
    return collate(exs, pad_id, device)


@torch.no_grad()
def _per_client_grad_fixes(stacked, corr, max_grad_norm: float) -> None:
    """SCAFFOLD correction then norm clipping, each client on its own slice (as ``train_local`` does)."""
    if corr is not None:
        for i, parts in enumerate(corr):
            if parts is None:
                continue
            for p, c in zip(stacked, parts):
                if p.grad is not None:
                    p.grad[i].add_(c)
    if max_grad_norm > 0:
        sq = sum(p.grad.flatten(1).pow(2).sum(1) for p in stacked if p.grad is not None)
        coef = (max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s formula, per client
        for p in stacked:
            if p.grad is not None:
                p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
