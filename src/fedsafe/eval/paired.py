"""Paired statistics for two scenarios judged on the *same* prompts.

Every scenario of a demo or sweep is evaluated on the same held-out prompts, so two scenarios are
compared prompt by prompt, not by their separate Wilson intervals (which overlap long after a paired
test sees the difference). For binary verdicts (refused / not refused) the pairs form a 2x2 table::

                 B refused   B not
    A refused        a         b        b, c: the discordant pairs, the only ones that carry
    A not            c         d              information about a difference

* :func:`mcnemar_exact` -- two-sided exact McNemar test: under H0 the b + c discordant pairs split
  Binomial(b + c, 1/2); p = min(1, 2 P[X <= min(b, c)]).
* :func:`newcombe_paired_ci` -- 95% interval for the paired difference of proportions
  p_A - p_B = (b - c) / n by Newcombe's method 10 (Newcombe 1998, Stat. Med. 17:2635-2650, "hybrid
  score" interval without continuity correction; recommended by Fagerland, Lydersen & Laake 2014,
  Stat. Methods Med. Res.): it combines the two Wilson intervals with the observed phi correlation.
* :func:`paired_bootstrap` -- percentile interval of the difference from resampling prompts (the
  pairs) with replacement, seeded so the report is reproducible.
* :func:`seed_test` -- across seeds, a test on the per-seed differences: the paired t-test and an
  exact sign-flip permutation test (which needs no normality; with k seeds its smallest p is 2/2^k).
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

from .stats import wilson


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` (A only) and ``c`` (B only).

    >>> round(mcnemar_exact(10, 2), 4), round(mcnemar_exact(11, 1), 5)
    (0.0386, 0.00635)
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # exact integer arithmetic: no rounding until the final division
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def newcombe_paired_ci(a: int, b: int, c: int, d: int, z: float = 1.96) -> tuple[float, float]:
    """Newcombe (1998) method 10 interval for p_A - p_B from a paired 2x2 table (counts a, b, c, d).

    p_A = (a + b) / n, p_B = (a + c) / n, each with its Wilson interval (l, u); phi is the table's
    correlation (adjusted, below), set to 0 when a margin is empty. Then
    ``L = D - sqrt((pA - lA)^2 - 2 phi (pA - lA)(uB - pB) + (uB - pB)^2)`` and
    ``U = D + sqrt((uA - pA)^2 - 2 phi (uA - pA)(pB - lB) + (pB - lB)^2)``.
    """
    if min(a, b, c, d) < 0:
        raise ValueError("counts must be >= 0")
    n = a + b + c + d
    if n == 0:
        return -1.0, 1.0
    pa, pb = (a + b) / n, (a + c) / n
    la, ua = wilson(a + b, n, z)
    lb, ub = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    cross = a * d - b * c
    # Newcombe's phi with his continuity adjustment: a positive cross product is reduced by n/2 (and
    # floored at 0), a negative one is kept -- as in Altman et al. (2000) "Statistics with confidence"
    # p. 52 and Fagerland, Lydersen & Laake's contingencytables::Newcombe_square_and_add_CI_paired_2x2
    if cross > n / 2:
        cross -= n / 2
    elif cross >= 0:
        cross = 0
    phi = cross / math.sqrt(margins) if margins else 0.0
    diff = pa - pb
    dl = (pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2
    du = (ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2
    return max(-1.0, diff - math.sqrt(max(dl, 0.0))), min(1.0, diff + math.sqrt(max(du, 0.0)))


def paired_bootstrap(x: Sequence[int], y: Sequence[int], *, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of mean(x) - mean(y), resampling the *pairs* (prompts) with replacement."""
    import numpy as np

    if len(x) != len(y):
        raise ValueError("paired samples must have the same length")
    if not len(x):
        return -1.0, 1.0
    dif = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(dif), size=(reps, len(dif)))
    means = dif[idx].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with integer ``df`` (closed form, Abramowitz & Stegun 26.7.3-4).

    >>> round(t_two_sided_p(2.776445, 4), 4), round(t_two_sided_p(12.7062, 1), 4)
    (0.05, 0.05)
    """
    if df < 1:
        raise ValueError("df must be >= 1")
    if math.isinf(t):
        return 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd
        term, acc = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):  # cos^k theta * (2*4*...*(k-1)) / (1*3*...*k)
            term *= c * c * (k - 1) / k
            acc += term
        a = 2 / math.pi * (theta + s * acc)
    else:
        term, acc = 1.0, 1.0
        for k in range(2, df - 1, 2):  # cos^k theta * (1*3*...*(k-1)) / (2*4*...*k)
            term *= c * c * (k - 1) / k
            acc += term
        a = s * acc
    return min(1.0, max(0.0, 1.0 - a))


def seed_test(diffs: Sequence[float]) -> dict:
    """Across seeds: mean and sd of the per-seed differences, paired t-test and exact sign-flip test.

    ``p_t`` is None for fewer than 2 seeds or zero spread with a zero mean; ``p_signflip`` enumerates all
    2^k sign patterns (k <= 16), p = share of patterns whose |mean| reaches the observed one.
    """
    xs = [float(v) for v in diffs]
    k = len(xs)
    out: dict = {"k": k, "mean": None, "sd": None, "t": None, "p_t": None, "p_signflip": None}
    if not k:
        return out
    m = math.fsum(xs) / k
    out["mean"] = m
    if k > 1:
        sd = math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (k - 1))
        out["sd"] = sd
        if sd > 0:
            out["t"] = m / (sd / math.sqrt(k))
            out["p_t"] = t_two_sided_p(out["t"], k - 1)
        elif m != 0:
            out["t"], out["p_t"] = math.copysign(math.inf, m), 0.0
    if k <= 16:
        obs = abs(m) - 1e-12  # tolerance: a flip pattern that reproduces |mean| counts as reaching it
        hits = sum(abs(math.fsum(s * x for s, x in zip(signs, xs)) / k) >= obs
                   for signs in itertools.product((1, -1), repeat=k))
        out["p_signflip"] = hits / 2**k
    return out


def paired_summary(x: Sequence[int], y: Sequence[int], *, bootstrap_seed: int = 0, reps: int = 2000) -> dict:
    """Everything the report prints for one metric: both rates, difference, intervals, discordant, p."""
    if len(x) != len(y):
        raise ValueError("paired samples must have the same length")
    a = sum(1 for u, v in zip(x, y) if u and v)
    b = sum(1 for u, v in zip(x, y) if u and not v)
    c = sum(1 for u, v in zip(x, y) if v and not u)
    d = len(x) - a - b - c
    n = len(x)
    lo, hi = newcombe_paired_ci(a, b, c, d)
    blo, bhi = paired_bootstrap(x, y, reps=reps, seed=bootstrap_seed)
    return {
        "n": n, "rate_a": (a + b) / n if n else None, "rate_b": (a + c) / n if n else None,
        "diff": (b - c) / n if n else None, "ci_low": lo, "ci_high": hi, "ci_method": "Newcombe method 10",
        "bootstrap_ci": [blo, bhi], "bootstrap_reps": reps, "bootstrap_seed": bootstrap_seed,
        "both": a, "only_a": b, "only_b": c, "neither": d, "p_mcnemar": mcnemar_exact(b, c),
    }
