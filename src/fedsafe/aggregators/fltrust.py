"""FLTrust: trust scores from a server-side root update."""

from __future__ import annotations

import torch

from fedsafe.errors import ConfigError

from ._ops import combine, row_sq_norms, row_sq_norms_and_dots
from .base import AggResult, as_list, register


def _root(x: torch.Tensor, root_update) -> torch.Tensor:
    if root_update is None:
        raise ConfigError(
            "aggregator 'fltrust': needs root_update, the server's update on its clean root "
            "dataset; configure a server root set so the engine can pass it"
        )
    g0 = torch.as_tensor(root_update).to(device=x.device, dtype=x.dtype).reshape(-1)
    if g0.numel() != x.shape[1]:
        raise ValueError(f"fltrust: root_update has {g0.numel()} values, updates have {x.shape[1]}")
    return g0


@register("fltrust", needs=("root_update",))
def fltrust(x, w, *, state=None, chunk=None, root_update=None) -> AggResult:
    """FLTrust (Cao, Fang, Liu & Gong, NDSS 2021).

    ``TS_i = ReLU(cos(u_i, g0))``, ``u_i' = u_i ||g0|| / ||u_i||``,
    ``aggregate = sum_i TS_i u_i' / sum_i TS_i`` (zero if every ``TS_i`` is 0).
    Sample counts are ignored, as in the paper.

    Parameters
    ----------
    root_update : Tensor (d,)
        The server's update on its clean root dataset (passed by the engine).

    Notes
    -----
    ``client_weights = TS_i / sum_j TS_j`` (trust shares); ``info`` has raw trust scores.
    Not translation invariant: cosines and norms need deltas.
    """
    g0 = _root(x, root_update)
    root_norm = float(row_sq_norms(g0[None], chunk).sqrt())
    sq_norms, dots = row_sq_norms_and_dots(x, g0, chunk)
    norms = sq_norms.sqrt()
    cos = dots / (norms * root_norm).clamp_min(1e-300)
    trust = torch.relu(cos.clamp(-1, 1))
    total = float(trust.sum())
    share = trust / total if total > 0 else torch.zeros_like(trust)
    coef = share * root_norm / norms.clamp_min(1e-300)
    info = {"trust": as_list(trust), "norms": as_list(norms), "root_norm": root_norm}
    return AggResult(combine(x, coef), share.to(x), info)
