"""Memory-bounded linear-algebra helpers shared by the aggregation rules.

Client updates arrive as one ``(n, d)`` matrix with ``d`` up to ~17M, so nothing here makes a
full-size copy: pairwise quantities are accumulated from column blocks into small ``(n, n)``
float64 matrices, and per-coordinate work is done block by block.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import operator
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

# Elements (not bytes) of one working block: 2**20 fp32 values = 4 MiB. Blocks that stay in
# cache were 2-10x faster than 64 MiB ones for norms, sorts and selections on CPU.
BLOCK_ELEMENTS = 1 << 20
# On GPUs, larger blocks amortise kernel launches; 2**24 values = 64 MiB per block.
BLOCK_ELEMENTS_GPU = 1 << 24

Rows = torch.Tensor | Sequence[torch.Tensor]
T = TypeVar("T")


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


def numpy_kernels(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the numpy kernels: CPU float32/float64 (other dtypes and GPUs use torch).

    Two measured reasons. For sorting many short rows numpy's vectorised sort is 10-30x faster
    than torch's CPU sort. And numpy work on blocks spread over threads (:func:`map_blocks`) has no
    per-op synchronisation, whereas every small ATen elementwise op joins all its threads: with
    other processes on the cores, blocked norms and centring ran 10-20x slower that way.
    """
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def map_blocks(
    d: int, width: int, work: Callable[[slice], T], threads: int | None = None
) -> list[T]:
    """``[work(cols) for cols in column_slices(d, width)]``, on ``torch.get_num_threads()`` threads.

    Meant for numpy work, which releases the GIL in sorts and elementwise loops, so blocks run in
    parallel; ``work`` must only write to its own columns. ``threads=1`` runs them in order here.
    """
    threads = torch.get_num_threads() if threads is None else threads

    def quiet(cols: slice) -> T:  # IEEE results (inf - inf = nan) without warnings, as in torch
        with np.errstate(all="ignore"):
            return work(cols)

    blocks = list(column_slices(d, width))
    if threads <= 1 or len(blocks) == 1:
        return [quiet(cols) for cols in blocks]
    with ThreadPoolExecutor(min(threads, len(blocks))) as pool:
        return list(pool.map(quiet, blocks))


def sum_blocks(
    d: int, width: int, work: Callable[[slice], T], threads: int | None = None, span: int = 32
) -> T:
    """``sum(work(cols) for cols in column_slices(d, width))`` with the blocks spread over threads.

    Each thread sums ``span`` consecutive blocks in order, then the spans are added in order: the
    result does not depend on scheduling, and only one partial sum per span is kept.
    """

    def span_sum(big: slice) -> T:
        blocks = column_slices(big.stop - big.start, width)
        parts = (work(slice(big.start + c.start, big.start + c.stop)) for c in blocks)
        return functools.reduce(operator.add, parts)

    return functools.reduce(operator.add, map_blocks(d, width * span, span_sum, threads))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run small (n x n) work on one thread; also a decorator (``@one_thread()``).

    Each parallel torch/MKL step waits for all its threads, and with other processes on the
    cores one of them is often descheduled: measured with 2 threads on 2 busy cores, a 100 x 100
    eigendecomposition took 0.28 s instead of 1 ms, and Bulyan's 60 Krum selections 0.6 s instead
    of 13 ms. The setting is process-wide while it lasts (aggregation runs on one thread).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def count_rows(mask: np.ndarray) -> np.ndarray:
    """Per-row number of True values of a 2-D bool array, as int64."""
    # Summing bytes into uint16 is ~5x faster than into int64 and cannot overflow: < 2**16 columns.
    acc = np.uint16 if mask.shape[1] < 1 << 16 else np.int64
    return np.add.reduce(mask.view(np.uint8), axis=1, dtype=acc).astype(np.int64)


def _n_rows(rows: Rows) -> int:
    return rows.shape[0] if isinstance(rows, torch.Tensor) else len(rows)


def _dim(rows: Rows) -> int:
    return rows.shape[1] if isinstance(rows, torch.Tensor) else rows[0].shape[0]


def _source(rows: Rows, on_host: bool):
    """What blocks are cut from: numpy views of CPU float rows (see :func:`numpy_kernels`)."""
    if not on_host:
        return rows
    if isinstance(rows, torch.Tensor):
        return rows.detach().numpy()
    return [r.detach().numpy() for r in rows]


def _block(rows, cols: slice):
    """``rows[:, cols]`` of a matrix or a list of vectors (e.g. FoolsGold histories)."""
    if isinstance(rows, np.ndarray | torch.Tensor):
        return rows[:, cols]
    if isinstance(rows[0], np.ndarray):
        return np.stack([r[cols] for r in rows])
    blk = torch.stack([r[cols] for r in rows])
    # Half-precision matmuls would lose the small differences Krum & co. depend on.
    return blk.float() if blk.element_size() < 4 else blk


def _sq_norms(blk) -> torch.Tensor:
    """Per-row sum of squares of a numpy or torch block, as a float64 tensor."""
    if isinstance(blk, np.ndarray):
        return torch.from_numpy(np.einsum("ij,ij->i", blk, blk).astype(np.float64))
    return torch.linalg.vector_norm(blk, dim=1).double().pow(2)


def gram(rows: Rows, *, center: bool = False, chunk: int | None = None) -> torch.Tensor:
    """Gram matrix ``X X^T`` as float64, accumulated over column blocks.

    With ``center=True`` the column mean is removed first. Distances are translation
    invariant, and centring avoids the cancellation in ``|x|^2 + |y|^2 - 2 x.y`` when the
    updates are close to each other but far from the origin.
    """
    ref = rows if isinstance(rows, torch.Tensor) else rows[0]
    host = numpy_kernels(ref)
    src = _source(rows, host)

    def work(cols: slice) -> torch.Tensor:
        blk = _block(src, cols)
        if center:
            blk = blk - blk.mean(0)  # numpy or torch alike
        t = torch.as_tensor(blk)  # the product itself is torch's (MKL) in both cases
        return (t @ t.T).double()

    width = block_columns(_n_rows(rows), chunk, device=ref.device)
    out = sum_blocks(_dim(rows), width, work, threads=None if host else 1)
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
    host = numpy_kernels(x)
    src = _source(x, host)
    width = block_columns(x.shape[0], chunk, device=x.device)
    return sum_blocks(x.shape[1], width, lambda cols: _sq_norms(src[:, cols]), None if host else 1)


def row_sq_norms_and_dots(x: torch.Tensor, v: torch.Tensor, chunk: int | None = None):
    """:func:`row_sq_norms` and ``x @ v`` (float64 sums over blocks) in one pass over ``x``."""
    host = numpy_kernels(x)
    src, vec = _source(x, host), _source(v[None], host)[0]

    def work(cols: slice) -> torch.Tensor:
        blk = src[:, cols]
        dots = torch.as_tensor(blk) @ torch.as_tensor(vec[cols])  # MKL: 2x numpy's einsum here
        return torch.stack([_sq_norms(blk), dots.double()])

    width = block_columns(x.shape[0], chunk, device=x.device)
    norms, dots = sum_blocks(x.shape[1], width, work, None if host else 1)
    return norms, dots


def row_distances(x: torch.Tensor, v: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``||x_i - v||`` for every row, float64, block by block."""
    host = numpy_kernels(x)
    src, vec = _source(x, host), _source(v[None], host)[0]
    width = block_columns(x.shape[0], chunk, device=x.device)
    work = lambda cols: _sq_norms(src[:, cols] - vec[cols])  # noqa: E731
    return sum_blocks(x.shape[1], width, work, None if host else 1).sqrt()


def combine(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum_i coef_i x_i`` as a ``(d,)`` tensor in ``x``'s dtype and device."""
    return coef.to(device=x.device, dtype=x.dtype) @ x


def median_of_sorted(s, count: int, skip: int = 0):
    """Median of ``s[..., skip:skip + count]`` for rows already sorted (numpy or torch)."""
    lo, hi = s[..., skip + (count - 1) // 2], s[..., skip + count // 2]
    return lo if count % 2 else (lo + hi) / 2


def median_lastdim(t: torch.Tensor, count: int | None = None, skip: int = 0) -> torch.Tensor:
    """Median of ``sorted(t)[..., skip:skip + count]`` (mean of the two middle values if even).

    On CPU (float32/64) numpy sorts the rows: for the short rows used here (one value per client)
    its vectorised sort is ~10x faster than ``torch.kthvalue``, the selection used elsewhere.
    """
    count = t.shape[-1] - skip if count is None else count
    if numpy_kernels(t):
        s = np.sort(t.detach().numpy(), axis=-1)
        return torch.from_numpy(np.array(median_of_sorted(s, count, skip)))
    lo = torch.kthvalue(t, skip + (count + 1) // 2, dim=-1).values
    if count % 2:
        return lo
    hi = torch.kthvalue(t, skip + count // 2 + 1, dim=-1).values
    return (lo + hi) / 2


def mixed_seed(seed: int, round_: int, salt: str) -> int:
    """Deterministic 63-bit seed from (seed, round, rule) so rounds draw different streams."""
    digest = hashlib.sha256(f"{seed}:{round_}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
