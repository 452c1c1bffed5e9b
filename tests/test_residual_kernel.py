"""The compiled residual rule (``_residual.c``) against the numpy and torch code it replaces.

Its repeated-median slope must equal numpy's (``numpy_slope_medians``, then the median) bit for
bit, so every fitted line, replaced value and replaced count is the same as the torch code's;
the confidences agree to rounding (the spread is summed in another order). Adversarial columns:
ties, duplicates, all equal, signed zeros, n = 3..130 odd and even, large, small and subnormal
magnitudes, slopes that tie after rounding; non-finite values and overflowing ranges are left
to the torch code.
"""

from __future__ import annotations

import ctypes
import logging

import numpy as np
import pytest
import torch

from fedsafe.aggregators import REGISTRY, _native, residual
from fedsafe.aggregators._ops import median_of_sorted

SIZES = [3, 4, 5, 6, 7, 8, 9, 10, 15, 16, 17, 31, 32, 33, 64, 99, 100, 101, 127, 128, 129, 130]

needs_compiler = pytest.mark.skipif(_native.residual_kernel(5) is None,
                                    reason="no C compiler: the torch code is used")


def adversarial(n: int, seed: int) -> np.ndarray:
    """(n, 26 * 4) float32 columns, 4 of each kind below."""
    rng = np.random.default_rng(seed)
    i = np.arange(n, dtype=np.float32)[:, None]
    kinds = [
        rng.standard_normal((n, 4)),
        rng.integers(-2, 3, (n, 4)),                              # ties everywhere
        rng.choice(np.float32([0.1, 0.2, 0.3, 1e-3, 7]), (n, 4)),  # duplicates
        np.full((n, 4), 0.5),                                      # all equal
        np.where(rng.random((n, 4)) < 0.5, -0.0, 0.0),             # signed zeros only
        rng.standard_normal((n, 4)) * 1e30,
        rng.standard_normal((n, 4)) * 1e-30,
        rng.standard_normal((n, 4)) * 1e-42,                       # subnormal float32
        rng.standard_t(1, (n, 4)),                                 # Cauchy: huge spread
        i * np.float32(0.1) + 0 * rng.random((n, 4)),              # one exact line: all slopes tie
        i * np.float32(1 / 3) + rng.integers(0, 2, (n, 4)) * np.float32(2 ** -20),  # near-ties
        np.float32(1 / 3) * rng.integers(0, 7, (n, 4)),            # slopes equal after rounding
        np.float32(3) ** rng.integers(-20, 20, (n, 4)),            # magnitudes across binades
        rng.standard_normal((n, 4)) + 1e4,                         # large offset, small spread
        np.where(rng.random((n, 4)) < 0.3, 100.0, rng.standard_normal((n, 4))),  # outliers
        np.where(i < max(1, n // 5), 30.0, 0.0) + rng.standard_normal((n, 4)),   # attackers
        rng.integers(0, 2, (n, 4)),                                # two values
        np.where(i == 0, 1.0, 0.0) + 0 * rng.random((n, 4)),       # one client differs
        rng.standard_normal((n, 4)).astype(np.float16),            # few distinct mantissas
        rng.exponential(1.0, (n, 4)),
        np.cumsum(rng.integers(0, 3, (n, 4)), axis=0),             # steps
        rng.standard_normal((n, 4)) * np.float32(2.0) ** 100,
        rng.standard_normal((n, 4)) * np.float32(2.0) ** -100,
        np.float32(3e38) * np.sign(rng.standard_normal((n, 4))) / 4,  # near the float32 limit
        rng.uniform(0, 1, (n, 4)),
        rng.permutation(np.arange(n))[:, None] + np.zeros((n, 4)),  # ranks themselves
    ]
    return np.ascontiguousarray(np.concatenate([k.astype(np.float32) for k in kinds], axis=1))


def numpy_repeated_median(s: np.ndarray) -> np.ndarray:
    """The slope as ``repeated_median_line`` computes it on CPU: numpy's slopes, then the median."""
    with np.errstate(all="ignore"):
        return np.array(median_of_sorted(np.sort(residual.numpy_slope_medians(s), axis=1), s.shape[1]))


def compiled_slopes(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lib = _native.residual_library(s.shape[1])
    out, unclear = np.empty(len(s), dtype=np.float32), np.zeros(len(s), dtype=np.uint8)
    assert lib.fs_rm_slope_f32(s.ctypes.data, s.shape[1], len(s), out.ctypes.data, unclear.ctypes.data) == 0
    return out, unclear.astype(bool)


@needs_compiler
@pytest.mark.parametrize("n", SIZES)
def test_repeated_median_equals_numpy_bit_for_bit(n):
    s = np.ascontiguousarray(np.sort(adversarial(n, seed=n).T, axis=1))
    got, unclear = compiled_slopes(s)
    want = numpy_repeated_median(s)
    # Every finite column settles (the torch code would redo the others), and equals numpy.
    assert not unclear.any(), np.flatnonzero(unclear)
    np.testing.assert_array_equal(got, want)


@needs_compiler
@pytest.mark.parametrize("n", [100, 101])
def test_repeated_median_equals_numpy_on_many_columns(n):
    # Hundreds of columns per shape walk the narrowing through its branches: brackets open on
    # one side that must step out, brackets that stop shrinking, thresholds from exact order
    # statistics of few candidates, exact rows with ranks at the window's ends (odd n).
    rng = np.random.default_rng(n)
    shapes = [rng.standard_normal((200, n)), rng.standard_t(2, (200, n)), rng.exponential(1.0, (200, n)),
              rng.uniform(-1, 1, (200, n)), rng.lognormal(0, 2, (200, n)),
              rng.standard_normal((200, n)) + np.where(rng.random((200, n)) < 0.2, 40.0, 0.0)]
    s = np.ascontiguousarray(np.sort(np.concatenate(shapes).astype(np.float32), axis=1))
    got, unclear = compiled_slopes(s)
    assert not unclear.any(), np.flatnonzero(unclear)
    np.testing.assert_array_equal(got, numpy_repeated_median(s))


def compiled_vs_torch(x: torch.Tensor, thresh: float):
    """The compiled block and the torch block on the columns the kernel settled."""
    kernel = _native.residual_kernel(x.shape[0])
    conf, count, fixes, unclear = residual.compiled_block(kernel, x.numpy(), 0, x.shape[1], 2.0, thresh)
    kept = np.setdiff1d(np.arange(x.shape[1]), unclear)
    want_conf, replace, delta = residual.residual_block(x[:, kept], 2.0, thresh)
    where = replace.nonzero()
    want = (where[:, 1], torch.from_numpy(kept)[where[:, 0]], delta[replace])
    return (conf, count, fixes, unclear), (want_conf, replace.sum(dim=0), want)


@needs_compiler
@pytest.mark.parametrize("n", SIZES)
def test_compiled_rule_fits_the_same_lines_as_the_torch_code(n):
    # thresh > 1 replaces every value (reweights are <= 1): line - y is compared everywhere.
    x = torch.from_numpy(adversarial(n, seed=100 + n))
    x = x[:, x.abs().amax(dim=0) < 1e37]  # ranges that overflow are left to torch (tested below)
    (conf, count, fixes, unclear), (want_conf, want_count, want) = compiled_vs_torch(x, thresh=2.0)
    assert unclear.size == 0
    assert torch.equal(count, want_count)
    for got, exp in zip(fixes, want, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    torch.testing.assert_close(conf, want_conf, rtol=1e-6, atol=1e-12)


@needs_compiler
@pytest.mark.parametrize("n", [5, 10, 33, 100, 101])
def test_compiled_rule_replaces_the_same_values(n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3000, generator=gen)
    x[: max(1, n // 5), ::3] += torch.linspace(1, 80, 1000)  # attackers, near and far
    (conf, count, fixes, unclear), (want_conf, want_count, want) = compiled_vs_torch(x, thresh=0.05)
    assert unclear.size == 0 and count.sum() > 0
    assert torch.equal(count, want_count)
    for got, exp in zip(fixes, want, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    torch.testing.assert_close(conf, want_conf, rtol=1e-6, atol=1e-12)


def call(x, **params):
    return REGISTRY["residual"](x, None, state={}, client_ids=list(range(x.shape[0])), round=0, **params)


@needs_compiler
def test_non_finite_and_overflowing_columns_are_left_to_the_torch_code(monkeypatch):
    x = torch.from_numpy(adversarial(12, seed=3))
    x[3, 5], x[0, 7], x[1, 9] = float("nan"), float("inf"), -float("inf")
    x[:, 11] = torch.tensor([3e38, -3e38] * 6)  # finite, but s_j - s_i overflows
    kernel = _native.residual_kernel(12)
    unclear = residual.compiled_block(kernel, x.numpy(), 0, x.shape[1], 2.0, 0.05)[3]
    assert {5, 7, 9, 11} <= set(unclear.tolist())
    with np.errstate(all="ignore"):
        fast = call(x, chunk=16)
        monkeypatch.setattr(_native, "residual_kernel", lambda n: None)
        slow = call(x, chunk=16)
    assert fast.info["replaced_fraction"] == slow.info["replaced_fraction"]
    torch.testing.assert_close(fast.aggregate, slow.aggregate, rtol=1e-6, atol=1e-6, equal_nan=True)


@needs_compiler
@pytest.mark.parametrize("n", [3, 10, 100])
def test_residual_rule_with_the_kernel_equals_the_torch_code(n, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 2000, generator=gen)
    x[:, :300] = torch.randint(-2, 3, (n, 300), generator=gen).float()
    x[0, 500:900] += 50
    fast = call(x, chunk=256)
    monkeypatch.setattr(_native, "residual_kernel", lambda n: None)
    slow = call(x, chunk=256)
    assert fast.info["replaced_fraction"] == slow.info["replaced_fraction"]
    np.testing.assert_allclose(fast.info["confidence"], slow.info["confidence"], rtol=1e-6)
    torch.testing.assert_close(fast.aggregate, slow.aggregate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.client_weights, slow.client_weights, rtol=1e-6, atol=1e-9)


def test_a_residual_build_that_disagrees_with_torch_is_not_used(monkeypatch, caplog):
    def wrong(base, ld, n, c, h, c0, eps, kk, thr, conf, replaced, fix_at, fix_val, nfix, unclear):
        ctypes.c_int64.from_address(nfix).value = 0  # claims: nothing replaced, all settled
        return 0

    monkeypatch.setattr(_native, "residual_kernel", lambda n: wrong)
    monkeypatch.setattr(residual, "_RULE_AGREES", {})
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 300, generator=gen)
    x[0] += 40
    with caplog.at_level(logging.WARNING):
        got = call(x)
    assert "disagrees" in caplog.text
    monkeypatch.setattr(_native, "residual_kernel", lambda n: None)
    want = call(x)
    torch.testing.assert_close(got.aggregate, want.aggregate, rtol=0, atol=0)
    assert got.info == want.info


def test_no_native_code_means_the_torch_code(monkeypatch):
    monkeypatch.setenv("FEDSAFE_NATIVE", "0")
    _native._cached_residual_library.cache_clear()
    try:
        assert _native.residual_kernel(10) is None
        x = torch.randn(10, 50)
        assert residual.rule_kernel(x, 2.0, 0.05) is None
    finally:
        _native._cached_residual_library.cache_clear()


def test_float64_and_strided_inputs_take_the_torch_code():
    x = torch.randn(10, 64, dtype=torch.float64)
    assert residual.rule_kernel(x, 2.0, 0.05) is None
    assert residual.rule_kernel(torch.randn(64, 10).T, 2.0, 0.05) is None
