"""Wilson intervals, safe-rate summaries and mean/std (fedsafe.eval.stats)."""

import math

import pytest

from fedsafe.eval.stats import mean_std, rate_summary, wilson


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        (0, 10, 0.0, 0.2775),  # textbook values (z = 1.96)
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (1, 1, 0.2065, 1.0),
        (260, 520, 0.4571, 0.5429),
    ],
)
def test_wilson_known_values(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_symmetry_and_bounds():
    for n in (1, 7, 50):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
            lo2, hi2 = wilson(n - k, n)
            assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)


def test_wilson_edge_cases():
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)
    with pytest.raises(ValueError):
        wilson(-1, 2)
    # wider z -> wider interval
    assert wilson(5, 10, z=2.576)[0] < wilson(5, 10)[0]


def test_rate_summary_excludes_unparsed_from_rate():
    s = rate_summary(["safe"] * 5 + ["unsafe"] * 5 + ["unparsed"] * 3 + ["n/a"])
    assert s["n"] == 14 and s["safe"] == 5 and s["unsafe"] == 5 and s["unparsed"] == 3 and s["na"] == 1
    assert s["rate"] == 0.5
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_rate_summary_no_decided_and_bad_label():
    s = rate_summary(["unparsed", "unparsed"])
    assert s["rate"] is None and s["ci_low"] is None and s["n"] == 2
    assert rate_summary([])["n"] == 0
    with pytest.raises(ValueError, match="unknown verdict label"):
        rate_summary(["SAFE"])


def test_mean_std():
    m, s = mean_std([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof=1
    assert mean_std([7.0]) == (7.0, 0.0)
    assert mean_std([]) == (None, None)
    assert mean_std([None, 2.0, None, 4.0]) == (3.0, pytest.approx(math.sqrt(2)))
