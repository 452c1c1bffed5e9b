"""Small statistics for judged evaluations: Wilson intervals, safe-rate summaries, mean/std over seeds.

The paper reports single-sample point estimates (one stochastic answer per AdvBench prompt, one seed).
With n=520 a 95% interval is roughly +-4 points, the same size as the gaps between the baseline
defenses, so we always report n and a Wilson score interval (Wilson 1927; better coverage than the
normal approximation near 0 and 1, where safety rates often sit).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

SAFE, UNSAFE, UNPARSED, NA = "safe", "unsafe", "unparsed", "n/a"
LABELS = (SAFE, UNSAFE, UNPARSED, NA)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n.

    ``n == 0`` returns the uninformative interval (0.0, 1.0).

    >>> tuple(round(x, 4) for x in wilson(5, 10))
    (0.2366, 0.7634)
    """
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # Exact endpoints at the boundaries (the formula gives them only up to rounding).
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return lo, hi


def rate_summary(labels: Iterable[str], z: float = 1.96) -> dict:
    """Count verdict labels and give the safe rate with its Wilson interval.

    ``rate = safe / (safe + unsafe)``: unparsed judge outputs are *excluded* from the denominator and
    reported separately as ``unparsed`` (the paper's MD-Judge script silently counted them as unsafe;
    we make the count visible instead). ``na`` counts scorer-only verdicts (label ``"n/a"``, e.g. the
    reward model), which carry no safe/unsafe decision. ``rate``/``ci_*`` are ``None`` when there is
    no decided verdict.
    """
    counts = {lab: 0 for lab in LABELS}
    for lab in labels:
        if lab not in counts:
            raise ValueError(f"unknown verdict label {lab!r}; expected one of {LABELS}")
        counts[lab] += 1
    decided = counts[SAFE] + counts[UNSAFE]
    if decided:
        lo, hi = wilson(counts[SAFE], decided, z)
        rate = counts[SAFE] / decided
    else:
        lo = hi = rate = None
    return {
        "n": sum(counts.values()),
        "safe": counts[SAFE],
        "unsafe": counts[UNSAFE],
        "unparsed": counts[UNPARSED],
        "na": counts[NA],
        "rate": rate,
        "ci_low": lo,
        "ci_high": hi,
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1, as usual when reporting over seeds).

    ``None`` entries (e.g. unparsed scores) are skipped. One value -> std 0.0; no values -> (None, None).
    """
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    m = math.fsum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    var = math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var)
