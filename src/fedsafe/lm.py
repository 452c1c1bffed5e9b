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


# -- generation from cached frozen-prefix states --------------------------------------------------------
#
# Evaluation prefill (the prompt's forward pass) is ~75 % of a 16-token greedy evaluation on a CPU, and
# with LoRA only on the top layers the layers below see the same prompts through the same frozen weights
# for every adapter a run or a demo evaluates (start, clean, attacked, each rule, each defense, every probe
# round). So the keys / values of those layers and the hidden state entering the first adapted one are
# computed once per prompt and reused: a prefill then runs only the adapted layers. Generation itself stays
# ``model.generate``'s (same sampling, stopping, position ids), handed a cache that covers all but the
# prompt's last token.


def _layer_cache(cache) -> tuple[list, list]:
    """(keys, values) per layer of a transformers cache, across its 4.x / 5.x layouts."""
    if hasattr(cache, "layers"):
        return [lay.keys for lay in cache.layers], [lay.values for lay in cache.layers]
    return list(cache.key_cache), list(cache.value_cache)


@torch.no_grad()
def prompt_lower_states(
    model, prompts: Sequence[Sequence[int]], first: int, device, batch_size: int = 16
) -> list[dict]:
    """For each prompt (token ids), the states its first ``len - 1`` tokens leave below decoder layer ``first``:
    ``{"h": (n-1, hidden), "k": [(kv_heads, n-1, head_dim)] * first, "v": same, "tuple_out": bool}``.

    Right padding with causal attention keeps pads out of real positions, and positions count from 0 as
    ``generate`` counts them under left padding, so a state is the same whatever batch it is later used in."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    grabbed: dict = {}

    def grab(_mod, args, kwargs):
        grabbed["h"] = (args[0] if args else kwargs["hidden_states"]).detach()
        grabbed["cache"] = kwargs.get("cache", kwargs.get("past_key_values"))
        raise _StopForward

    def out_kind(_mod, _args, output):
        grabbed["tuple_out"] = isinstance(output, tuple)

    hooks = [
        decoder.layers[first].register_forward_pre_hook(grab, with_kwargs=True),
        decoder.layers[first - 1].register_forward_hook(out_kind),
    ]
    res: dict[int, dict] = {}
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            seqs = [list(prompts[i])[:-1] for i in idx]
            width = max(len(q) for q in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, q in enumerate(seqs):
                ids[r, : len(q)] = torch.tensor(q, dtype=torch.long)
                attn[r, : len(q)] = 1
            grabbed.clear()
            try:
                decoder(input_ids=ids.to(device), attention_mask=attn.to(device), use_cache=True)
            except _StopForward:
                pass
            keys, values = _layer_cache(grabbed["cache"])
            for r, i in enumerate(idx):
                n = len(seqs[r])
                res[i] = {
                    # kept in host memory (an accelerator's is the model's), copied in per batch
                    "h": grabbed["h"][r, :n].to("cpu", copy=True),
                    "k": [k[r, :, :n].to("cpu", copy=True) for k in keys[:first]],
                    "v": [v[r, :, :n].to("cpu", copy=True) for v in values[:first]],
                    "tuple_out": grabbed["tuple_out"],
                }
    finally:
        for h in hooks:
            h.remove()
    return [res[i] for i in range(len(prompts))]


class _CachedLayer(torch.nn.Module):
    """Stands in for a frozen decoder layer during a prefill: writes that layer's cached keys / values into
    the generation cache and passes the hidden state on untouched (the first adapted layer's pre-hook then
    swaps in the cached state it would have received)."""

    def __init__(self, idx: int, keys: torch.Tensor, values: torch.Tensor, tuple_out: bool):
        super().__init__()
        self.idx, self.keys, self.values, self.tuple_out = idx, keys, values, tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cache.update(self.keys, self.values, self.idx)
        return (hidden_states,) if self.tuple_out else hidden_states


@torch.no_grad()
def prefill_from_states(
    model, states: Sequence[dict], input_ids: torch.Tensor, attention_mask: torch.Tensor, first: int
) -> dict:
    """The generation cache of a left-padded batch for all but its last column, computed by running only
    layers >= ``first`` on cached lower ``states`` (:func:`prompt_lower_states`, one per row). Returns the
    keyword arguments that hand it to ``model.generate`` (whose name differs across transformers versions)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    B, W = input_ids.shape
    P = W - 1
    h0 = states[0]["h"]
    dev = input_ids.device
    hs = torch.zeros((B, P, h0.shape[-1]), dtype=h0.dtype, device=dev)
    ks = [torch.zeros((B, *k.shape[:-2], P, k.shape[-1]), dtype=k.dtype, device=dev) for k in states[0]["k"]]
    vs = [torch.zeros((B, *v.shape[:-2], P, v.shape[-1]), dtype=v.dtype, device=dev) for v in states[0]["v"]]
    for r, st in enumerate(states):
        n = st["h"].shape[0]
        if n:
            hs[r, P - n :] = st["h"]
            for lay in range(first):
                ks[lay][r, :, P - n :] = st["k"][lay]
                vs[lay][r, :, P - n :] = st["v"][lay]

    def swap_in(_mod, args, kwargs):
        if args:
            return (hs,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hs}

    attn = attention_mask[:, :P]
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)  # as generate numbers left-padded positions
    full = decoder.layers
    decoder.layers = torch.nn.ModuleList(
        [_CachedLayer(i, ks[i], vs[i], states[0]["tuple_out"]) for i in range(first)] + list(full)[first:]
    )
    hook = full[first].register_forward_pre_hook(swap_in, with_kwargs=True)
    try:
        out = model(input_ids=input_ids[:, :P], attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
    finally:
        hook.remove()
        decoder.layers = full
    if getattr(out, "cache", None) is not None:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}
