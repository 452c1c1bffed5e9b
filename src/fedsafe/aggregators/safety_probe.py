"""safety_probe: behavioural aggregation from a server-held probe set (fedsafe, beyond the paper)."""

from __future__ import annotations

import torch

from fedsafe.errors import ConfigError

from ._ops import combine
from .base import AggResult, Param, as_list, masked_weights, register


@register(
    "safety_probe",
    params={
        "tolerance": Param(0.05, float),
        "z": Param(3.0, float),
        "mode": Param("reject", str, ("reject", "soft", "rank")),
        "f": Param(1, int),
        "temperature": Param(0.05, float),
        "help_weight": Param(0.0, float),
    },
    needs=("probe_scores",),
)
def safety_probe(x, w, *, state=None, chunk=None, probe_scores=None, tolerance=0.05, z=3.0, mode="reject",
                 temperature=0.05, help_weight=0.0, f=1) -> AggResult:
    """Score each update by what it does, not what it looks like.

    ``probe_scores[i] = (s_i, h_i)``: the change in per-token NLL of *safe* answers to harmful probe
    prompts (s) and of reference answers to benign probe prompts (h) when update ``i`` alone is applied
    to the global adapter (computed by the engine, see ``fedsafe.defense.probe``). With
    ``e_i = s_i + help_weight * h_i``:

    * ``reject``: keep client i iff ``e_i <= max(tolerance, median(e) + z * 1.4826 * MAD(e))``;
      aggregate = sample-weighted mean of the kept updates (zero update if none is kept).
    * ``soft``: weights ``w_i * exp(-max(e_i, 0) / temperature)``, renormalised.
    * ``rank``: drop the ``f`` clients with the largest ``e_i`` if that score is above 0 (the update made
      safe answers less likely); mean of the rest. For small rounds (m = 3 in the paper's setting), where a
      robust z-score over three values is meaningless but the ranking is informative; ``fl.oracle`` gives
      the rule the true count ``f``, as the paper's Krum was given.

    The threshold is relative (robust z-score) so that a round where every benign update nudges the
    safe NLL a little is not emptied, with an absolute floor ``tolerance`` (nats per token).
    """
    if probe_scores is None:
        raise ConfigError("aggregator 'safety_probe': needs probe scores; the engine computes them from "
                          "the server probe set (data.probe_n > 0)")
    ps = torch.as_tensor(probe_scores, dtype=torch.float64)
    e = ps[:, 0] + help_weight * ps[:, 1]
    med = e.median()
    mad = (e - med).abs().median() * 1.4826
    thresh = max(tolerance, float(med + z * mad))
    wd = w.to(torch.float64).cpu()
    if mode == "soft":
        raw = wd * torch.exp(-e.clamp_min(0) / temperature)
        coef = raw / raw.sum() if float(raw.sum()) > 0 else torch.zeros_like(wd)
    else:
        if mode == "rank":
            if not 0 <= f < len(e):
                raise ConfigError(f"aggregator 'safety_probe' (mode=rank): f={f} must be in [0, n), n={len(e)}")
            top = torch.argsort(e, descending=True)[:f]
            thresh = max(0.0, float(e[top].min())) if f else float("inf")  # keep scores <= 0 even in the top f
            keep = torch.ones(len(e), dtype=torch.bool)
            keep[top] = e[top] <= 0
        else:
            keep = e <= thresh
        coef = masked_weights(wd, keep) if bool(keep.any()) else torch.zeros_like(wd)
    coef_x = coef.to(device=x.device, dtype=x.dtype)
    agg = combine(x, coef_x) if float(coef.sum()) > 0 else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    info = {"safe_nll_change": as_list(ps[:, 0]), "help_nll_change": as_list(ps[:, 1]), "threshold": thresh}
    return AggResult(agg, coef_x, info)
