"""update_classifier: a server-side classifier over client updates, trained on simulated updates (beyond the paper)."""

from __future__ import annotations

import torch

from ._ops import combine
from .base import AggResult, Param, as_list, masked_weights, register, require


def _bounds(n: int, p: dict) -> None:
    require(0 < p["threshold"] < 1, "update_classifier", f"needs 0 < threshold < 1 (got {p['threshold']})")
    require(p["sims"] >= 1, "update_classifier", f"needs sims >= 1 simulated updates per class (got {p['sims']})")


def fit_centroid_classifier(benign: torch.Tensor, malicious: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Linear classifier from labelled updates: ``w = mean(mal) - mean(ben)``, bias at the midpoint, and a
    scale (half the centroid distance along ``w``) so ``sigmoid((w.u + b) / scale)`` is +-0.73 at the centroids."""
    mb, mm = benign.double().mean(0), malicious.double().mean(0)
    w = mm - mb
    b = -float(w.dot((mm + mb) / 2))
    scale = max(float(w.dot(w)) / 2, 1e-30)
    return w, b, scale


def malicious_probability(x: torch.Tensor, w: torch.Tensor, b: float, scale: float) -> torch.Tensor:
    return torch.sigmoid((x.double() @ w.to(x.device) + b) / scale)


@register("update_classifier", params={"threshold": Param(0.5, float), "sims": Param(2, int)}, bounds=_bounds,
          needs=("labelled_updates",))
def update_classifier(x, w, *, state=None, chunk=None, threshold=0.5, sims=2, labelled_updates=None) -> AggResult:
    """Update classifier (the idea of Safe-FedLLM, 2026: the server scores each LoRA update with a classifier
    trained on updates it simulates itself).

    Every round the server trains ``sims`` updates from the global adapter on held-out normal data (label
    benign) and ``sims`` on a small harmful set it holds (label malicious), fits the nearest-centroid linear
    classifier :func:`fit_centroid_classifier` on them, and drops the clients whose probability of being
    malicious exceeds ``threshold``; the rest are averaged with their sample weights. If every client is
    dropped the aggregate is zero (the global adapter stays).

    Parameters
    ----------
    labelled_updates : (benign (k, d), malicious (k, d))
        The server's simulated updates (passed by the engine, built by ``defense/classifier.py``).
    threshold : float, default 0.5
    sims : int, default 2
        Simulated updates per class and round (read by the engine; each is one local training).

    Notes
    -----
    The server needs harmful training data (its own small red-team set, like Safe-FedLLM). Needs deltas.
    ``info`` has each client's probability.
    """
    if labelled_updates is None:
        raise ValueError("update_classifier: needs labelled_updates (the server's simulated updates)")
    ben, mal = (torch.as_tensor(t).to(device=x.device) for t in labelled_updates)
    wv, b, scale = fit_centroid_classifier(ben, mal)
    prob = malicious_probability(x, wv, b, scale)
    keep = prob <= threshold
    if keep.any():
        coef = masked_weights(w, keep.to(w.device))
        agg = combine(x, coef)
    else:
        coef = torch.zeros_like(w)
        agg = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    return AggResult(agg, coef.to(x), {"p_malicious": as_list(prob), "threshold": threshold})
