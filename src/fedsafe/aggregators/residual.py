"""Residual-based reweighting (Fu et al., 2019), as used by the paper's ``residual`` defense."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _native
from ._ops import block_columns, column_slices, combine, map_blocks, median_lastdim
from ._ops import median_of_sorted, numpy_kernels, one_thread
from .base import AggResult, Param, as_list, register, require


def _bounds(n: int, p: dict) -> None:
    rule = "residual"
    require(n >= 3, rule, f"fits a line through the client values, so needs n >= 3 (got n={n})")
    require(p["lam"] > 0, rule, f"needs lam > 0 (got {p['lam']})")
    require(p["thresh"] >= 0, rule, f"needs thresh >= 0 (got {p['thresh']})")


def numpy_slope_medians(a: np.ndarray) -> np.ndarray:
    """:func:`slope_medians` in numpy, in place: one (c, n, n) buffer, sorted rows."""
    n = a.shape[1]
    pos = np.arange(n, dtype=a.dtype)
    dx = pos[:, None] - pos[None, :]
    np.fill_diagonal(dx, 1)
    slopes = a[:, :, None] - a[:, None, :]
    slopes /= dx
    slopes.reshape(len(a), n * n)[:, :: n + 1] = np.inf  # self-slope sorts last, count skips it
    slopes.sort(axis=-1)
    return np.array(median_of_sorted(slopes, n - 1))


_AGREES: dict[tuple, bool] = {}


def _slopes_agree(dtype, n: int, kernel, net) -> bool:
    """Whether this machine's build of the slope kernel equals numpy on a probe (sorted rows with
    ties and without), once per build: a compiler's surprise costs speed, never a wrong result."""
    key = (np.dtype(dtype).str, n)
    if key not in _AGREES:
        rng = np.random.default_rng(n)
        probe = np.concatenate([rng.integers(-2, 3, size=(11, n)), rng.standard_normal((10, n))]).astype(dtype)
        probe = np.ascontiguousarray(np.sort(probe, axis=1))
        got = np.empty_like(probe)
        ok = (not kernel(probe.ctypes.data, len(probe), n, net.ctypes.data, len(net), got.ctypes.data)
              and np.array_equal(got, numpy_slope_medians(probe)))
        if not ok:
            _native.log.warning("fedsafe: the compiled slope kernel disagrees with numpy on this machine (n=%d); "
                                "using numpy", n)
        _AGREES[key] = bool(ok)
    return _AGREES[key]


def slope_medians(s: torch.Tensor) -> torch.Tensor:
    """``med_{j != i} (s_i - s_j) / (i - j)`` for every row ``i`` of ``s`` (c, n): (c, n).

    The ``O(n^2)`` core of the rule. On CPU the compiled kernel of ``_select.c`` runs it (the
    same divisions, then the median of each row's ``n - 1`` slopes by a sorting network over 8
    rows of ``s`` at once), else numpy (:func:`numpy_slope_medians`); the results are equal.
    """
    n = s.shape[1]
    if numpy_kernels(s):
        a = np.ascontiguousarray(s.detach().numpy())
        kernel, net = _native.slope_kernel(a.dtype, n)
        if kernel is None or not _slopes_agree(a.dtype, n, kernel, net):
            return torch.from_numpy(numpy_slope_medians(a))
        out = np.empty_like(a)
        if kernel(a.ctypes.data, len(a), n, net.ctypes.data, len(net), out.ctypes.data):
            raise MemoryError("residual: out of memory for the slope kernel's buffers")
        # The network orders NaN and infinities differently from a sort: numpy redoes such rows.
        odd = np.flatnonzero(~np.isfinite(a).all(axis=1))
        if odd.size:
            out[odd] = numpy_slope_medians(a[odd])
        return torch.from_numpy(out)
    pos = torch.arange(n, dtype=s.dtype)
    dx = pos[:, None] - pos[None, :]
    dx.fill_diagonal_(1)
    slopes = (s[:, :, None] - s[:, None, :]) / dx.to(s.device)
    slopes.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    return median_lastdim(slopes, count=n - 1)


def repeated_median_line(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Siegel's repeated-median fit of sorted values ``s`` (c, n) against positions 0..n-1.

    ``slope = med_i med_{j != i} (s_i - s_j) / (i - j)``,
    ``intercept = med(s) - slope * (n - 1) / 2``.
    """
    n = s.shape[1]
    slope = median_lastdim(slope_medians(s))
    return slope, median_lastdim(s) - slope * (n - 1) / 2


def leverage_root(rank: torch.Tensor, n: int) -> torch.Tensor:
    """``sqrt(1 - H_ii)`` of the hat matrix of the design ``[1, rank]``.

    Ranks are always a permutation of 0..n-1, so ``H_ii = 1/n + (r_i - rbar)^2 / S`` in closed
    form (``S = n (n^2 - 1) / 12``) instead of a batched matrix inverse.
    """
    centre, ss = (n - 1) / 2, n * (n * n - 1) / 12
    return (1 - 1 / n - (rank - centre) ** 2 / ss).clamp_min(0).sqrt()


def residual_block(blk: torch.Tensor, lam: float, thresh: float):
    """Per-coordinate IRLS reweighting of a ``(n, c)`` block.

    Returns the per-client confidence contribution ``sum_j reweight_ij * std_j`` (n,), the mask
    of values to replace (c, n) and ``line - y`` for them (c, n).
    """
    y = (blk.float() if blk.element_size() < 4 else blk).T  # (c, n): coordinates first
    c, n = y.shape
    s, order = y.sort(dim=1, stable=True)  # tied values take ranks in client order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=y.device).expand(c, n))
    rank = rank.to(y.dtype)
    slope, intercept = repeated_median_line(s)
    line = intercept[:, None] + slope[:, None] * rank
    resid = y - line
    # Robust scale: MAD over the n-1 largest |residuals| (the fit can zero the smallest one).
    scale = 1.4826 * (1 + 5 / (n - 1)) * median_lastdim(resid.abs(), skip=1) + 1e-7
    z = resid / scale[:, None] / leverage_root(rank, n)
    reweight = (lam * math.sqrt(2 / n) / z.abs()).clamp(max=1)  # Huber: min(1, K/|z|)
    std = reweight.std(dim=1)
    confidence = (reweight * std[:, None]).double().sum(dim=0)
    replace = reweight < thresh
    return confidence, replace, line - y


@functools.cache
def _tables(n: int, lam: float, thresh: float) -> tuple[np.ndarray, tuple]:
    """What the compiled kernel computes with: the leverage roots by rank (torch's own roundings)
    and the float32 constants of :func:`residual_block` (torch rounds a Python scalar to the
    tensor's float32 before using it)."""
    h = leverage_root(torch.arange(n, dtype=torch.float32), n).numpy()
    f32 = lambda v: float(np.float32(v))  # noqa: E731
    return h, (f32(1.4826 * (1 + 5 / (n - 1))), f32(1e-7), f32(lam * math.sqrt(2 / n)), f32(thresh))


def compiled_block(kernel, a: np.ndarray, start: int, stop: int, lam: float, thresh: float):
    """:func:`residual_block` of columns ``start:stop`` of the float32 matrix ``a`` (n, d) by the
    compiled kernel (``_residual.c``): the confidence contribution (n,) float64, the replaced
    counts (n,) and the replaced values as (clients, coordinates, line - y), plus the columns it
    left to the torch code (NaN, infinities, overflowing ranges, unsettled medians)."""
    n, c = a.shape[0], stop - start
    h, consts = _tables(n, lam, thresh)
    conf, replaced = np.zeros(n), np.zeros(n, dtype=np.int64)
    fix_at, fix_val = np.empty(n * c, dtype=np.int64), np.empty(n * c, dtype=np.float32)
    nfix, unclear = np.zeros(1, dtype=np.int64), np.zeros(c, dtype=np.uint8)
    base = a.ctypes.data + start * a.itemsize
    rc = kernel(base, a.strides[0] // a.itemsize, n, c, h.ctypes.data, *consts,
                conf.ctypes.data, replaced.ctypes.data, fix_at.ctypes.data, fix_val.ctypes.data,
                nfix.ctypes.data, unclear.ctypes.data)
    if rc:
        raise MemoryError("residual: out of memory for the compiled kernel's buffers")
    at = fix_at[: nfix[0]]
    fixes = (torch.from_numpy(at % n), torch.from_numpy(at // n + start), torch.from_numpy(fix_val[: nfix[0]]))
    return torch.from_numpy(conf), torch.from_numpy(replaced), fixes, np.flatnonzero(unclear) + start


_RULE_AGREES: dict[int, bool] = {}


def _probe(n: int) -> torch.Tensor:
    """Columns that exercise the compiled rule: Gaussian, heavy-tailed, tied, all equal, outliers."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 72, generator=gen)
    x[:, 8:16] = torch.randint(-2, 3, (n, 8), generator=gen).float()
    x[:, 16:24] = x[:, 16:24] ** 3
    x[:, 24:26] = 0.5
    x[: max(1, n // 5), 26:40] += 30
    x[:, 40:48] *= 1e-30
    return x


def _rule_agrees(kernel, n: int, lam: float, thresh: float) -> bool:
    """Whether this machine's build of the compiled rule equals the torch code on a probe, once
    per build (per n): a compiler's surprise costs speed, never a wrong result."""
    if n not in _RULE_AGREES:
        x = _probe(n)
        conf, replaced, fixes, unclear = compiled_block(kernel, x.numpy(), 0, x.shape[1], lam, thresh)
        settled = np.setdiff1d(np.arange(x.shape[1]), unclear)  # the torch code redoes the rest
        want_conf, replace, delta = residual_block(x[:, settled], lam, thresh)
        where = replace.nonzero()
        ok = (settled.size > x.shape[1] // 2 and torch.equal(replaced, replace.sum(dim=0))
              and torch.equal(fixes[0], where[:, 1])
              and torch.equal(fixes[1], torch.from_numpy(settled)[where[:, 0]])
              and torch.equal(fixes[2], delta[replace])
              and torch.allclose(conf, want_conf, rtol=1e-6, atol=1e-9))
        if not ok:
            _native.log.warning("fedsafe: the compiled residual kernel disagrees with torch on this machine "
                                "(n=%d); using the torch code", n)
        _RULE_AGREES[n] = bool(ok)
    return _RULE_AGREES[n]


def rule_kernel(x: torch.Tensor, lam: float, thresh: float):
    """The compiled whole-rule kernel if ``x`` can take it (CPU float32 with contiguous rows, a
    build that passed its probe), else None."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.stride(1) != 1:
        return None
    kernel = _native.residual_kernel(x.shape[0])
    if kernel is None or not _rule_agrees(kernel, x.shape[0], lam, thresh):
        return None
    return kernel


@register(
    "residual",
    params={"lam": Param(2.0, float), "thresh": Param(0.05, float)},
    bounds=_bounds,
)
def residual(x, w, *, state=None, chunk=None, lam=2.0, thresh=0.05) -> AggResult:
    """Residual-based reweighting (Fu, Xie, Li & Chen, arXiv:1912.11464, 2019), paper variant.

    Per coordinate ``j``: sort the client values, fit a repeated-median line against rank,
    take residuals ``e_ij``, robust scale ``tau_j = 1.4826 (1 + 5/(n-1)) MAD_j + 1e-7`` and
    leverage ``h_i = sqrt(1 - H_ii)``; ``reweight_ij = min(1, K / |e_ij / (tau_j h_i)|)`` with
    ``K = lam * sqrt(2/n)``. Values with ``reweight_ij < thresh`` are replaced by the line.
    Client confidence ``c_i = sum_j reweight_ij * std_i'(reweight_i'j)``, divided by its max
    and squared; the output is the ``c``-weighted mean of the (partly replaced) updates.

    Parameters
    ----------
    lam : float, default 2.0
        ``LAMBDA`` of the paper's code.
    thresh : float, default 0.05
        The paper's value (the original code defaults to 0.1).

    Notes
    -----
    Matches the paper's ``IRLS_aggregation_split_restricted`` except that coordinates are
    processed in column blocks (per-coordinate work is independent, so results agree) and
    all-zero confidences, where the original divides 0 by 0 (NaN), give equal weights. That
    always happens for the paper's ``n = 3``: there ``|e / h| <= 0.94 < K = 1.63``, so every
    reweight is 1, its spread 0, and the rule reduces to the plain mean.
    Tied client values take their ranks in client order (a stable sort).
    Cost is ``O(n^2 d)``. On CPU, float32 updates with contiguous rows go through a compiled
    kernel (``_residual.c``: the whole rule per coordinate, with an exact repeated median that
    counts slopes under thresholds instead of dividing and sorting them all); it fits the same
    lines and replaces the same values as the torch code (tested), and leaves columns with
    non-finite values to it. Sample counts are ignored.
    ``client_weights`` are the normalised confidences.
    """
    n, d = x.shape
    kernel = rule_kernel(x, lam, thresh)
    # The compiled kernel keeps nothing per column: longer blocks (2,048 columns) only save calls.
    width = block_columns(n, chunk, per_column=n * n if kernel is None else 512, device=x.device)
    a = x.detach().numpy() if kernel is not None else None

    def torch_block(cols, confidence, replaced, fixes) -> None:  # cols: slice or index array
        conf, replace, delta = residual_block(x[:, cols], lam, thresh)
        confidence += conf
        replaced += replace.sum(dim=0)
        where = replace.nonzero()
        if where.numel():
            coords = where[:, 0] + cols.start if isinstance(cols, slice) else torch.from_numpy(cols)[where[:, 0]]
            fixes.append((where[:, 1], coords, delta[replace]))

    def work(span: slice):  # blocks of one span in order, summed here to keep few small tensors
        confidence = torch.zeros(n, dtype=torch.float64, device=x.device)
        replaced = torch.zeros(n, dtype=torch.int64, device=x.device)
        fixes = []  # sparse (client, coordinate, line - y) for replaced values
        for cols in column_slices(span.stop - span.start, width):
            cols = slice(span.start + cols.start, span.start + cols.stop)
            if kernel is None:
                torch_block(cols, confidence, replaced, fixes)
                continue
            conf, count, fix, unclear = compiled_block(kernel, a, cols.start, cols.stop, lam, thresh)
            confidence.numpy().__iadd__(conf.numpy())  # numpy: no torch op (and thread team) here
            replaced.numpy().__iadd__(count.numpy())
            if fix[0].numel():
                fixes.append(fix)
            if unclear.size:  # columns the kernel left: non-finite values, unsettled medians
                torch_block(unclear, confidence, replaced, fixes)
        return confidence, replaced, fixes

    # CPU spans run on all cores (numpy and the compiled slopes release the GIL); GPU ones in
    # order. Each span's small torch ops run on one thread: joining torch's own threads for every
    # op on a (104, n) block, beside the spans' threads, made the rule 2x slower on 2 busy cores.
    # The compiled kernel's blocks are long already: spans of 8 share the work out finely.
    span = width * (64 if kernel is None else 8)
    if numpy_kernels(x):
        threads = torch.get_num_threads()
        with one_thread():
            parts = map_blocks(d, span, work, threads=threads)
    else:
        parts = map_blocks(d, span, work, threads=1)
    confidence = sum(p[0] for p in parts)
    replaced = sum(p[1] for p in parts)
    fixes = [fix for p in parts for fix in p[2]]
    top = confidence.max()
    coef = (confidence / top) ** 2 if top > 0 else torch.ones_like(confidence)
    coef = coef / coef.sum()
    agg = combine(x, coef)
    if fixes:  # one scatter for all blocks (in block order, as before)
        rows, idx, vals = (torch.cat(part) for part in zip(*fixes, strict=True))
        agg.index_add_(0, idx, (coef[rows] * vals.double()).to(agg.dtype))
    info = {"confidence": as_list(confidence), "replaced_fraction": as_list(replaced.double() / d)}
    return AggResult(agg, coef.to(x), info)
