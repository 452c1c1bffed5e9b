"""Stable seeds for every source of randomness in a round, derived from (seed, round, client, ...)."""


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python hash randomisation)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h
