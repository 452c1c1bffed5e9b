"""Krum, Multi-Krum, the paper's Krum variant, and Bulyan.

All distances come from one centred Gram matrix accumulated over column blocks (see
:func:`fedsafe.aggregators._ops.gram`), so the cost is about one ``(n x d) @ (d x n)`` matmul
and memory stays at ``O(n^2)`` plus one block.
"""

from __future__ import annotations

import torch

from ._ops import combine, gram, one_thread, sq_distances
from .base import AggResult, Param, as_list, fraction_used, masked_weights, register, require
from .coordinatewise import NearMedian, coordinatewise


def pairwise_sq_distances(x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    return sq_distances(gram(x, center=True, chunk=chunk))


@one_thread()  # only (n, n) work: see one_thread
def krum_scores(dist2: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score: sum of squared distances to the ``n - f - 2`` nearest *other* points.

    The neighbour count is clamped to ``[1, n - 1]`` (Flower clamps to >= 1 too) so that
    Bulyan's shrinking candidate sets still get a score.
    """
    n = dist2.shape[0]
    k = min(max(1, n - f - 2), n - 1)
    inf = torch.full((n,), float("inf"), dtype=dist2.dtype, device=dist2.device)
    others = dist2 + torch.diag(inf)  # exclude self
    return others.topk(k, dim=1, largest=False).values.sum(dim=1)


@one_thread()  # only (n, n) work: see one_thread
def krum_order(dist2: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Indices by ascending score; exact ties broken by total distance, then index.

    Ties are structural when a score uses one neighbour (mutual nearest neighbours score the
    same), which happens in Bulyan's last selections; breaking them by a permutation-free
    key keeps the result independent of client order.
    """
    order = torch.argsort(dist2.sum(dim=1), stable=True)
    return order[torch.argsort(scores[order], stable=True)]


def _krum_bounds(rule: str):
    def check(n: int, p: dict) -> None:
        f = p["f"]
        require(f >= 0, rule, f"needs f >= 0 (got f={f})")
        require(
            n > 2 * f + 2,
            rule,
            f"needs n > 2f + 2 clients per round (got n={n}, f={f}, so 2f + 2 = {2 * f + 2}); "
            "lower f or sample more clients (the paper's variant is 'krum_paper')",
        )
        if "m" in p and p["m"] is not None:
            require(1 <= p["m"] <= n, rule, f"needs 1 <= m <= n (got m={p['m']}, n={n})")

    return check


def _one_hot(n: int, idx: list[int], like: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(n, dtype=like.dtype, device=like.device)
    out[idx] = 1
    return out


@register("krum", params={"f": Param(1, int)}, bounds=_krum_bounds("krum"))
def krum(x, w, *, state=None, chunk=None, f=1) -> AggResult:
    """Krum (Blanchard et al., NeurIPS 2017).

    ``score_i = sum_{j in N_i} ||u_i - u_j||^2`` over the ``n - f - 2`` nearest neighbours
    ``N_i`` of ``u_i``; the output is ``u_{i*}`` with ``i* = argmin_i score_i``.

    Parameters
    ----------
    f : int, default 1
        Assumed number of Byzantine clients; requires ``n > 2f + 2``.
    """
    dist2 = pairwise_sq_distances(x, chunk)
    scores = krum_scores(dist2, f)
    best = int(krum_order(dist2, scores)[0])
    info = {"scores": as_list(scores), "selected": [best]}
    return AggResult(x[best].clone(), _one_hot(x.shape[0], [best], x), info)


@register(
    "multi_krum",
    params={"f": Param(1, int), "m": Param(None, int)},
    bounds=_krum_bounds("multi_krum"),
)
def multi_krum(x, w, *, state=None, chunk=None, f=1, m=None) -> AggResult:
    """Multi-Krum (Blanchard et al., NeurIPS 2017).

    Rank clients by Krum score (see ``krum``) and return the sample-count weighted mean of the
    ``m`` best: ``sum_{i in S} p_i u_i / sum_{i in S} p_i``.

    Parameters
    ----------
    f : int, default 1
        Assumed number of Byzantine clients; requires ``n > 2f + 2``.
    m : int, default ``n - f``
        Number of clients averaged (``m = 1`` is Krum).
    """
    n = x.shape[0]
    m = n - f if m is None else m
    dist2 = pairwise_sq_distances(x, chunk)
    scores = krum_scores(dist2, f)
    selected = krum_order(dist2, scores)[:m]
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[selected] = True
    coef = masked_weights(w, mask)
    info = {"scores": as_list(scores), "selected": as_list(selected)}
    return AggResult(combine(x, coef), coef.to(x), info)


def _paper_bounds(n: int, p: dict) -> None:
    f = p["f"]
    require(
        0 <= f <= n - 2,
        "krum_paper",
        f"needs 0 <= f <= n - 2 so that each score uses k = n - f - 1 >= 1 neighbours "
        f"(got n={n}, f={f})",
    )


@register("krum_paper", params={"f": Param(1, int)}, bounds=_paper_bounds)
def krum_paper(x, w, *, state=None, chunk=None, f=1) -> AggResult:
    """Krum as implemented in the paper's code (Ye et al., ICLR 2025; ``get_krum``).

    Distances are plain L2 (not squared). With ``k = n - f - 1``,
    ``score_i = sum`` of the distances to the ``k + 1`` nearest points *including itself*;
    the output is the unweighted mean of the ``k + 1 = n - f`` points nearest to ``i*``
    (``i*`` included). The paper sets ``f`` from the true attacker fraction.
    """
    n = x.shape[0]
    k = n - f - 1
    dist = pairwise_sq_distances(x, chunk).sqrt()
    with one_thread():
        scores = dist.topk(k + 1, dim=1, largest=False).values.sum(dim=1)
        best = int(krum_order(dist, scores)[0])
        row = dist[best].clone()
        row[best] = -1  # i* is always among its own neighbours, even with duplicate points
        chosen = row.topk(k + 1, largest=False).indices
        coef = torch.zeros_like(w)
        coef[chosen] = 1.0 / (k + 1)
    info = {"scores": as_list(scores), "center": best, "selected": sorted(as_list(chosen))}
    return AggResult(combine(x, coef), coef.to(x), info)


def _bulyan_bounds(n: int, p: dict) -> None:
    f = p["f"]
    require(f >= 0, "bulyan", f"needs f >= 0 (got f={f})")
    require(
        n >= 4 * f + 3,
        "bulyan",
        f"needs n >= 4f + 3 clients per round (got n={n}, f={f}, so 4f + 3 = {4 * f + 3})",
    )


@one_thread()  # only (n, n) work: see one_thread
def bulyan_select(dist2: torch.Tensor, f: int, theta: int, iterative: bool) -> list[int]:
    """Pick ``theta`` clients by Krum, either repeatedly on the remaining set or in one pass."""
    if not iterative:
        return as_list(krum_order(dist2, krum_scores(dist2, f))[:theta])
    remaining = list(range(dist2.shape[0]))
    chosen: list[int] = []
    while len(chosen) < theta:
        idx = torch.tensor(remaining, device=dist2.device)
        sub = dist2[idx][:, idx]
        chosen.append(remaining.pop(int(krum_order(sub, krum_scores(sub, f))[0])))
    return chosen


def bulyan_block(blk: torch.Tensor, f: int):
    """Per column, mean of the ``beta = theta - 2f`` values closest to the median (torch version).

    In sorted order those values form a window ``[j, j + beta)``: the one whose farthest member
    is closest to the median (ties go to the lowest ``j``).
    """
    theta = blk.shape[0]
    beta = theta - 2 * f
    values, order = blk.sort(dim=0)
    med = (values[(theta - 1) // 2] + values[theta // 2]) / 2
    reach = torch.maximum(med - values[: 2 * f + 1], values[beta - 1 :] - med)
    window = reach.argmin(dim=0, keepdim=True) + torch.arange(beta, device=blk.device)[:, None]
    used = torch.bincount(order.gather(0, window).flatten(), minlength=theta)
    return values.gather(0, window).mean(dim=0), used


@register(
    "bulyan",
    params={"f": Param(1, int), "selection": Param("iterative", str, ("iterative", "multikrum"))},
    bounds=_bulyan_bounds,
)
def bulyan(x, w, *, state=None, chunk=None, f=1, selection="iterative") -> AggResult:
    """Bulyan (El Mhamdi et al., ICML 2018). Requires ``n >= 4f + 3``; unweighted.

    1. Select ``theta = n - 2f`` clients with Krum: repeatedly take the Krum winner of the
       remaining set (``selection="iterative"``, El Mhamdi et al.'s recursion; neighbour count
       clamped to ``max(1, r - f - 2)`` for ``r`` remaining) or the ``theta`` best Krum scores
       in one pass (``"multikrum"``, Flower's ``Bulyan``).
    2. Per coordinate, average the ``beta = theta - 2f`` selected values closest to their
       median (mean of the two middle values for even ``theta``).

    Notes
    -----
    ``client_weights_i`` = fraction of coordinates where client i's value was averaged
    (0 for clients not selected in step 1).
    """
    n, d = x.shape
    theta = n - 2 * f
    chosen = bulyan_select(pairwise_sq_distances(x, chunk), f, theta, selection == "iterative")
    sel = torch.tensor(chosen, device=x.device)
    window = (NearMedian(f), theta - 2 * f)
    out, used = coordinatewise(x, chunk, lambda blk: bulyan_block(blk, f), window, rows=sel)
    counts = torch.zeros(n, dtype=torch.int64, device=x.device)
    counts[sel] = used
    info = {"selected": chosen, "theta": theta, "beta": theta - 2 * f}
    return AggResult(out, fraction_used(counts, d, x), info)
