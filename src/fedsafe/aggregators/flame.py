"""FLAME: HDBSCAN clustering over cosine distances, median-norm clipping, adaptive noise.

Needs scikit-learn >= 1.3 (``sklearn.cluster.HDBSCAN``), an optional dependency:
``pip install 'fedsafe[flame]'``. Choosing ``flame`` without it is refused before training.
"""

from __future__ import annotations

import numpy as np
import torch

from ._ops import combine, cosine_from_gram, gram, mixed_seed, row_sq_norms
from .base import AggResult, Param, as_list, masked_weights, register, require
from .clipping import clip_factors


def _hdbscan():
    try:
        from sklearn.cluster import HDBSCAN
    except ImportError:
        return None
    return HDBSCAN


def _flame_bounds(n: int, p: dict) -> None:
    require(_hdbscan() is not None, "flame",
            "needs scikit-learn >= 1.3 for HDBSCAN: pip install 'fedsafe[flame]' (or scikit-learn>=1.3)")
    require(p["lam"] >= 0, "flame", f"needs lam >= 0 (got lam={p['lam']})")


def majority_cluster(cos_dist: np.ndarray) -> np.ndarray:
    """Boolean mask of the clients HDBSCAN puts in the largest cluster (FLAME's admitted set).

    ``min_cluster_size = n // 2 + 1`` (a cluster must hold a majority), ``min_samples = 1``,
    ``allow_single_cluster`` as in FLAME; noise points (label -1) are rejected. With fewer than 3
    clients no majority cluster can be told apart, so everyone is admitted.
    """
    n = cos_dist.shape[0]
    if n < 3:
        return np.ones(n, dtype=bool)
    hdb = _hdbscan()(min_cluster_size=n // 2 + 1, min_samples=1, metric="precomputed", allow_single_cluster=True,
                     copy=True)
    labels = hdb.fit_predict(np.ascontiguousarray(cos_dist, dtype=np.float64))
    kept = labels[labels >= 0]
    if kept.size == 0:  # everything is noise: FLAME would discard the round; keep all rather than divide by 0
        return np.ones(n, dtype=bool)
    return labels == np.bincount(kept).argmax()


@register("flame", params={"lam": Param(0.001, float), "seed": Param(0, int)}, bounds=_flame_bounds,
          needs=("round",))
def flame(x, w, *, state=None, chunk=None, lam=0.001, seed=0, round=0) -> AggResult:
    """FLAME (Nguyen et al., USENIX Security 2022).

    1. cosine distances ``1 - cos(u_i, u_j)`` between the updates; HDBSCAN keeps the majority cluster;
    2. ``S = median_i ||u_i||`` over all updates (the median of the Euclidean distances of the local
       models to the global one); admitted updates are clipped to norm ``S``;
    3. ``aggregate = sum_{admitted} p_i u_i min(1, S / ||u_i||) + N(0, (lam * S)^2 I)``.

    Parameters
    ----------
    lam : float, default 0.001
        Noise level factor lambda (``sigma = lam * S``); the paper tunes it per task.
    seed : int, default 0
        Noise seed, mixed with the engine's ``round``.

    Notes
    -----
    ``p_i``: sample-count weights renormalised over the admitted clients (FLAME averages plainly:
    set ``fl.weighted=false`` for that). ``client_weights`` are the effective coefficients (0 =
    rejected); ``info`` has the admitted mask, the bound ``S`` and the norms. Needs deltas.
    """
    g = gram(x, chunk=chunk)
    cos_dist = (1 - cosine_from_gram(g)).clamp_min(0).cpu().numpy()
    admitted = majority_cluster(cos_dist)
    norms = row_sq_norms(x, chunk).sqrt()
    bound = float(np.median(norms.double().cpu().numpy()))
    mask = torch.as_tensor(admitted, device=w.device)
    coef = masked_weights(w, mask) * clip_factors(norms.to(w), bound)
    agg = combine(x, coef)
    sigma = lam * bound
    if sigma > 0:
        gen = torch.Generator(device=x.device).manual_seed(mixed_seed(seed, round, "flame"))
        agg += sigma * torch.randn(agg.shape, generator=gen, device=x.device, dtype=x.dtype)
    info = {"admitted": [bool(a) for a in admitted], "S": bound, "sigma": sigma, "norms": as_list(norms)}
    return AggResult(agg, coef.to(x), info)
