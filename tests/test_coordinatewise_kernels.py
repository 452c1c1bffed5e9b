"""The compiled coordinate-wise kernel (``_select.c``) against the numpy kernel and the torch code.

All three must give the same aggregates (up to the order of the sums in trimmed means) and the
same per-client use counts, including exact ties, signed zeros, non-finite values, n = 1 and 2,
odd and even n, and widths that are not multiples of the kernel's tiles, panels or blocks.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import math

import numpy as np
import pytest
import torch

from fedsafe.aggregators import REGISTRY, _native, _ops, coordinatewise, residual

RULES = ["median", "median_paper", "trimmed_mean", "trimmed_mean_paper", "bulyan"]


def compiled() -> bool:
    return _native.kernel(np.float32, 3, (0, 1, 2)) is not None


needs_compiler = pytest.mark.skipif(not compiled(), reason="no C compiler: the numpy kernel is used")


def call(name, x, **params):
    params.setdefault("client_ids", list(range(x.shape[0])))
    params.setdefault("round", 0)
    return REGISTRY[name](x, None, state={}, **params)


def params_for(name: str, n: int) -> dict | None:
    """Parameters that make ``name`` feasible at ``n`` clients (None: it is not)."""
    if name == "trimmed_mean":
        return {"k": (n - 1) // 2} if n >= 3 else None  # the widest trim: one value kept
    if name == "trimmed_mean_paper":
        return {} if n >= 3 else None
    if name == "bulyan":
        return {"f": (n - 3) // 4} if n >= 3 else None
    return {}


def tied(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random values, a third of the columns drawn from 3 integers (ties at every run end)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    x[:, : d // 3] = torch.randint(-1, 2, (n, d // 3), generator=gen).to(dtype)
    x[:, d // 3 : d // 3 + 5] = 0.0
    x[::2, d // 3 : d // 3 + 5] = -0.0
    return x


class Spy:
    """Counts the blocks the compiled kernel handled."""

    def __init__(self, monkeypatch):
        self.blocks = 0
        real = coordinatewise.native_window

        def spy(*args, **kwargs):
            self.blocks += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(coordinatewise, "native_window", spy)


def three_ways(name, x, monkeypatch, **params):
    """(compiled, numpy, torch) results of one rule on ``x``."""
    spy = Spy(monkeypatch)
    fast = call(name, x, **params)
    assert spy.blocks > 0, "the compiled kernel was not used"
    with monkeypatch.context() as m:
        m.setattr(_native, "kernel", lambda *a: None)
        numpy_ = call(name, x, **params)
    with monkeypatch.context() as m:
        for module in (_ops, coordinatewise, residual):
            m.setattr(module, "numpy_kernels", lambda t: False)
        torch_ = call(name, x, **params)
    return fast, numpy_, torch_


def assert_same(a, b, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a.aggregate, b.aggregate, rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(a.client_weights, b.client_weights, rtol=0, atol=0)
    assert a.info == b.info


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 11, 16, 33])
@pytest.mark.parametrize("name", RULES)
def test_compiled_kernel_equals_numpy_and_torch(name, n, dtype, monkeypatch):
    params = params_for(name, n)
    if params is None:
        pytest.skip(f"{name} needs more than {n} clients")
    # 101 columns in blocks of 37: neither is a multiple of the kernel's 8- or 4-column tiles.
    x = tied(n, 101, seed=n, dtype=dtype)
    fast, numpy_, torch_ = three_ways(name, x, monkeypatch, chunk=37, **params)
    assert_same(fast, torch_, dtype)
    assert_same(fast, numpy_, dtype)


@needs_compiler
@pytest.mark.parametrize("name", RULES)
def test_compiled_kernel_across_panels_and_blocks(name, monkeypatch):
    # n = 7 float32: panels of 9,360 columns; 18,733 = 2 panels + a partial one of 13 columns.
    x = tied(7, 18_733, seed=3)
    fast, numpy_, torch_ = three_ways(name, x, monkeypatch, **params_for(name, 7))
    assert_same(fast, torch_, torch.float32)
    assert_same(fast, numpy_, torch.float32)


@needs_compiler
@pytest.mark.parametrize("name", RULES)
def test_compiled_kernel_with_non_finite_values(name, monkeypatch):
    x = tied(9, 200, seed=5)
    x[1, 150], x[2, 151], x[3, 152], x[:, 153] = math.nan, math.inf, -math.inf, math.inf
    x[0, 160:] *= 1e30  # huge values: sums must not overflow differently
    fast, _, torch_ = three_ways(name, x, monkeypatch, chunk=64, **params_for(name, 9))
    assert_same(fast, torch_, torch.float32)


@needs_compiler
@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_compiled_kernel_for_more_clients_than_unrolled(name, monkeypatch):
    n = _native.MAX_UNROLLED + 44  # the network is read from a table instead of compiled in
    x = tied(n, 45, seed=1)
    fast, _, torch_ = three_ways(name, x, monkeypatch, **params_for(name, n))
    assert_same(fast, torch_, torch.float32)


@pytest.mark.parametrize("n", list(range(1, 40)) + [64, 100, 129, 300])
def test_network_sorts_the_positions_it_keeps(n):
    rng = np.random.default_rng(n)
    if n <= 10:  # 0-1 principle: sorting every 0/1 input means sorting every input
        inputs = np.array(list(itertools.product([0, 1], repeat=n)))
    else:
        inputs = rng.integers(0, 4, (300, n))
    middle = (n - 1) // 2
    trims = {p for p in (0, 1, 2, n - 3, n - 2, n - 1) if 0 <= p < n}
    for keep in {
        tuple(range(n)),
        tuple(sorted({max(middle - 1, 0), middle, min(middle + 1, n - 1)})),
        tuple(sorted(trims)),
    }:
        lines = inputs.T.copy()  # (n, trials): each comparator acts on all trials at once
        for a, b in _native.network(n, keep):
            lines[a], lines[b] = np.minimum(lines[a], lines[b]), np.maximum(lines[a], lines[b])
        want = np.sort(inputs, axis=1).T
        np.testing.assert_array_equal(lines[list(keep)], want[list(keep)])


def test_without_a_compiler_the_numpy_kernel_serves(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path))  # no build cached there
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    _native._cached_library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert _native.kernel(np.float32, 5, (1, 2, 3)) is None
        assert "using numpy" in caplog.text
        x = tied(5, 50, seed=2)
        expected = torch.from_numpy(np.median(x.numpy(), axis=0))
        torch.testing.assert_close(call("median", x).aggregate, expected)
        monkeypatch.setenv("FEDSAFE_NATIVE", "0")
        _native._cached_library.cache_clear()
        assert _native.kernel(np.float32, 5, (1, 2, 3)) is None
    finally:
        _native._cached_library.cache_clear()  # later tests build (or find) the real kernels again


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 4, 5, 10, 33, 100])
def test_compiled_slope_medians_equal_numpy_bit_for_bit(n, dtype):
    gen = torch.Generator().manual_seed(n)
    s = torch.randn(43, n, generator=gen, dtype=dtype)  # 43 rows: not a multiple of 8 or 4
    s[:15] = torch.randint(-2, 3, (15, n), generator=gen).to(dtype)  # ties: equal slopes
    s[20, 1], s[21, 0] = math.nan, math.inf  # rows the network cannot order: numpy redoes them
    s = s.sort(dim=1).values
    with np.errstate(all="ignore"):  # inf - inf, as inside the rule (map_blocks)
        got = residual.slope_medians(s).numpy()
        want = residual.numpy_slope_medians(s.numpy())
    assert _native.slope_kernel(got.dtype, n)[0] is not None
    np.testing.assert_array_equal(got, want)


@needs_compiler
def test_residual_rule_is_unchanged_by_the_compiled_slopes(monkeypatch):
    # The torch code of the rule, with and without the compiled slopes (the whole-rule kernel,
    # tested in test_residual_kernel.py, is off in both).
    monkeypatch.setattr(_native, "residual_kernel", lambda n: None)
    x = tied(12, 300, seed=4)
    fast = call("residual", x, chunk=64)
    with monkeypatch.context() as m:
        m.setattr(_native, "slope_kernel", lambda *a: (None, None))
        slow = call("residual", x, chunk=64)
    torch.testing.assert_close(fast.aggregate, slow.aggregate, rtol=0, atol=0)
    torch.testing.assert_close(fast.client_weights, slow.client_weights, rtol=0, atol=0)
    assert fast.info == slow.info


def test_a_build_that_disagrees_with_numpy_is_not_used(monkeypatch, caplog):
    """A miscompiled kernel (here: one that reports every column clear and writes zeros) is caught by
    the once-per-build probe and the numpy kernel serves; the aggregate stays right."""

    def wrong(base, ld, rows, n, c, net, nnet, first, size, bulyan_f, out, unclear, counts):
        np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_float)), (c,))[:] = 0.0
        np.ctypeslib.as_array(ctypes.cast(unclear, ctypes.POINTER(ctypes.c_uint8)), (c,))[:] = 0
        return 0

    monkeypatch.setattr(_native, "kernel", lambda *a: wrong)
    monkeypatch.setattr(coordinatewise, "_AGREES", {})
    x = tied(7, 50, seed=5) + 1.0
    with caplog.at_level(logging.WARNING):
        got = call("median", x).aggregate
    assert "disagrees" in caplog.text
    torch.testing.assert_close(got, torch.from_numpy(np.median(x.numpy(), axis=0)))


def test_a_slope_build_that_disagrees_with_numpy_is_not_used(monkeypatch, caplog):
    def wrong(a, rows, n, net, nnet, out):
        return 0  # leaves ``out`` as it was: garbage

    monkeypatch.setattr(_native, "slope_kernel", lambda dtype, n: (wrong, np.zeros((1, 2), dtype=np.int32)))
    monkeypatch.setattr(residual, "_AGREES", {})
    s = torch.randn(9, 6, dtype=torch.float64).sort(dim=1).values
    with caplog.at_level(logging.WARNING):
        got = residual.slope_medians(s).numpy()
    assert "disagrees" in caplog.text
    np.testing.assert_array_equal(got, residual.numpy_slope_medians(s.numpy()))
