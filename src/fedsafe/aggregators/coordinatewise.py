"""Coordinate-wise median and trimmed mean (Yin et al., ICML 2018), plus the paper's variants.

These rules ignore sample counts (as in Yin et al. and the paper's code). ``client_weights``
reports, per client, the fraction of coordinates in which its value was used.

Each rule is a torch block function (run on GPUs) and, for CPU float tensors, a kernel that
gives the same results several times faster: the compiled sorting network of ``_select.c``
(:func:`native_window`), or, where no C compiler is available, the numpy one
(:func:`sorted_window`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import _native
from ._ops import block_columns, column_slices, count_rows, map_blocks, numpy_kernels
from .base import AggResult, Param, fraction_used, register, require

BlockFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class NearMedian:
    """Bulyan's run start per column: the ``size``-long run of sorted values whose farthest
    member is nearest the column median (ties to the lowest start), one of ``0 .. 2f``."""

    f: int

    def __call__(self, s: np.ndarray) -> np.ndarray:
        """The start of each column of sorted values ``s`` (theta, c).

        The first ``j`` reaching the least reach, like ``argmin``, which numpy runs column by
        column along axis 0; the ``where``/``min`` form stays vectorised along the columns.
        """
        f, theta = self.f, s.shape[0]
        beta = theta - 2 * f
        med = (s[(theta - 1) // 2] + s[theta // 2]) / 2
        reach = np.maximum(med - s[: 2 * f + 1], s[beta - 1 :] - med)
        j = np.arange(2 * f + 1)[:, None]
        return np.where(reach == reach.min(axis=0), j, 2 * f + 1).min(axis=0)


# Where the averaged run of sorted values starts: one position for all columns, or per column (Bulyan).
Start = int | NearMedian


def sorted_positions_read(n: int, start: Start, size: int) -> tuple[int, ...]:
    """The sorted positions the compiled kernel reads: a run's two ends and their outer
    neighbours (tie check); all of them for Bulyan, whose run start depends on the values."""
    if isinstance(start, NearMedian):
        return tuple(range(n))
    ends = {start - 1, start, start + size - 1, start + size}
    return tuple(sorted(p for p in ends if 0 <= p < n))


def native_window(xn: np.ndarray, rows: np.ndarray, cols: slice, start: Start, size: int,
                  values: np.ndarray, block_fn: BlockFn) -> np.ndarray:
    """:func:`sorted_window` of ``xn[rows, cols]`` by the compiled kernel; writes ``values[cols]``.

    Same results: the kernel flags the same unclear columns (a non-finite value, or a run end
    tied with the value just outside the run), which the torch code redoes. Returns the counts.
    """
    n, c = len(rows), cols.stop - cols.start
    bulyan_f = start.f if isinstance(start, NearMedian) else -1
    first = 0 if bulyan_f >= 0 else start
    keep = sorted_positions_read(n, start, size)
    kernel, net = _native.kernel(xn.dtype, n, keep), _native.network(n, keep)
    unclear = np.empty(c, dtype=np.uint8)
    counts = np.zeros(n, dtype=np.int64)
    out = values[cols]
    ptr = lambda a: a.ctypes.data  # noqa: E731
    base = xn[:, cols.start :]  # a view: its data pointer is column cols.start of row 0
    ld = xn.strides[0] // xn.itemsize
    status = kernel(ptr(base), ld, ptr(rows), n, c, ptr(net), len(net), first, size, bulyan_f,
                    ptr(out), ptr(unclear), ptr(counts))
    if status == 1:
        raise MemoryError("coordinate-wise kernel: out of memory for its working buffers")
    if status:
        raise RuntimeError(f"coordinate-wise kernel: built for another n (status {status})")
    redo = np.flatnonzero(unclear)
    if redo.size:  # gather only those columns
        v, u = block_fn(torch.from_numpy(xn[np.ix_(rows, cols.start + redo)]))
        out[redo] = v.numpy()
        counts += u.numpy()
    return counts


_AGREES: dict[tuple, bool] = {}


def native_agrees(dtype: np.dtype, n: int, start: Start, size: int, block_fn: BlockFn) -> bool:
    """Whether this machine's build of the compiled kernel gives the numpy kernel's results on a
    probe (tied integers and plain floats, a tile remainder), checked once per build and window.

    The kernel is compiled here, by whatever C compiler the machine has, with ``-O3 -march=native``;
    one build of an earlier version of it summed wrongly once vectorised. A build that disagrees is
    not used (one warning), so a compiler's surprise costs speed, never a wrong aggregate."""
    key = (np.dtype(dtype).str, n, start, size)
    if key not in _AGREES:
        rng = np.random.default_rng(n)
        probe = np.concatenate([rng.integers(-2, 3, size=(n, 21)), rng.standard_normal((n, 16))], axis=1)
        probe = np.ascontiguousarray(probe.astype(dtype))
        want, want_counts = sorted_window(probe, start, size, block_fn)
        got = np.empty(probe.shape[1], dtype=probe.dtype)
        counts = native_window(probe, np.arange(n, dtype=np.int64), slice(0, probe.shape[1]), start, size, got, block_fn)
        ok = bool(np.allclose(got, want, rtol=1e-5, atol=1e-6) and np.array_equal(counts, want_counts))
        if not ok:
            _native.log.warning("fedsafe: the compiled coordinate-wise kernel disagrees with numpy on this machine "
                                "(n=%d); using numpy", n)
        _AGREES[key] = ok
    return _AGREES[key]


def sorted_window(xb: np.ndarray, start: Start, size: int, block_fn: BlockFn):
    """CPU kernel: per column of ``xb`` (n, c), mean of sorted positions ``[start, start + size)``.

    Returns the values (c,) and, per row, in how many columns its value lies in that run. Equals
    ``block_fn`` (the torch version, used on GPUs), but numpy sorts the rows of the contiguous
    transposed block 10-30x faster than torch sorts along dim 0, and membership comes from comparing
    with the run's end values (``lo <= x <= hi``) instead of an argsort. That comparison is the
    sort's own choice unless an end value ties with a value just outside the run (then it depends on
    how the sort orders equal values) or the column is not finite; such columns are redone by
    ``block_fn``, so every result is the torch one.
    """
    n, c = xb.shape
    # Copy the rows first: a transposing read of the strided block straight from memory was 4x
    # slower than a row copy (streaming) plus a transpose in cache. The copy also serves the counts.
    xb = np.ascontiguousarray(xb)
    s = np.ascontiguousarray(xb.T)
    s.sort(axis=1)
    if isinstance(start, int):  # one run for all columns: slices of the sorted (c, n) rows

        def at(pos):  # sorted value number pos of every column (clipped: callers mask those)
            return s[:, min(max(pos, 0), n - 1)]

        first = start
        values = s[:, first : first + size].mean(axis=1)
    else:  # per-column runs: numpy vectorises along columns, so the sorted rows go back to (n, c)
        s = np.ascontiguousarray(s.T)
        cols = np.arange(c)

        def at(pos):
            return s[np.clip(pos, 0, n - 1), cols]

        first = start(s)
        rank = np.arange(n)[:, None]
        values = np.where((rank >= first) & (rank < first + size), s, 0).sum(axis=0) / size
    lo, hi = at(first), at(first + size - 1)
    unclear = ~(np.isfinite(at(0)) & np.isfinite(at(n - 1)))
    unclear |= (first > 0) & ~(at(first - 1) < lo)
    unclear |= (first + size < n) & ~(hi < at(first + size))
    lo = np.where(unclear, np.nan, lo)  # NaN equals nothing: unclear columns are counted below
    counts = count_rows(xb == lo if size == 1 else (xb >= lo) & (xb <= hi))
    redo = np.flatnonzero(unclear)
    if redo.size:
        v, u = block_fn(torch.from_numpy(xb[:, redo]))
        values[redo] = v.numpy()
        counts += u.numpy()
    return values, counts


def coordinatewise(
    x: torch.Tensor,
    chunk: int | None,
    block_fn: BlockFn,
    window: tuple[Start, int] | None = None,
    rows: torch.Tensor | None = None,
):
    """Apply ``block_fn(block) -> (values (c,), per-row use counts)`` over blocks of ``x[rows]``.

    ``window = (start, size)`` says ``block_fn`` is the mean of a run of sorted values; CPU float
    tensors then take :func:`sorted_window` on all cores. Returns the values (d,) and the counts.
    """
    d = x.shape[1]
    n = x.shape[0] if rows is None else len(rows)
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    width = block_columns(n, chunk, device=x.device)
    if window is not None and numpy_kernels(x):
        xn, on = x.detach().numpy(), out.numpy()
        keep = sorted_positions_read(n, *window)
        if (xn.strides[1] == xn.itemsize and _native.kernel(xn.dtype, n, keep) is not None
                and native_agrees(xn.dtype, n, *window, block_fn)):
            picked = np.arange(n) if rows is None else rows.cpu().numpy()
            picked = np.ascontiguousarray(picked, dtype=np.int64)

            def native(cols: slice) -> np.ndarray:
                return native_window(xn, picked, cols, *window, on, block_fn)

            return out, torch.from_numpy(sum(map_blocks(d, width, native)))
        pick = slice(None) if rows is None else rows.cpu().numpy()

        def work(cols: slice) -> np.ndarray:
            values, used = sorted_window(xn[pick, cols], *window, block_fn)
            on[cols] = values
            return used

        return out, torch.from_numpy(sum(map_blocks(d, width, work)))
    counts = torch.zeros(n, dtype=torch.int64, device=x.device)
    for cols in column_slices(d, width):
        values, used = block_fn(x[:, cols] if rows is None else x[:, cols][rows])
        out[cols] = values
        counts += used
    return out, counts


def median_block(blk: torch.Tensor, lower: bool = False):
    """Column medians of ``blk`` and how often each row supplied a middle value (torch version).

    One sort per block: as fast as ``kthvalue`` and gives both middle values.
    """
    n = blk.shape[0]
    values, order = blk.sort(dim=0)
    lo = (n - 1) // 2
    hi = lo if lower else n // 2
    used = torch.bincount(order[lo : hi + 1].flatten(), minlength=n)
    # (v + v) / 2 would overflow to inf for |v| > max / 2, so one middle value is returned as is.
    return (values[lo] + values[hi]) / 2 if hi > lo else values[lo], used


def trimmed_block(blk: torch.Tensor, k: int):
    """Column means of the sorted values ``[k, n - k)`` and how often each row was kept (torch).

    Sorting (rather than subtracting the extremes from the total) stays exact when an attacker
    sends huge values.
    """
    n = blk.shape[0]
    values, order = blk.sort(dim=0)
    kept = order[k : n - k]
    return values[k : n - k].mean(dim=0), torch.bincount(kept.flatten(), minlength=n)


@register("median")
def median(x, w, *, state=None, chunk=None) -> AggResult:
    """Coordinate-wise median (Yin et al., ICML 2018).

    ``aggregate_j = median_i u_ij``; for even ``n`` the mean of the two middle values (NumPy /
    Flower ``FedMedian`` semantics). Unweighted. See ``median_paper`` for the lower median.

    Notes
    -----
    ``client_weights_i`` = fraction of coordinates where client i gave a middle value
    (they sum to 1 for odd ``n`` and to about 2 for even ``n``).
    """
    n = x.shape[0]
    agg, used = coordinatewise(x, chunk, median_block, ((n - 1) // 2, 2 - n % 2))
    return AggResult(agg, fraction_used(used, x.shape[1], x), {"even_n": "mean_of_middle_two"})


@register("median_paper")
def median_paper(x, w, *, state=None, chunk=None) -> AggResult:
    """Coordinate-wise median as in the paper's code: ``torch.median`` semantics.

    For even ``n`` ``torch.median`` returns the *lower* of the two middle values; for odd ``n``
    this equals ``median``. Unweighted.
    """
    window = ((x.shape[0] - 1) // 2, 1)
    agg, used = coordinatewise(x, chunk, lambda blk: median_block(blk, lower=True), window)
    return AggResult(agg, fraction_used(used, x.shape[1], x), {"even_n": "lower_middle"})


def trim_count(n: int, p: dict) -> int:
    """Values trimmed per side: ``k`` if given, else ``floor(beta * n)`` (>= 1 if beta > 0)."""
    if p["k"] is not None:
        return p["k"]
    k = math.floor(p["beta"] * n)
    # A positive beta should never silently degrade to the plain mean (e.g. beta=0.1, n=3).
    return max(k, 1) if p["beta"] > 0 and n >= 3 else k


def _trimmed_bounds(n: int, p: dict) -> None:
    name = "trimmed_mean"
    require(p["k"] is None or p["beta"] is None, name, "give either 'beta' or 'k', not both")
    if p["k"] is None and p["beta"] is None:
        # beta and k are exclusive, so the default is filled here rather than in Param.
        p["beta"] = 0.1
    if p["k"] is None:
        require(0 <= p["beta"] < 0.5, name, f"needs 0 <= beta < 0.5 (got beta={p['beta']})")
    k = trim_count(n, p)
    require(k >= 0, name, f"needs k >= 0 (got k={k})")
    require(2 * k < n, name, f"needs 2k < n, i.e. at least one value left (got k={k}, n={n})")


@register(
    "trimmed_mean",
    params={"beta": Param(None, float), "k": Param(None, int)},
    bounds=_trimmed_bounds,
)
def trimmed_mean(x, w, *, state=None, chunk=None, beta=None, k=None) -> AggResult:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018).

    Per coordinate, drop the ``k`` largest and ``k`` smallest values and average the rest:
    ``aggregate_j = mean(sorted(u_.j)[k : n-k])``. Unweighted.

    Parameters
    ----------
    beta : float, default 0.1
        Fraction trimmed per side, ``k = floor(beta * n)`` as in Flower's ``FedTrimmedAvg``;
        but when ``beta > 0`` and ``n >= 3``, ``k`` is at least 1 so the rule always trims.
    k : int, optional
        Values trimmed per side (instead of ``beta``). Requires ``2k < n``.

    Notes
    -----
    ``client_weights_i`` = fraction of coordinates where client i's value was kept.
    """
    kk = trim_count(x.shape[0], {"beta": beta, "k": k})
    return _trimmed(x, chunk, kk)


def _trimmed(x: torch.Tensor, chunk: int | None, k: int) -> AggResult:
    n, d = x.shape
    if k == 0:  # nothing trimmed: the plain mean, every value used
        return AggResult(x.mean(dim=0), torch.ones(n, dtype=x.dtype, device=x.device), {"k": 0})
    agg, used = coordinatewise(x, chunk, lambda blk: trimmed_block(blk, k), (k, n - 2 * k))
    return AggResult(agg, fraction_used(used, d, x), {"k": k})


def _paper_trim_bounds(n: int, p: dict) -> None:
    require(n >= 3, "trimmed_mean_paper", f"trims 1 value per side, so needs n >= 3 (got n={n})")


@register("trimmed_mean_paper", bounds=_paper_trim_bounds)
def trimmed_mean_paper(x, w, *, state=None, chunk=None) -> AggResult:
    """Trimmed mean as in the paper's code: ``k = 1`` per side, hard-coded.

    With the paper's 3 sampled clients this is exactly the coordinate-wise median.
    """
    return _trimmed(x, chunk, 1)
