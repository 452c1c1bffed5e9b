"""Coordinate-wise median and trimmed mean (Yin et al., ICML 2018), plus the paper's variants.

These rules ignore sample counts (as in Yin et al. and the paper's code). ``client_weights``
reports, per client, the fraction of coordinates in which its value was used.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._ops import block_columns, column_slices
from .base import AggResult, Param, fraction_used, register, require

BlockFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def coordinatewise(x: torch.Tensor, chunk: int | None, block_fn: BlockFn):
    """Apply ``block_fn(block) -> (values (c,), per-client use counts (n,))`` over column blocks."""
    n, d = x.shape
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    counts = torch.zeros(n, dtype=torch.int64, device=x.device)
    for cols in column_slices(d, block_columns(n, chunk, device=x.device)):
        values, used = block_fn(x[:, cols])
        out[cols] = values
        counts += used
    return out, fraction_used(counts, d, x)


def median_block(blk: torch.Tensor, lower: bool = False):
    """Column medians of ``blk`` and how often each row supplied a middle value.

    One sort per block: on CPU it was as fast as ``kthvalue`` and gives both middle values.
    """
    n = blk.shape[0]
    values, order = blk.sort(dim=0)
    lo = (n - 1) // 2
    hi = lo if lower else n // 2
    used = torch.bincount(order[lo : hi + 1].flatten(), minlength=n)
    return (values[lo] + values[hi]) / 2, used


def trimmed_block(blk: torch.Tensor, k: int):
    """Column means of the sorted values ``[k, n - k)`` and how often each row was kept.

    Sorting (rather than subtracting the extremes from the total) stays exact when an attacker
    sends huge values.
    """
    n = blk.shape[0]
    if k == 0:
        return blk.mean(dim=0), torch.full((n,), blk.shape[1], dtype=torch.int64, device=blk.device)
    values, order = blk.sort(dim=0)
    kept = order[k : n - k]
    return values[k : n - k].mean(dim=0), torch.bincount(kept.flatten(), minlength=n)


@register("median")
def median(x, w, *, state=None, chunk=None) -> AggResult:
    """Coordinate-wise median (Yin et al., ICML 2018).

    ``aggregate_j = median_i u_ij``; for even ``n`` the mean of the two middle values (NumPy /
    Flower ``FedMedian`` semantics). Unweighted. See ``median_paper`` for the lower median.

    Notes
    -----
    ``client_weights_i`` = fraction of coordinates where client i gave a middle value
    (they sum to 1 for odd ``n`` and to about 2 for even ``n``).
    """
    agg, used = coordinatewise(x, chunk, median_block)
    return AggResult(agg, used, {"even_n": "mean_of_middle_two"})


@register("median_paper")
def median_paper(x, w, *, state=None, chunk=None) -> AggResult:
    """Coordinate-wise median as in the paper's code: ``torch.median`` semantics.

    For even ``n`` ``torch.median`` returns the *lower* of the two middle values; for odd ``n``
    this equals ``median``. Unweighted.
    """
    agg, used = coordinatewise(x, chunk, lambda blk: median_block(blk, lower=True))
    return AggResult(agg, used, {"even_n": "lower_middle"})


def trim_count(n: int, p: dict) -> int:
    """Values trimmed per side: ``k`` if given, else ``floor(beta * n)`` (>= 1 if beta > 0)."""
    if p["k"] is not None:
        return p["k"]
    k = math.floor(p["beta"] * n)
    # A positive beta should never silently degrade to the plain mean (e.g. beta=0.1, n=3).
    return max(k, 1) if p["beta"] > 0 and n >= 3 else k


def _trimmed_bounds(n: int, p: dict) -> None:
    name = "trimmed_mean"
    require(p["k"] is None or p["beta"] is None, name, "give either 'beta' or 'k', not both")
    if p["k"] is None and p["beta"] is None:
        # beta and k are exclusive, so the default is filled here rather than in Param.
        p["beta"] = 0.1
    if p["k"] is None:
        require(0 <= p["beta"] < 0.5, name, f"needs 0 <= beta < 0.5 (got beta={p['beta']})")
    k = trim_count(n, p)
    require(k >= 0, name, f"needs k >= 0 (got k={k})")
    require(2 * k < n, name, f"needs 2k < n, i.e. at least one value left (got k={k}, n={n})")


@register(
    "trimmed_mean",
    params={"beta": Param(None, float), "k": Param(None, int)},
    bounds=_trimmed_bounds,
)
def trimmed_mean(x, w, *, state=None, chunk=None, beta=None, k=None) -> AggResult:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drop the ``k`` largest and ``k`` smallest values and average the rest:
    ``aggregate_j = mean(sorted(u_.j)[k : n-k])``. Unweighted.

    Parameters
    ----------
    beta : float, default 0.1
        Fraction trimmed per side, ``k = floor(beta * n)`` as in Flower's ``FedTrimmedAvg``;
        but when ``beta > 0`` and ``n >= 3``, ``k`` is at least 1 so the rule always trims.
    k : int, optional
        Values trimmed per side (instead of ``beta``). Requires ``2k < n``.

    Notes
    -----
    ``client_weights_i`` = fraction of coordinates where client i's value was kept.
    """
    kk = trim_count(x.shape[0], {"beta": beta, "k": k})
    agg, used = coordinatewise(x, chunk, lambda blk: trimmed_block(blk, kk))
    return AggResult(agg, used, {"k": kk})


def _paper_trim_bounds(n: int, p: dict) -> None:
    require(n >= 3, "trimmed_mean_paper", f"trims 1 value per side, so needs n >= 3 (got n={n})")


@register("trimmed_mean_paper", bounds=_paper_trim_bounds)
def trimmed_mean_paper(x, w, *, state=None, chunk=None) -> AggResult:
    """Trimmed mean as in the paper's code: ``k = 1`` per side, hard-coded.

    With the paper's 3 sampled clients this is exactly the coordinate-wise median.
    """
    agg, used = coordinatewise(x, chunk, lambda blk: trimmed_block(blk, 1))
    return AggResult(agg, used, {"k": 1})
