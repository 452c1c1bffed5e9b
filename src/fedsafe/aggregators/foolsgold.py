"""FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020): down-weight clients that look alike.

Cosine similarity is direction-based, so these rules need deltas, not raw weights.
"""

from __future__ import annotations

import torch

from ._ops import combine, cosine_from_gram, gram, one_thread
from .base import AggResult, Param, as_list, register


# Cosines are computed from an fp32 Gram matrix, so identical updates can show a similarity of
# 1 - 1e-7; a client whose 1 - max similarity is below this counts as an exact copy.
COPY_TOL = 1e-6


@one_thread()  # only (n, n) work: see one_thread
def foolsgold_scores(cos: torch.Tensor, kappa: float = 1.0, logit_eps: float = 0.0) -> torch.Tensor:
    """FoolsGold per-client learning rates ``wv`` in [0, 1] from a cosine matrix.

    1. ``cs = cos - I`` and ``v_i = max_j cs_ij``.
    2. Pardoning: ``cs_ij *= v_i / v_j`` where ``v_i < v_j`` (honest clients that merely
       resemble a sybil are not punished as hard as the sybil).
    3. ``wv_i = clip(1 - max_j cs_ij, 0, 1)`` (0 below ``COPY_TOL``), rescaled so
       ``max wv = 1``; 1 becomes 0.99.
    4. Logit: ``wv_i = clip(kappa * (ln(wv_i / (1 - wv_i + logit_eps)) + 0.5), 0, 1)``.

    All-zero if every client is a copy of another (nothing left to rescale).
    """
    n = cos.shape[0]
    cs = cos - torch.eye(n, dtype=cos.dtype, device=cos.device)
    v = cs.max(dim=1).values
    pardon = (v[:, None] < v[None, :]) & (v[None, :] != 0)
    cs = torch.where(pardon, cs * (v[:, None] / torch.where(pardon, v[None, :], 1)), cs)
    wv = (1 - cs.max(dim=1).values).clamp(0, 1)
    wv = torch.where(wv < COPY_TOL, torch.zeros_like(wv), wv)
    top = wv.max()
    if top <= 0:
        return torch.zeros_like(wv)
    wv = wv / top
    wv = torch.where(wv == 1, torch.full_like(wv, 0.99), wv)
    wv = kappa * (torch.log(wv / (1 - wv + logit_eps)) + 0.5)
    return wv.clamp(0, 1)  # log(0) = -inf clamps to 0


def _histories(state: dict, client_ids, x: torch.Tensor) -> list[torch.Tensor]:
    """Add this round's updates to each client's running sum; return the sums in row order."""
    ids = [int(c) for c in client_ids]
    if len(ids) != x.shape[0] or len(set(ids)) != len(ids):
        raise ValueError("foolsgold: client_ids must be n distinct ids, one per update row")
    hist = state.setdefault("history", {})
    for cid, u in zip(ids, x):
        if cid not in hist:
            hist[cid] = u.detach().clone()  # own copy: added to in place later
            continue
        if hist[cid].device != u.device or hist[cid].dtype != u.dtype:
            # e.g. a history loaded from a CPU checkpoint into a GPU run
            hist[cid] = hist[cid].to(device=u.device, dtype=u.dtype)
        hist[cid].add_(u)
    return [hist[cid] for cid in ids]


@register(
    "foolsgold",
    params={"history": Param(True, bool), "kappa": Param(1.0, float)},
    needs=("client_ids",),
)
def foolsgold(
    x, w, *, state=None, chunk=None, history=True, kappa=1.0, client_ids=None
) -> AggResult:
    """FoolsGold with per-client history (Fung et al., RAID 2020, Algorithm 1).

    Similarities are computed on each client's cumulative update sum ``H_i`` kept in
    ``state["history"][client_id]`` (with ``history=False``, or without ``state``, on this
    round's updates). Scores ``wv`` come from :func:`foolsgold_scores`; the output is
    ``sum_i wv_i p_i u_i / sum_i wv_i p_i`` (normalised, so the step stays on FedAvg scale;
    zero if every ``wv_i`` is 0).

    Parameters
    ----------
    history : bool, default True
    kappa : float, default 1.0
        Confidence of the logit.

    Notes
    -----
    The history costs ``d`` floats per distinct client on the updates' device.
    The original "importance" feature weighting is not implemented.
    """
    use_history = history and state is not None
    if use_history and client_ids is None:
        raise ValueError("foolsgold: history needs client_ids (the engine passes them)")
    rows = _histories(state, client_ids, x) if use_history else x
    wv = foolsgold_scores(cosine_from_gram(gram(rows, chunk=chunk)), kappa)
    raw = wv * w
    total = float(raw.sum())
    coef = raw / total if total > 0 else torch.zeros_like(raw)
    info = {"wv": as_list(wv), "history": use_history}
    return AggResult(combine(x, coef), coef.to(x), info)


@register("foolsgold_paper")
def foolsgold_paper(x, w, *, state=None, chunk=None) -> AggResult:
    """FoolsGold as in the paper's code: this round only, no history, no normalisation.

    ``wv`` from :func:`foolsgold_scores` on the cosines of this round's updates; the new global
    model is the mean over clients with ``wv_i != 0`` of ``global + wv_i u_i``, i.e.
    ``aggregate = sum_{wv_i != 0} wv_i u_i / #{i : wv_i != 0}`` (zero if none). Since
    ``wv_i <= 1`` this shrinks the step. Sample counts are ignored.
    """
    wv = foolsgold_scores(cosine_from_gram(gram(x, chunk=chunk)), logit_eps=1e-8)  # as in the code
    kept = int((wv != 0).sum())
    coef = wv / kept if kept else torch.zeros_like(wv)
    return AggResult(combine(x, coef), coef.to(x), {"wv": as_list(wv)})
