"""Data-level stealth for the data-only attack: mix benign data into the malicious clients' shards."""

from __future__ import annotations

import random

from ..errors import FedsafeError


def apply_benign_mix(mix: float, seed: int, fed) -> None:
    """Stealth variant (``attack.benign_mix``): malicious clients replace a fraction ``mix`` of their data by
    held-out normal data, so their updates look more like benign ones. Knows: its own data plus public
    normal instruction data. Mutates ``fed.clients[*].records`` in place; seeded by ``seed``."""
    if mix <= 0:
        return
    pool = [r for recs in fed.heldout.values() for r in recs if r.kind == "normal"]
    rng = random.Random(seed)
    rng.shuffle(pool)
    for c in fed.clients:
        if c.malicious:
            k = int(len(c.records) * mix)
            if k > len(pool):
                raise FedsafeError(f"attack.benign_mix={mix}: not enough held-out normal data ({len(pool)})")
            c.records[:k] = pool[:k]
            del pool[:k]


def reference_pool(fed, seed: int) -> list:
    """Held-out normal records, shuffled by ``seed``: what an ``estimate`` attacker trains its
    benign-looking reference updates on (public instruction data, never a benign client's own)."""
    pool = [r for recs in fed.heldout.values() for r in recs if r.kind == "normal"]
    random.Random(seed).shuffle(pool)
    return pool
