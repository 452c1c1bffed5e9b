"""Memory-bounded linear-algebra helpers shared by the aggregation rules.

Client updates arrive as one ``(n, d)`` matrix with ``d`` up to ~17M, so nothing here makes a
full-size copy: pairwise quantities are accumulated from column blocks into small ``(n, n)``
float64 matrices, and per-coordinate work is done block by block.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

# Elements (not bytes) of one working block: 2**20 fp32 values = 4 MiB. Blocks that stay in
# cache were 2-10x faster than 64 MiB ones for norms, sorts and selections on CPU.
BLOCK_ELEMENTS = 1 << 20
# On GPUs, larger blocks amortise kernel launches; 2**24 values = 64 MiB per block.
BLOCK_ELEMENTS_GPU = 1 << 24

Rows = torch.Tensor | Sequence[torch.Tensor]


def block_columns(
    n: int, chunk: int | None, per_column: int | None = None, device: torch.device | None = None
) -> int:
    """Columns per block: ``chunk`` if given, else what fits the device's element budget."""
    if chunk is not None:
        return chunk
    budget = BLOCK_ELEMENTS if device is None or device.type == "cpu" else BLOCK_ELEMENTS_GPU
    return max(1, budget // max(1, per_column or n))


def column_slices(d: int, width: int) -> Iterator[slice]:
    for start in range(0, d, width):
        yield slice(start, min(start + width, d))


def _n_rows(rows: Rows) -> int:
    return rows.shape[0] if isinstance(rows, torch.Tensor) else len(rows)


def _dim(rows: Rows) -> int:
    return rows.shape[1] if isinstance(rows, torch.Tensor) else rows[0].shape[0]


def _block(rows: Rows, cols: slice) -> torch.Tensor:
    """``rows[:, cols]``; ``rows`` may be a list of vectors (e.g. FoolsGold histories)."""
    if isinstance(rows, torch.Tensor):
        blk = rows[:, cols]
    else:
        blk = torch.stack([r[cols] for r in rows])
    # Half-precision matmuls would lose the small differences Krum & co. depend on.
    return blk.float() if blk.element_size() < 4 else blk


def gram(rows: Rows, *, center: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Gram matrix ``X X^T`` as float64, accumulated over column blocks.

    With ``center=True`` the column mean is removed first. Distances are translation
    invariant, and centring avoids the cancellation in ``|x|^2 + |y|^2 - 2 x.y`` when the
    updates are close to each other but far from the origin.
    """
    n = _n_rows(rows)
    ref = rows if isinstance(rows, torch.Tensor) else rows[0]
    out = torch.zeros(n, n, dtype=torch.float64, device=ref.device)
    for cols in column_slices(_dim(rows), block_columns(n, chunk, device=ref.device)):
        blk = _block(rows, cols)
        if center:
            blk = blk - blk.mean(dim=0, keepdim=True)
        out += (blk @ blk.T).double()
    # BLAS need not return an exactly symmetric product; exact symmetry keeps tied
    # distances (e.g. mutual nearest neighbours) exactly tied, so tie-breaks are order-free.
    return (out + out.T) / 2


def sq_distances(g: torch.Tensor) -> torch.Tensor:
    """Pairwise squared L2 distances from a Gram matrix (zero diagonal, clamped at 0)."""
    diag = g.diagonal()
    dist = (diag[:, None] + diag[None, :] - 2 * g).clamp_min(0)
    dist.fill_diagonal_(0)
    return dist


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Cosine similarities from an (uncentred) Gram matrix; zero vectors get similarity 0."""
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, g / denom.clamp_min(1e-300), torch.zeros_like(g))
    return cos.clamp(-1, 1)


def row_sq_norms(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Squared L2 norm of each row, accumulated over blocks as float64."""
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for cols in column_slices(x.shape[1], block_columns(x.shape[0], chunk, device=x.device)):
        out += torch.linalg.vector_norm(x[:, cols], dim=1).double().pow(2)
    return out


def row_dots(x: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``x @ v`` accumulated in float64 over column blocks."""
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for cols in column_slices(x.shape[1], block_columns(x.shape[0], chunk, device=x.device)):
        out += (x[:, cols] @ v[cols]).double()
    return out


def row_distances(x: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``||x_i - v||`` for every row, float64, block by block."""
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for cols in column_slices(x.shape[1], block_columns(x.shape[0], chunk, device=x.device)):
        out += torch.linalg.vector_norm(x[:, cols] - v[cols], dim=1).double().pow(2)
    return out.sqrt()


def combine(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef_i x_i`` as a ``(d,)`` tensor in ``x``'s dtype and device."""
    return coef.to(device=x.device, dtype=x.dtype) @ x


def median_lastdim(t: torch.Tensor, count: int | None = None, skip: int = 0) -> torch.Tensor:
    """Median of ``sorted(t)[..., skip:skip + count]`` (mean of the two middle values if even).

    Uses selection (``kthvalue``) rather than a full sort.
    """
    count = t.shape[-1] - skip if count is None else count
    lo = torch.kthvalue(t, skip + (count + 1) // 2, dim=-1).values
    if count % 2:
        return lo
    hi = torch.kthvalue(t, skip + count // 2 + 1, dim=-1).values
    return (lo + hi) / 2


def mixed_seed(seed: int, round_: int, salt: str) -> int:
    """Deterministic 63-bit seed from (seed, round, rule) so rounds draw different streams."""
    digest = hashlib.sha256(f"{seed}:{round_}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
