"""Validation of client updates before aggregation (the server trusts no client).

Both engines (in-process and Flower) pass every reply through :func:`validate_state`: a state dict that
is missing keys, has extra keys, wrong shapes or dtypes, NaN/Inf values or an absurd norm is rejected
with a reason, and the round aggregates the rest.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class RejectedUpdate(Exception):
    """A client update the server refuses; ``str(e)`` is the logged reason."""


def validate_state(sd: dict, keys: list[str], shapes: list[tuple[int, ...]], global_vec: torch.Tensor,
                   max_norm: float) -> torch.Tensor:
    """Check a client's adapter state dict and return it as a flat fp32 vector (same key order)."""
    if not isinstance(sd, dict):
        raise RejectedUpdate(f"update is a {type(sd).__name__}, not a state dict")
    missing = [k for k in keys if k not in sd]
    if missing:
        raise RejectedUpdate(f"missing {len(missing)} adapter tensors (e.g. {missing[0]})")
    extra = [k for k in sd if k not in set(keys)]
    if extra:
        raise RejectedUpdate(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
    parts = []
    for k, shp in zip(keys, shapes):
        t = sd[k]
        if not isinstance(t, torch.Tensor):
            raise RejectedUpdate(f"{k} is a {type(t).__name__}, not a tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise RejectedUpdate(f"{k} has dtype {t.dtype}, expected a floating type")
        if tuple(t.shape) != tuple(shp):
            raise RejectedUpdate(f"{k} has shape {tuple(t.shape)}, expected {tuple(shp)}")
        parts.append(t.detach().reshape(-1).float().cpu())
    vec = torch.cat(parts) if parts else torch.zeros(0)
    if not torch.isfinite(vec).all():
        bad = int((~torch.isfinite(vec)).sum())
        raise RejectedUpdate(f"{bad} non-finite values (NaN/Inf)")
    norm = float((vec - global_vec).norm())
    if norm > max_norm:
        raise RejectedUpdate(f"update norm {norm:.3g} exceeds fl.max_update_norm={max_norm:g}")
    return vec
