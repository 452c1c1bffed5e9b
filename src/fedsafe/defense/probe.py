"""Behavioural scoring of client updates on a small server-held probe set (beyond the paper).

The paper shows parameter-space rules fail because poisoned LoRA updates look like benign ones. What
differs is what an update *does*: applied alone to the global adapter, a poisoned update makes safe
answers to harmful prompts less likely. For each client update u_i we measure, on the server's probe set
(``Federation.probe_harmful`` paired with offline safe responses, ``probe_benign`` with reference answers):

    s_i = NLL_safe(global + u_i) - NLL_safe(global)        (> 0: the update erodes safety)
    h_i = NLL_help(global + u_i) - NLL_help(global)        (> 0: the update hurts helpfulness)

and the ``safety_probe`` rule (``fedsafe.aggregators``) down-weights or rejects clients with large s_i.
Cost per round: (m + 1) forward passes over the probe set (no backward), with m the sampled clients.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..data.partition import Federation
from ..data.records import Record
from ..data.safe_responses import safe_response
from ..errors import FedsafeError
from ..eval.runner import reference_nll
from ..runtime import Runtime


def probe_records(fed: Federation) -> tuple[list[Record], list[Record]]:
    harmful = [Record(instruction=r.instruction, response=safe_response(r.instruction, key=r.id), kind="aligned",
                      source="probe") for r in fed.probe_harmful]
    benign = [r for r in fed.probe_benign if r.response]
    return harmful, benign


def make_probe_fn(rt: Runtime, fed: Federation) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Returns ``probe(global_vec, deltas (n, d)) -> (n, 2)`` tensor of (s_i, h_i)."""
    harmful, benign = probe_records(fed)
    if not harmful:
        raise FedsafeError("safety_probe needs a server probe set: set data.probe_n > 0")

    def nlls(vec):
        a = reference_nll(rt, vec, harmful)
        b = reference_nll(rt, vec, benign) if benign else 0.0
        return a, b

    def probe(global_vec: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        s0, h0 = nlls(global_vec)
        out = []
        for u in deltas:
            s, h = nlls(global_vec + u)
            out.append((s - s0, h - h0))
        return torch.tensor(out, dtype=torch.float32)

    return probe
