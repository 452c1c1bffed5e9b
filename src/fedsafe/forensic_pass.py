"""A forensic pass: every client trains once from the same global adapter (the paper's Fig. 3a).

During a federation only ``fl.sample_clients`` of the K clients train in a round, so the per-round
cosines in ``forensics.jsonl`` cover only the pairs that happened to meet; with 3 of 10 clients most pairs
never do and the averaged heat-map is mostly blank. This pass trains all K clients from one adapter (the
run's final one, or its start), each exactly as in a round (same code path, same local steps, malicious
clients on their own data), and stores the full K x K cosine matrix of their updates in
``forensics_full.json``. It changes nothing else in the run directory.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from . import aggregators
from .errors import FedsafeError
from .fl.updates import validate_state
from .io import atomic_write_json
from .lm import cosine_lr
from .pipeline import build_engine
from .rundir import load_run_config

FILE = "forensics_full.json"


def forensic_pass(run_dir: str | Path, *, at: str = "final", progress: bool = False) -> dict:
    """Train every client once from the ``at`` adapter ("final" or "start"); write and return the matrix."""
    d = Path(run_dir)
    cfg = load_run_config(d)
    if at not in ("final", "start"):
        raise FedsafeError(f"forensic pass: at={at!r}; use final or start")
    if at == "final" and not (d / "final_adapter").is_dir():
        raise FedsafeError(f"{d} has no final_adapter yet; finish the run first (or use at='start')")
    t0 = time.time()
    eng = build_engine(cfg, d, progress=progress, round_callback=None)
    fl = cfg.fl
    if at == "final":
        eng.global_vec = eng.rt.handle.load_adapter_dir(d / "final_adapter")
        lr = cosine_lr(fl.rounds - 1, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)
    else:
        lr = cosine_lr(0, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)
    # a round index no real round used: fresh, deterministic seeds for every client
    rnd = fl.rounds
    ids, vecs, losses = [], [], []
    for cid, sd, m in eng._client_updates(list(range(eng.K)), rnd, lr):
        vecs.append(validate_state(sd, eng.keys, eng.shapes, eng.global_vec, math.inf))
        ids.append(cid)
        losses.append(m["loss"])
    fx = aggregators.forensics(torch.stack(vecs) - eng.global_vec)
    out = {"at": at, "lr": lr, "seed_round": rnd, "local_steps": fl.local_steps, "clients": ids,
           "malicious": [c in eng.malicious for c in ids], "loss": losses, "norms": fx["norms"],
           "cosine": fx["cosine"], "seconds": round(time.time() - t0, 1)}
    atomic_write_json(d / FILE, out)
    return out
