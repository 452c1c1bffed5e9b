"""Training-free safety-subspace projection of each round's aggregated LoRA delta (after Safe LoRA).

Safe LoRA (Hsu et al., NeurIPS 2024) computes, per layer, the "alignment matrix" from an aligned model
minus its unaligned base, and projects a fine-tuning update with it when the update drifts from that
subspace. Here the server knows an aligned start (``init.adapter``: ``align`` or a path) on top of the
base model, and after every aggregation it removes, per adapted module, the component of the round's
delta along the direction that undoes the alignment:

    u_l = base_l - aligned_l   (the module's LoRA parameters; base = the aligned adapter with B = 0,
                                which is exactly the base model)
    if cos(delta_l, u_l) > threshold:  delta_l <- delta_l - (<delta_l, u_l> / ||u_l||^2) u_l

Deviation from Safe LoRA: it works in weight space (``V V^T / ||V||_F`` applied to B) and keeps the part
*inside* the alignment subspace; we work in LoRA parameter space, where the projected delta stays an
exact LoRA adapter, and remove only the one direction that moves the module back to the base model.
The cost is one pass over the adapter per round (no training, no data).
"""

from __future__ import annotations

import time

import torch

from ..config import RunConfig


def module_groups(keys: list[str], shapes: list[tuple[int, ...]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(module, indices of its lora_A and lora_B entries, mask of its lora_B entries)`` in flat-vector order."""
    spans, i = {}, 0
    for k, shp in zip(keys, shapes):
        n = 1
        for s in shp:
            n *= s
        mod = k.split(".lora_")[0]
        spans.setdefault(mod, []).append((i, i + n, ".lora_B" in k))
        i += n
    out = []
    for mod, parts in spans.items():
        idx = torch.cat([torch.arange(a, b) for a, b, _ in parts])
        is_b = torch.cat([torch.full((b - a,), flag) for a, b, flag in parts])
        out.append((mod, idx, is_b))
    return out


def unsafe_direction(aligned: torch.Tensor, keys: list[str], shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """``base - aligned`` in parameter space: ``-B`` on every lora_B entry, 0 on lora_A (B = 0 is the base model)."""
    u = torch.zeros_like(aligned)
    for _, idx, is_b in module_groups(keys, shapes):
        b = idx[is_b]
        u[b] = -aligned[b]
    return u


def project(delta: torch.Tensor, u: torch.Tensor, groups, threshold: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Remove, per module, the component of ``delta`` along ``u`` where their cosine exceeds ``threshold``.

    Returns the projected delta, the mask of entries that changed, and a summary for ``metrics.jsonl``."""
    out = delta.clone()
    changed = torch.zeros(delta.shape, dtype=torch.bool)
    projected, removed = [], 0.0
    for mod, idx, _ in groups:
        d, v = delta[idx].double(), u[idx].double()
        vv = float(v.dot(v))
        if vv == 0.0:
            continue
        dot = float(d.dot(v))
        dn = float(d.norm())
        if dn == 0.0 or dot / (dn * vv**0.5) <= threshold:
            continue
        out[idx] = (d - (dot / vv) * v).to(delta.dtype)
        changed[idx] = True
        projected.append(mod)
        removed += (dot / vv) ** 2 * vv
    return out, changed, {"modules": len(projected), "of": len(groups), "removed_norm": removed**0.5}


def projection_hook(cfg: RunConfig, eng):
    """``Engine.post_aggregate`` hook: project the round's aggregated delta (``global - round start``)."""
    groups = module_groups(eng.keys, eng.shapes)
    u = unsafe_direction(eng.init_vec, eng.keys, eng.shapes)
    threshold = cfg.defense.projection_threshold

    def hook(eng_, rnd: int) -> dict:
        t0 = time.time()
        start = eng_.round_start_vec
        delta, changed, info = project(eng_.global_vec - start, u, groups, threshold)
        # only projected modules change: the others keep their aggregated values bit for bit
        eng_.global_vec = torch.where(changed, start + delta, eng_.global_vec)
        info["seconds"] = round(time.time() - t0, 4)
        return {"projection": info}

    return hook
