"""Per-round forensics: update norms and pairwise cosine similarities."""

from __future__ import annotations

import torch

from ._ops import cosine_from_gram, gram


def forensics(updates: torch.Tensor, *, chunk: int | None = None) -> dict:
    """Norms and pairwise cosine similarity of the client updates.

    Memory-bounded: one ``(n, n)`` Gram matrix accumulated over column blocks.

    Returns
    -------
    dict
        ``{"norms": [n floats], "cosine": n x n nested list}`` (JSON-serialisable; a zero
        update has cosine 0 with everything, itself included).
    """
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        raise ValueError("forensics: updates must be an (n_clients, d) tensor")
    g = gram(updates, chunk=chunk)
    return {
        "norms": g.diagonal().clamp_min(0).sqrt().cpu().tolist(),
        "cosine": cosine_from_gram(g).cpu().tolist(),
    }
