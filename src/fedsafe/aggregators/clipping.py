"""Norm bounding (clip then average) and centered clipping.

Neither rule is translation invariant: both clip vector norms, so they must see deltas from
the global model (the engine's default), not raw weights.
"""

from __future__ import annotations

import torch

from ._ops import combine, mixed_seed, row_distances, row_sq_norms
from .base import AggResult, Param, as_list, register, require


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """``min(1, bound / norm)``; zero-norm rows keep factor 1."""
    return torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))


def _norm_bounds(n: int, p: dict) -> None:
    require(p["M"] is None or p["M"] > 0, "norm_bound", f"needs M > 0 (got M={p['M']})")
    require(p["sigma"] >= 0, "norm_bound", f"needs sigma >= 0 (got sigma={p['sigma']})")


@register(
    "norm_bound",
    params={"M": Param(None, float), "sigma": Param(0.0, float), "seed": Param(0, int)},
    bounds=_norm_bounds,
    needs=("round",),
)
def norm_bound(
    x, w, *, state=None, chunk=None, M=None, sigma=0.0, seed=0, round=0
) -> AggResult:
    """Norm bounding (Sun, Kairouz, Suresh & McMahan, "Can You Really Backdoor FL?", 2019).

    ``aggregate = sum_i p_i u_i min(1, M / ||u_i||) + N(0, sigma^2 I)`` ("weak DP" when
    ``sigma > 0``).

    Parameters
    ----------
    M : float, optional
        Norm bound. Default: the median of this round's update norms (adaptive, as in FLAME).
    sigma : float, default 0
        Standard deviation of the Gaussian noise added per coordinate.
    seed : int, default 0
        Noise seed, mixed with the engine's ``round`` so every round draws fresh noise.

    Notes
    -----
    ``client_weights = p_i * min(1, M / ||u_i||)``, the effective coefficient of each update.
    """
    norms = row_sq_norms(x, chunk).sqrt()
    bound = float(norms.median()) if M is None else M  # torch lower median: an actual norm
    coef = w * clip_factors(norms, bound)
    agg = combine(x, coef)
    if sigma > 0:
        gen = torch.Generator(device=x.device).manual_seed(mixed_seed(seed, round, "norm_bound"))
        agg += sigma * torch.randn(agg.shape, generator=gen, device=x.device, dtype=x.dtype)
    info = {"M": bound, "norms": as_list(norms), "sigma": sigma}
    return AggResult(agg, coef.to(x), info)


def _cc_bounds(n: int, p: dict) -> None:
    require(p["tau"] > 0, "centered_clipping", f"needs tau > 0 (got tau={p['tau']})")
    require(p["iters"] >= 1, "centered_clipping", f"needs iters >= 1 (got {p['iters']})")


def _cc_start(x: torch.Tensor, w: torch.Tensor, state: dict | None, init: str) -> torch.Tensor:
    if init == "previous" and state is not None and "momentum" in state:
        v = torch.as_tensor(state["momentum"]).to(device=x.device, dtype=x.dtype)
        if v.shape != x.shape[1:]:
            raise ValueError(f"centered_clipping: stored momentum has shape {tuple(v.shape)}")
        return v.clone()
    if init == "mean":
        return combine(x, w)
    return torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)


@register(
    "centered_clipping",
    params={
        "tau": Param(1.0, float),
        "iters": Param(1, int),
        "init": Param("previous", str, ("previous", "zero", "mean")),
    },
    bounds=_cc_bounds,
)
def centered_clipping(
    x, w, *, state=None, chunk=None, tau=1.0, iters=1, init="previous"
) -> AggResult:
    """Centered clipping (Karimireddy, He & Jaggi, ICML 2021).

    ``v <- v + sum_i p_i (u_i - v) min(1, tau / ||u_i - v||)``, repeated ``iters`` times.

    Parameters
    ----------
    tau : float, default 1.0
        Clipping radius around the current centre ``v`` (scale it to the update norms).
    iters : int, default 1
    init : {"previous", "zero", "mean"}, default "previous"
        Start point: ``state["momentum"]`` (the previous round's output, zero in the first
        round), zero, or the weighted mean. The result is written to ``state["momentum"]``.

    Notes
    -----
    ``client_weights = p_i min(1, tau / ||u_i - v||)`` from the last iteration.
    """
    v = _cc_start(x, w, state, init)
    for _ in range(iters):
        coef = w * clip_factors(row_distances(x, v, chunk), tau)
        # v + sum_i c_i (u_i - v), written so no (n, d) temporary is needed
        v = (1 - float(coef.sum())) * v + combine(x, coef)
    if state is not None:
        state["momentum"] = v.clone()
    return AggResult(v, coef.to(x), {"tau": tau, "iters": iters, "init": init})
