"""Geometric median via smoothed Weiszfeld (RFA)."""

from __future__ import annotations

import torch

from ._ops import combine, gram, one_thread
from .base import AggResult, Param, register, require


def _bounds(n: int, p: dict) -> None:
    rule = "geometric_median"
    require(p["maxiter"] >= 1, rule, f"needs maxiter >= 1 (got {p['maxiter']})")
    require(p["eps"] > 0, rule, f"needs eps > 0 (got {p['eps']})")
    require(p["ftol"] >= 0, rule, f"needs ftol >= 0 (got {p['ftol']})")


def _distances(g: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``||u_i - v||`` for ``v = sum_j c_j u_j``, using only the Gram matrix ``g``."""
    gc = g @ c
    return (g.diagonal() - 2 * gc + c @ gc).clamp_min(0).sqrt()


@register(
    "geometric_median",
    params={"maxiter": Param(100, int), "eps": Param(1e-6, float), "ftol": Param(1e-6, float)},
    bounds=_bounds,
)
def geometric_median(
    x, w, *, state=None, chunk=None, maxiter=100, eps=1e-6, ftol=1e-6
) -> AggResult:
    """Weighted geometric median, RFA (Pillutla, Kakade & Harchaoui, IEEE TSP 2022).

    ``v = argmin_v sum_i p_i ||u_i - v||`` by smoothed Weiszfeld, starting at the weighted mean:
    ``beta_i = p_i / max(eps, ||u_i - v||)``, ``v <- sum_i beta_i u_i / sum_i beta_i``, until
    the objective changes by less than ``ftol`` (relative) or ``maxiter`` iterations.

    Every iterate is a convex combination of the updates, so the iterations run on the
    ``n x n`` Gram matrix and the ``d``-dimensional vector is formed once at the end.

    Parameters
    ----------
    maxiter : int, default 100
    eps : float, default 1e-6
        Smoothing ``nu`` of RFA; distances below it are treated as ``eps``.
    ftol : float, default 1e-6

    Notes
    -----
    ``client_weights`` are the final Weiszfeld coefficients ``beta / sum(beta)``.
    """
    g = gram(x, center=True, chunk=chunk)  # translation invariant, better conditioned
    c, info = weiszfeld(g, w, maxiter, eps, ftol)
    return AggResult(combine(x, c), c.to(x), info)


@one_thread()  # only (n, n) work: see one_thread
def weiszfeld(g: torch.Tensor, w: torch.Tensor, maxiter: int, eps: float, ftol: float):
    """Smoothed Weiszfeld iterations on the Gram matrix ``g``; returns coefficients and info."""
    c = w.clone()
    objective = float(w @ _distances(g, c))
    converged, it = False, 0
    for it in range(1, maxiter + 1):
        beta = w / _distances(g, c).clamp_min(eps)
        c = beta / beta.sum()
        new_objective = float(w @ _distances(g, c))
        converged = abs(objective - new_objective) <= ftol * max(new_objective, 1e-300)
        objective = new_objective
        if converged:
            break
    return c, {"iterations": it, "objective": objective, "converged": converged}
