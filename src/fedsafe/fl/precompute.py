"""Frozen-prefix states of every client record, computed in one batched pass before the first round.

Lazily (``Runtime.prefix``), a round pays for the lower layers of each record it meets for the first time,
in micro-batch-sized pieces of mixed lengths; over a long run nearly every record is met, so the same work
is done anyway, only spread over the rounds. Up front it runs once, batched over length-sorted records
(little padding), and every round then runs only the adapted top layers. The states are the same tensors
the lazy path caches (same function, same per-record key), so training is unchanged (tests/test_prefix_precompute.py).

Whether to do it (``fl.prefix_precompute``): ``always``; ``never``; ``auto`` when the run's local steps draw at
least as many records as the clients hold, i.e. when most records would be met anyway. In every case the
states must fit ``fl.prefix_precompute_mb`` (float32, ``tokens x hidden``); otherwise one line says so and
the engine stays lazy.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass
class PrecomputePlan:
    do: bool
    records: int
    mb: float  # memory the states of all client records take (float32)
    reason: str  # why not, when ``do`` is False ("" otherwise)
    over_budget: bool = False  # the only "not done" worth a line: the user may want it


def plan(fl, examples_per_client: list[list], hidden_size: int) -> PrecomputePlan:
    """Decide from the config, the clients' tokenised examples and the model's hidden size."""
    records = sum(len(ex) for ex in examples_per_client)
    tokens = sum(len(e.input_ids) for ex in examples_per_client for e in ex)
    mb = tokens * hidden_size * 4 / 2**20
    draws = fl.rounds * fl.sample_clients * fl.local_steps * fl.batch_size * fl.grad_accum
    if fl.prefix_precompute == "never":
        return PrecomputePlan(False, records, mb, "fl.prefix_precompute=never")
    if fl.prefix_precompute == "auto" and draws < records:
        return PrecomputePlan(False, records, mb, f"auto: the run draws {draws} records of {records}")
    if mb > fl.prefix_precompute_mb:
        return PrecomputePlan(
            False, records, mb, f"{mb:.0f} MB > fl.prefix_precompute_mb={fl.prefix_precompute_mb}", over_budget=True
        )
    return PrecomputePlan(True, records, mb, "")


def run(rt, records_per_client: list[list], examples_per_client: list[list], p: PrecomputePlan) -> dict:
    """Fill the runtime's prefix cache for every client record (one batched pass); returns what it cost."""
    if not p.do:
        if p.over_budget:
            print(
                f"fedsafe: frozen-prefix states of all {p.records} client records would take {p.reason}; "
                "computing them lazily per record instead",
                file=sys.stderr,
            )
        return {"done": False, "reason": p.reason, "records": p.records, "mb": round(p.mb, 1)}
    recs = [r for rs in records_per_client for r in rs]
    exs = [e for ex in examples_per_client for e in ex]
    t0, c0 = time.perf_counter(), time.process_time()
    rt.prefix(recs, exs, batch_size=32)
    return {
        "done": True,
        "records": p.records,
        "mb": round(p.mb, 1),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
