"""Server-side simulated updates for the ``update_classifier`` rule (Safe-FedLLM's idea; beyond the paper).

Each round the server trains ``sims`` updates from the global adapter on held-out normal data (benign) and
``sims`` on held-out unaligned data (its own small red-team set: the part of the malicious sources no
client received), with the clients' code path and hyper-parameters. Cost: ``2 * sims`` local trainings
per round.
"""

from __future__ import annotations

import random

from ..errors import FedsafeError
from ..fl.coalition import train_from_global
from ..fl.engine import derive_seed
from ..lm import cosine_lr

SIM_SEED = 2_000_003  # seed offset of the server's simulated trainings (never a client id)


def _shards(eng, kind: str, sims: int, size: int) -> list[tuple[list, list]]:
    pool = [r for recs in eng.fed.heldout.values() for r in recs if r.kind == kind]
    random.Random(derive_seed(eng.cfg.seed, SIM_SEED, len(kind))).shuffle(pool)
    size = min(size, len(pool) // sims)
    if size < 1:
        raise FedsafeError(f"fl.aggregator=update_classifier: the server needs held-out {kind} records to simulate "
                           f"{sims} {'benign' if kind == 'normal' else 'malicious'} updates, found {len(pool)}; give "
                           "the data sources more records or lower fl.aggregator_params.sims")
    recs = [pool[k * size:(k + 1) * size] for k in range(sims)]
    return [(r, eng.rt.tokenize(r)) for r in recs]


def make_classifier_fn(eng):
    """``fn(rnd) -> (benign (k, d), malicious (k, d))`` simulated deltas from the current global adapter."""
    import torch

    sims = int(eng.agg_params.get("sims", 2))
    size = max(1, min(len(c.records) for c in eng.fed.clients))
    benign, malicious = _shards(eng, "normal", sims, size), _shards(eng, "unaligned", sims, size)
    fl = eng.cfg.fl

    def fn(rnd: int):
        lr = cosine_lr(rnd, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)
        b = train_from_global(eng, benign, rnd, lr, SIM_SEED)
        m = train_from_global(eng, malicious, rnd, lr, SIM_SEED + sims)
        return torch.stack(b), torch.stack(m)

    return fn
