"""FedAvg: the non-robust baseline."""

from __future__ import annotations

import torch

from ._ops import combine
from .base import AggResult, register


@register("mean")
def mean(x: torch.Tensor, w: torch.Tensor, *, state=None, chunk=None) -> AggResult:
    """FedAvg (McMahan et al., AISTATS 2017): sample-count weighted mean.

    ``aggregate = sum_i p_i u_i`` with ``p_i = N_i / sum_j N_j``.

    Returns
    -------
    AggResult
        ``client_weights = p``.
    """
    return AggResult(combine(x, w), w.to(x), {})
