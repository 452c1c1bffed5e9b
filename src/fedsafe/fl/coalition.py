"""The engine side of colluding attacks: what a round-scope behaviour of :mod:`fedsafe.attack` gets to see.

The behaviours themselves (ALIE, IPM, min-max, ...) are plain functions in ``attack/``; this module only
gathers their inputs from an :class:`~fedsafe.fl.engine.Engine` round and writes their output back:
the malicious clients' trained deltas, and benign deltas according to ``attack.knowledge``
(``omniscient``: the round's benign updates; ``estimate``: reference updates the coalition trains itself
on held-out normal data, with the benign code path).
"""

from __future__ import annotations

import torch

from .. import attack
from ..attack.data import reference_pool
from ..errors import FedsafeError
from .seeds import derive_seed
from .train import train_local
from .updates import RejectedUpdate, validate_state

REFERENCE_SEED = 1_000_003  # seed offset of an 'estimate' coalition's reference trainings (never a client id)


def _seed(*parts: int) -> int:
    return derive_seed(*parts)


def reference_shards(eng) -> list[tuple[list, list]]:
    """An 'estimate' coalition's benign-looking data: ``attack.ref_updates`` disjoint shards of held-out
    normal records (public instruction data), each the size of a malicious client's data."""
    a = eng.cfg.attack
    pool = reference_pool(eng.fed, _seed(eng.cfg.seed, REFERENCE_SEED))
    size = min(len(eng.fed.clients[c].records) for c in eng.malicious)
    size = min(size, len(pool) // max(a.ref_updates, 1))
    if size < 1:
        raise FedsafeError(
            f"attack '{a.behaviour}' with knowledge 'estimate': {len(pool)} held-out normal records cannot make "
            f"{a.ref_updates} benign-looking reference sets; give the data groups more normal data or use "
            "attack.knowledge=omniscient")
    shards = [pool[k * size:(k + 1) * size] for k in range(a.ref_updates)]
    return [(recs, eng.rt.tokenize(recs)) for recs in shards]


def reference_updates(eng, rnd: int, lr: float) -> list[torch.Tensor]:
    """Deltas the coalition trains itself from the global adapter on its reference shards."""
    return train_from_global(eng, eng.ref_examples, rnd, lr, REFERENCE_SEED)


def train_from_global(eng, shards: list[tuple[list, list]], rnd: int, lr: float, seed_offset: int) -> list[torch.Tensor]:
    """One local training per ``(records, examples)`` shard from the global adapter, with the benign code path
    and hyper-parameters (fresh optimiser, no client state); returns the deltas. Also used by the server to
    simulate updates (``defense/classifier.py``)."""
    fl, rt, out = eng.cfg.fl, eng.rt, []
    for k, (recs, ex) in enumerate(shards):
        seed = _seed(eng.cfg.seed, rnd, seed_offset + k)
        torch.manual_seed(seed)
        rt.handle.set_flat(eng.global_vec)
        prox = fl.prox_mu if fl.fed_alg == "fedprox" else 0.0
        train_local(
            rt.handle, ex, steps=fl.local_steps, batch_size=fl.batch_size, grad_accum=fl.grad_accum, lr=lr,
            pad_id=rt.pad_id, device=rt.device, gen=torch.Generator().manual_seed(seed),
            weight_decay=fl.weight_decay, max_grad_norm=fl.max_grad_norm, autocast=eng.cfg.model.autocast,
            optimizer_state=None, prox_mu=prox, prox_center=eng.global_vec if prox else None,
            grad_correction=None, prefix_fn=eng._prefix_fn_for(recs, ex) if eng.use_prefix else None,
            first_layer=eng.first_layer,
        )
        out.append(rt.handle.get_flat() - eng.global_vec)
    return out


def as_delta(eng, sd) -> torch.Tensor | None:
    try:
        return validate_state(sd, eng.keys, eng.shapes, eng.global_vec, float("inf")) - eng.global_vec
    except RejectedUpdate:
        return None


def collude(eng, updates: list, rnd: int, lr: float) -> tuple[list, dict | None]:
    """Round-scope attacks: the sampled malicious clients replace their trained updates by the crafted ones.

    The coalition sees its own trained deltas and, by ``attack.knowledge``, this round's benign deltas
    (``omniscient``) or reference deltas it trains itself (``estimate``). In a Flower run this step
    simulates the coalition on the server, on the replies as received."""
    deltas = [as_delta(eng, sd) for _, sd, _ in updates]  # None: a reply the server will reject anyway
    mal = [i for i, (cid, _, _) in enumerate(updates) if cid in eng.malicious and deltas[i] is not None]
    if not mal:
        return updates, None
    knowledge = eng._attack_knowledge()
    own = torch.stack([deltas[i] for i in mal])
    honest = [d for (cid, _, _), d in zip(updates, deltas) if cid not in eng.malicious and d is not None]
    if knowledge == "omniscient":
        benign = honest
    else:
        benign = reference_updates(eng, rnd, lr)
    info = {"behaviour": eng.attack_spec.name, "knowledge": knowledge, "benign_seen": len(benign),
            "clients": [updates[i][0] for i in mal]}
    if len(benign) < eng.attack_spec.min_benign:
        info["fallback"] = f"fewer than {eng.attack_spec.min_benign} benign updates: sent the data-attack updates"
        return updates, info
    n = len(mal) + len(honest)

    def server_rule(U: torch.Tensor) -> torch.Tensor:  # only for attacks that target the server's rule
        return eng.rule(U, None, state=None, **dict(eng.agg_params, round=rnd)).aggregate

    ctx = attack.RoundContext(own=own, benign=torch.stack(benign), n=n,
                              gen=torch.Generator().manual_seed(_seed(eng.cfg.seed, rnd, REFERENCE_SEED - 1)),
                              aggregate=server_rule)
    crafted, extra = attack.REGISTRY[eng.attack_spec.name](ctx, **eng.attack_params)
    info.update(extra)
    updates = list(updates)
    for j, i in enumerate(mal):
        cid, _, m = updates[i]
        updates[i] = (cid, eng.rt.handle.state_dict(eng.global_vec + crafted[j]), m)
    return updates, info

