"""An attack that knows the server runs ``safety_probe``: harmful training with a probe-evasion regulariser.

``safety_probe`` (:mod:`fedsafe.aggregators.safety_probe`) scores each update by how much it raises the NLL
of *safe* answers to harmful probe prompts. An attacker who knows this can train on its unaligned data and,
in the same steps, keep that NLL low on probe-like prompts of its own:

    loss = CE(unaligned data) + weight * CE(safe answers to held-out harmful prompts)

The first term is the benign code path on the malicious client's data (the data-only attack); the second is
the extra loss term (``fedsafe.fl.train.AuxTerm``). Whether an update can be harmful on the evaluation
prompts while looking safe on the probe is what this measures: a probe that is evaded is a finding.
"""

from __future__ import annotations

import math
import random

import torch

from ..errors import FedsafeError
from .base import Param, fail, register

WEIGHT_RANGE = (0.0, 100.0)  # the regulariser weight's bounds, declared once (checked before training)
SEED_OFFSET = 1_000_033  # seeds the attacker's pool draw and its regulariser batches (never a client id)


def _bounds(p: dict) -> None:
    lo, hi = WEIGHT_RANGE
    w = p["weight"]
    if not (math.isfinite(w) and lo <= w <= hi):
        fail("probe_evade", f"parameter 'weight' must be in [{lo:g}, {hi:g}], got {w}")
    if p["safe_n"] < 1:
        fail("probe_evade", f"parameter 'safe_n' must be >= 1, got {p['safe_n']}")


@register("probe_evade", scope="client", regulariser=True, bounds=_bounds,
          params={"weight": Param(1.0, float), "safe_n": Param(32, int)})
def probe_evade(delta: torch.Tensor, gen: torch.Generator) -> None:
    """Probe-aware safety attack (fedsafe, beyond the paper): the data-only attack (Ye et al., ICLR 2025, §4)
    plus ``weight`` x the response NLL of safe answers to ``safe_n`` harmful prompts, in every local step.

    Knows: its own unaligned data; that the server scores updates by the NLL of safe answers to harmful
    probe prompts (``safety_probe``) and what such answers look like; public harmful prompts with safe
    answers -- ``safe_n`` records of the held-out aligned pool (``data.defense_aligned``), which never
    holds an evaluation or probe prompt. It does not know the probe prompts themselves, and it sends its
    trained adapter unchanged (no update crafting). ``weight = 0`` is the data-only attack, bit for bit.
    """
    return None


def safe_answer_pool(fed, spec: str, seed: int, n: int) -> list:
    """The attacker's ``n`` harmful prompts with safe answers: held-out aligned records of ``spec`` (what is
    left after clients, evaluation, probe and the server's alignment reservation), drawn by ``seed``."""
    pool = [r for r in fed.heldout.get(spec, []) if r.kind == "aligned"]
    if len(pool) < n:
        raise FedsafeError(
            f"attack 'probe_evade' needs {n} held-out harmful prompts with safe answers from data.defense_aligned "
            f"({spec}), but only {len(pool)} are left after clients, evaluation and probe; lower "
            "attack.params.safe_n or give data.defense_aligned more records")
    pool = sorted(pool, key=lambda r: r.id)  # independent of load order
    random.Random(seed).shuffle(pool)
    return pool[:n]
