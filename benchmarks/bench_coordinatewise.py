"""Coordinate-wise rules on CPU: the compiled kernel against the numpy one and one pass.

Not a test. Targets (issue 19, item 3), at n = 100 clients and d = 16.8M: median, median_paper,
trimmed_mean, trimmed_mean_paper and Bulyan's coordinate-wise stage within 4x of one pass over
the data (the faster of ``x.sum(0)`` and ``ones(n) @ x``, as in ``bench_aggregators.py``);
residual within 30x. Each rule is timed with the compiled kernel (``_select.c``) and with the
numpy kernel it replaces, in the same process against the same baseline, so the ratios stay
comparable on a machine shared with other work; the 1-minute load average is printed with each.

Bulyan's stage is timed alone (its Krum selection is a Gram-matrix cost, measured by
``bench_aggregators.py``): the first ``theta = n - 2f`` rows, f = 20% of n as there.
Residual does O(n^2) work per coordinate (O(n^2) compares, few divisions), so it is timed on
the first ``--residual-d`` columns and scaled by d (per-coordinate work is independent).

Usage::

    PYTHONPATH=src python benchmarks/bench_coordinatewise.py                 # n=100, d=16.8M
    PYTHONPATH=src python benchmarks/bench_coordinatewise.py --d 2097152     # quicker
    PYTHONPATH=src python benchmarks/bench_coordinatewise.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch

from bench_aggregators import D_LORA, assumed_attackers, make_updates, timed
from fedsafe.aggregators import REGISTRY, _native
from fedsafe.aggregators.coordinatewise import NearMedian, coordinatewise
from fedsafe.aggregators.krum import bulyan_block

TARGETS = {"residual": 30.0}
DEFAULT_TARGET = 4.0
RULES = ["median", "median_paper", "trimmed_mean", "trimmed_mean_paper", "bulyan_stage", "residual"]


@contextlib.contextmanager
def numpy_kernels_only() -> Iterator[None]:
    """Run the rules as before the compiled kernel: numpy sorts (same results, tested)."""
    saved = _native.kernel, _native.slope_kernel, _native.residual_kernel
    _native.kernel = lambda *a: None
    _native.slope_kernel = lambda *a: (None, None)
    _native.residual_kernel = lambda *a: None
    try:
        yield
    finally:
        _native.kernel, _native.slope_kernel, _native.residual_kernel = saved


def rule_call(name: str, x: torch.Tensor) -> Callable[[], object]:
    n = x.shape[0]
    if name == "bulyan_stage":
        f = assumed_attackers("bulyan", n)
        theta = n - 2 * f
        rows = torch.arange(theta)
        window = (NearMedian(f), theta - 2 * f)
        return lambda: coordinatewise(x, None, lambda blk: bulyan_block(blk, f), window, rows=rows)
    params = {"client_ids": list(range(n)), "round": 1}
    return lambda: REGISTRY[name](x, None, state=None, **params)


def measure(name: str, x: torch.Tensor, residual_d: int, repeat: int) -> dict:
    d = x.shape[1]
    sub = x[:, :residual_d] if name == "residual" and residual_d < d else x
    row: dict = {"rule": name, "timed_d": sub.shape[1]}
    for kind in ("compiled", "numpy"):
        with contextlib.nullcontext() if kind == "compiled" else numpy_kernels_only():
            seconds = timed(rule_call(name, sub), x.device, repeat, warmup=False)
        row[kind] = seconds * d / sub.shape[1]
        row[f"load_{kind}"] = os.getloadavg()[0]
    return row


def render(result: dict) -> list[str]:
    m, base = result["meta"], result["pass_seconds"]
    lines = [
        f"n = {m['n']}, d = {m['d']:,}, fp32, {m['threads']} threads; one pass = {base:.3f} s "
        f"(faster of `x.sum(0)` and `ones(n) @ x`). Each time is the best of {m['repeat']} runs "
        "(1 if over 10 s); the load is the 1-min load average right after the row's run "
        f"({m['cpus']} CPUs; this benchmark adds up to {m['threads']}).",
        "",
        "| rule | compiled s | ratio | numpy kernel s | ratio | target | met? | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        target = TARGETS.get(r["rule"], DEFAULT_TARGET)
        ratio, old = r["compiled"] / base, r["numpy"] / base
        scaled = f" (timed on d = {r['timed_d']:,}, scaled)" if r["timed_d"] < m["d"] else ""
        lines.append(
            f"| {r['rule']}{scaled} | {r['compiled']:.3f} | {ratio:.1f} | {r['numpy']:.3f} | {old:.1f} "
            f"| {target:.0f}x | {'yes' if ratio <= target else '**no**'} "
            f"| {r['load_compiled']:.1f} / {r['load_numpy']:.1f} |"
        )
    return lines + ["", *NOTES, ""]


# What limits the figures (measured 2026-11-30 on this 2-core AVX2 machine; see _select.c).
NOTES = [
    "Where the compiled kernel's time goes (one core, n = 100, `perf`): the sorting network ~45% (911 "
    "comparators for a median, 900 for a trimmed mean's four run ends, ~0.5 ns per value: close to "
    "this CPU's throughput of 2 SIMD min/max per cycle), reading the rows into L2-sized panels ~30% (one "
    "pass's worth of memory traffic; prefetching or copying the next panel during the sort measured "
    "slower), counting and summing the runs ~25%. About 1 ns per value on one core against ~0.2 for "
    "a pass: 4-5 passes on 2 cores shared with other work. Below 4x would take fewer comparators "
    "(Knuth's merge-exchange form of the same network has 1-2% fewer at n = 100), a GPU, or an "
    "approximate median.",
    "",
    "Residual (since 2026-11-30 the whole rule is compiled, `_residual.c`; its numpy column is the "
    "torch code with the compiled slope networks it replaces): the repeated median stays exact but "
    "divides few pairs. Float32 rounding is monotone, so whether a pair's slope is <= t is decided "
    "by comparing its difference with a bound per index distance; counting each row's slopes under "
    "two thresholds tells whether its median lies below, between or above them, the thresholds "
    "narrow on the remaining rows by interpolation, and the last ~7 rows have their slopes divided "
    "and selected. At n = 100 on one core ~3.05 us per coordinate (the kernel alone, re-timed idle on "
    "2026-11-30 19:00): the first counting pass over all n(n-1)/2 pairs ~0.6 us, counting the ~65 "
    "rows still in doubt ~0.8 us, the exact rows ~0.3 us, choosing thresholds, tables and candidates "
    "~0.7 us, the stable sort with ranks and the rest of the rule ~0.6 us (that split measured with "
    "`perf` in session 24). The whole d = 16.8M timed once, not scaled (2 threads, idle, 2026-11-30 "
    "19:03): 33.0 s, 67x this table's pass, so the scaled row above is ~10% optimistic.",
    "",
    "Why 30x stays out of reach for this exact algorithm on this CPU: 30x an idle pass (0.49 s) is "
    "14.8 s for d = 16.8M, ~1.6 us per coordinate per core at the 1.8x two cores give here. The "
    "algorithm's floor is the sort with ranks plus one counting pass over all pairs, ~1.2 us, which "
    "leaves ~0.4 us to place the answer among row medians that crowd around it (~13 of 100 rows "
    "within ±1%, 47 within ±5%, on Gaussian columns) when no cheap statistic of the sorted column "
    "places it closely: the kernel's first estimate, the slope between the 20th and 80th sorted "
    "values, puts the answer between 0.97x and 1.14x of itself (5-95%, 3,000 Gaussian columns), and "
    "a least-squares fit on nine such slopes only narrows that to ±5% (±10% on mixtures with a "
    "shifted fifth; measured 2026-11-30 in numpy, not in the kernel). The O(n log n) formulation "
    "(row i's slopes under t are inversions of u_j = s_j - t j "
    "around i: a sort and a Fenwick tree per threshold) takes ~n log2 n = 700 dependent, branching "
    "scalar steps per threshold at n = 100 against 4,950 / 8 = 620 branch-free 8-wide compares for "
    "the SIMD count, which also counts two thresholds at once (an estimate from operation counts, "
    "not measured); it pays only for n in the thousands, and it would need its own exact handling of "
    "float32 rounding near ties, which the bound tables give the SIMD count. What would reach 30x: "
    "a GPU, or an approximate repeated median (not the paper's rule).",
    "",
    "The numpy kernel's ratio varies with the load much more than the compiled one's: 9-12x in the "
    "2026-11-26 run of bench_aggregators.py (median 12.1x, median_paper 9.4x, trimmed means 11.4-12.0x, "
    "load 2.8-3.9), 15-28x in the 2026-11-30 12:52 run (load 0.9-1.9), 9-21x in this one.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="clients (default 100)")
    ap.add_argument("--d", type=int, default=D_LORA, help="coordinates (default 16,777,216)")
    ap.add_argument("--residual-d", type=int, default=262_144, help="columns residual is timed on")
    ap.add_argument("--rules", default=",".join(RULES), help=f"subset of {','.join(RULES)}")
    ap.add_argument("--repeat", type=int, default=2, help="runs per timing, best kept")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    rules = args.rules.split(",")
    if any(r not in RULES for r in rules) or args.n < 7 or args.d < 1:
        ap.error(f"rules must be among {RULES}; n >= 7 (Bulyan's stage) and d >= 1")
    if _native.kernel("float32", args.n, tuple(range(args.n))) is None:
        ap.error("no compiled kernel (no C compiler, or FEDSAFE_NATIVE=0): nothing to compare")

    x = make_updates(args.n, args.d, torch.device("cpu"))
    ones = torch.ones(args.n)
    base = min(timed(lambda: x.sum(dim=0), x.device, args.repeat, False),
               timed(lambda: ones @ x, x.device, args.repeat, False))  # fmt: skip
    meta = {"n": args.n, "d": args.d, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "repeat": args.repeat, "loadavg_start": os.getloadavg()[0]}  # fmt: skip
    print(f"pass {base:.3f} s, load {meta['loadavg_start']:.1f}", flush=True)
    rows = []
    for name in rules:
        rows.append(measure(name, x, args.residual_d, args.repeat))
        r = rows[-1]
        print(f"{name:<20} compiled {r['compiled']:9.3f} s ({r['compiled'] / base:6.1f}x)  numpy "
              f"{r['numpy']:9.3f} s ({r['numpy'] / base:6.1f}x)  load {r['load_numpy']:.1f}", flush=True)  # fmt: skip
    meta["loadavg_end"] = os.getloadavg()[0]
    # "machine" (with the date) is what run_all.py --merge records for the section.
    result = {"meta": meta, "pass_seconds": base, "rows": rows, "machine": {"date": time.strftime("%Y-%m-%d %H:%M")}}
    print("\n".join(render(result)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
