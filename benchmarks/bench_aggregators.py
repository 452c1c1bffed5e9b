"""Time every aggregation rule on random updates against the issue's one-operation baselines.

Not a test. Target (issue): for n = 100 clients and d = 16.8M (Llama-2-7B LoRA r=32 on q/v),
every rule within 3x of

* one ``(n x d) @ (d x n)`` matmul (``x @ x.T``) for the distance-based rules (Gram matrix),
* one pass over the data for the coordinate-wise and linear rules: the faster of ``x.sum(0)``
  and ``ones(n) @ x`` (torch's column sum was ~2x slower than MKL's GEMV; taking the faster
  keeps the baseline honest).

Timings are the best of 3 runs (2 at large sizes, 1 if a run takes over 10 s): on a shared
machine the slower runs measure the other processes. The load average at start and end is
recorded. The target size takes about 10-15 minutes on 2 busy cores, mostly data generation,
Bulyan and the residual rule.

Usage::

    PYTHONPATH=src python benchmarks/bench_aggregators.py             # the target: n=100, d=16.8M
    PYTHONPATH=src python benchmarks/bench_aggregators.py --quick     # n in {10, 50}, d = 1M
    PYTHONPATH=src python benchmarks/bench_aggregators.py --sizes 100x1048576 --rules median,krum
    PYTHONPATH=src python benchmarks/bench_aggregators.py --json out.json

Memory: one ``(n, d)`` fp32 matrix (6.7 GB at the target) plus per-rule working memory, which
is reported (``peak_extra_mb``); FoolsGold is timed without history (``state=None``), which
would add another copy. ``residual`` costs O(n^2) per coordinate, so above
``RESIDUAL_MAX_WORK`` it is timed on the first columns of the same matrix and scaled by d
(its per-coordinate work is independent; the row says ``extrapolated_from_d``).

:func:`render` turns the JSON result into markdown lines for ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from fedsafe.aggregators import REGISTRY, forensics, rule_needs

D_LORA = 16_777_216  # Llama-2-7B, r=32 on q/v: 2 * 32 * 32 layers * (4096 + 4096) = 16.8M
D_SMALL = 1 << 20
TARGET = (100, D_LORA)
TARGET_RATIO = 3.0

# Which baseline each rule is compared with; every other rule is compared with one pass.
DISTANCE = {
    "krum", "multi_krum", "krum_paper", "bulyan", "geometric_median",
    "foolsgold", "foolsgold_paper", "forensics", "flame",  # FLAME: cosine distances from the Gram matrix
}  # fmt: skip

# residual does ~n^2 work per coordinate: above this many slope evaluations (n^2 d) it is
# timed on d' = RESIDUAL_MAX_WORK / n^2 columns and scaled by d / d' (262,144 of 16.8M at n=100).
RESIDUAL_MAX_WORK = 100 * 100 * 2**18

# A run this long is timed once: noise is small relative to it, and the target run stays short.
LONG_RUN_S = 10.0

# Inputs this script can supply; rules needing others (e.g. probe scores) are left out.
SUPPLIED = {"client_ids", "round", "root_update"}

# Why a rule can miss the target on a CPU (measured; see the rules' docstrings).
WHY_SLOW = {
    "selection": (
        "exact per-coordinate selection. Since 2026-11-30 a compiled SIMD sorting network "
        "(`_select.c`, 8 coordinates per AVX2 instruction) does it: at n = 100 on one core of this "
        "CPU ~0.55 ns per value for the network, ~0.3 for reading the data and ~0.2 for counting, "
        "vs ~0.2 for a pass, so about 4-5 passes' worth on 2 cores shared with other work (see "
        "`bench_coordinatewise.py`; the numpy sort it replaced, still used without a C compiler, was "
        "9-45x). Fewer would need a smaller network, a GPU sort or an approximate median"
    ),
    "residual": (
        "O(n^2) compares per coordinate: since 2026-11-30 the whole rule is compiled "
        "(`_residual.c`) with an exact repeated median that counts slopes under thresholds "
        "instead of dividing and sorting them (~3.05 us per coordinate at n = 100 on one core, "
        "was ~22); the stable sort with ranks and one counting pass over the n(n-1)/2 pairs alone "
        "take ~1.2 of the ~1.6 us per coordinate per core that 30x an idle pass allows (see "
        "`bench_coordinatewise.py`)"
    ),
    "two_pass": (
        "two dependent passes over the data (per-client norms, dots or distances, then the "
        "weighted sum; DnC: a seeded permutation of all d coordinates, then the sum), so about "
        "2x on an idle machine; the rest is other processes' load (see the load line)"
    ),
    "gram": (
        "one matmul plus centring each block (about one more pass); the rest is other "
        "processes' load (see the load line)"
    ),
}
SLOW_KIND = {
    "median": "selection", "median_paper": "selection", "trimmed_mean": "selection",
    "trimmed_mean_paper": "selection", "bulyan": "selection", "residual": "residual",
    "centered_clipping": "two_pass", "fltrust": "two_pass", "norm_bound": "two_pass",
    "dnc": "two_pass",
}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int, warmup: bool) -> float:
    """Best wall time over ``repeat`` runs (after one untimed run if ``warmup``).

    Best-of rather than mean: on a shared machine the slow runs measure the other processes.
    Runs over ``LONG_RUN_S`` are not repeated, which bounds the benchmark's duration.
    """
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
        if best > LONG_RUN_S:
            break
    return best


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_mb(fn: Callable[[], object]) -> tuple[object, float | None]:
    """Run ``fn`` and return (its result, peak resident memory above the start, in MB).

    Linux only: resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), reads ``VmHWM``.
    """
    before = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        before = None
    out = fn()
    peak = _status_kb("VmHWM")
    return out, (None if before is None or peak is None else max(0, peak - before) / 1024)


def make_updates(n: int, d: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, d, device=device)
    return x.normal_(generator=gen).mul_(1e-3)  # in place: no second (n, d) buffer


def assumed_attackers(name: str, n: int) -> int:
    """``f`` = 20% of ``n``, capped by the rule's bound (Krum n > 2f + 2, Bulyan n >= 4f + 3)."""
    most = (n - 3) // 4 if name == "bulyan" else (n - 3) // 2
    return max(0, min(n // 5, most))


def default_rules() -> list[str]:
    """Every registered rule this script can feed, plus the forensics pass the engine runs each round."""
    return [r for r in sorted(REGISTRY) if rule_needs(r) <= SUPPLIED] + ["forensics"]


def rule_call(name: str, x: torch.Tensor, root: torch.Tensor) -> Callable[[], object]:
    if name == "forensics":
        return lambda: forensics(x)
    params = {"client_ids": list(range(x.shape[0])), "round": 1}
    if name == "fltrust":
        params["root_update"] = root[: x.shape[1]]
    if name in {"krum", "multi_krum", "bulyan"}:
        params["f"] = assumed_attackers(name, x.shape[0])
    return lambda: REGISTRY[name](x, None, state=None, **params)


def bench_rule(
    name: str, x: torch.Tensor, root: torch.Tensor, base: dict, repeat: int, warmup: bool
) -> dict:
    n, d = x.shape
    kind = "matmul" if name in DISTANCE else "pass"
    row = {"rule": name, "n": n, "d": d, "kind": kind, "baseline_seconds": base[kind]}
    sub = x
    if name == "residual" and n * n * d > RESIDUAL_MAX_WORK:
        sub = x[:, : max(1, int(RESIDUAL_MAX_WORK // (n * n)))]
        row["extrapolated_from_d"] = sub.shape[1]
    device = x.device
    run = rule_call(name, sub, root)
    seconds, extra = peak_extra_mb(lambda: timed(run, device, repeat, warmup))
    seconds *= d / sub.shape[1]
    ratio = seconds / base[kind]
    row.update(seconds=seconds, ratio=ratio, target_met=ratio <= TARGET_RATIO, peak_extra_mb=extra)
    return row


def bench_size(
    n: int, d: int, rules: list[str], device: torch.device, repeat: int, quiet: bool = False
) -> dict:
    x = make_updates(n, d, device)
    root = x.mean(dim=0)
    warmup = n * d <= 50 * D_SMALL  # small cases: warm caches first; big ones: best-of suffices
    ones = torch.ones(n, device=device)
    # "One pass": the faster of two one-pass reductions, so no rule gains from a slow baseline.
    passes = {
        "sum": timed(lambda: x.sum(dim=0), device, repeat, warmup),
        "gemv": timed(lambda: ones @ x, device, repeat, warmup),
    }
    matmul = timed(lambda: x @ x.T, device, repeat, warmup)
    base = {"matmul": matmul, "pass": min(passes.values())}
    if not quiet:
        print(f"n={n} d={d}: matmul {base['matmul']:.4f}s, pass {base['pass']:.4f}s "
              f"(sum {passes['sum']:.4f}s, gemv {passes['gemv']:.4f}s)", flush=True)  # fmt: skip
    rows = []
    for name in rules:
        rows.append(bench_rule(name, x, root, base, repeat, warmup))
        if not quiet:
            print_row(rows[-1])
    del x, root
    return {
        "n": n, "d": d, "repeat": repeat, "baseline_seconds": base, "pass_seconds": passes,
        "rows": rows,
    }  # fmt: skip


def print_row(row: dict) -> None:
    extra = f"{row['peak_extra_mb']:8.0f} MB" if row["peak_extra_mb"] is not None else ""
    sub = row.get("extrapolated_from_d")
    scaled = f"  (timed on d={sub}, scaled)" if sub else ""
    print(
        f"{row['rule']:<20} {row['seconds']:10.4f}s {row['ratio']:8.2f} x {row['kind']:<6} "
        f"{'ok ' if row['target_met'] else 'MISS'} {extra}{scaled}",
        flush=True,
    )


def _fmt_d(d: int) -> str:
    return f"{d / 2**20:.0f}M" if d % 2**20 == 0 else f"{d / 1e6:.1f}M"


def render(result: dict) -> list[str]:
    """Markdown lines (no heading) for the aggregation section of ``benchmarks/results.md``."""
    meta = result.get("meta", {})
    sizes = result.get("sizes", [])
    lines = [
        "Target: every rule within 3x of one `(n x d) @ (d x n)` matmul `x @ x.T` (distance "
        "rules) or one pass over the data (coordinate-wise and linear rules: the faster of "
        "`x.sum(0)` and `ones(n) @ x`), at n = 100, d = 16.8M.",
        "",
        "Sizes: " + ", ".join(f"n = {s['n']}, d = {s['d']:,} ({_fmt_d(s['d'])})" for s in sizes)
        + f"; fp32 on {meta.get('device', '?')}, {meta.get('threads', '?')} threads, "
        f"torch {meta.get('torch', '?')}, numpy {meta.get('numpy', '?')}.",
    ]
    load = meta.get("loadavg_start"), meta.get("loadavg_end")
    if all(v is not None for v in load):
        lines.append(
            f"1-min load average at start / end: {load[0]:.1f} / {load[1]:.1f} on "
            f"{meta.get('cpus', '?')} CPUs; this benchmark adds up to {meta.get('threads', '?')}, "
            "anything above that is other processes running at the same time."
        )
    missed: dict[str, list[str]] = {}
    for s in sizes:
        lines += [
            "",
            f"n = {s['n']}, d = {s['d']:,}: matmul {s['baseline_seconds']['matmul']:.3f} s, "
            f"pass {s['baseline_seconds']['pass']:.3f} s; each time is the best of "
            f"{s.get('repeat', '?')} runs (1 if over {LONG_RUN_S:.0f} s).",
            "",
            "| rule | kind | seconds | baseline seconds | ratio | within 3x? |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            sub = r.get("extrapolated_from_d")
            note = f" (timed on d = {sub:,}, scaled)" if sub else ""
            if r.get("remeasured"):  # a row replaced by a later run of some rules (its own baseline)
                note += " (re-measured)"
            lines.append(
                f"| {r['rule']} | {r['kind']} | {r['seconds']:.3f}{note} "
                f"| {r['baseline_seconds']:.3f} | {r['ratio']:.1f} "
                f"| {'yes' if r['target_met'] else '**no**'} |"
            )
            if not r["target_met"]:
                missed.setdefault(SLOW_KIND.get(r["rule"], "gram"), []).append(r["rule"])
    if result.get("remeasured"):
        lines += ["", f"Rows marked re-measured: {result['remeasured']}; each with that run's baseline."]
    peaks = [r["peak_extra_mb"] for s in sizes for r in s["rows"]]
    peaks = [p for p in peaks if p is not None]
    if peaks:
        lines += ["", f"Largest peak memory of any rule above the updates: {max(peaks):,.0f} MB."]
    if missed:
        lines += ["", "Rules that miss the target:", ""]
        for why, rules in missed.items():
            lines.append(f"- {', '.join(sorted(set(rules)))}: {WHY_SLOW[why]}.")
    return lines


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [(int(n), int(d)) for n, d in (part.split("x") for part in text.split(","))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n in {10, 50}, d = 1M, not the target")
    ap.add_argument("--sizes", help="comma-separated NxD list, e.g. 100x1048576,50x1048576")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--rules", help="comma-separated subset (default: all + forensics)")
    ap.add_argument("--repeat", type=int, help="runs per timing, best kept (default 3; 2 if big)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    rules = args.rules.split(",") if args.rules else default_rules()
    unknown = [r for r in rules if r not in REGISTRY and r != "forensics"]
    if unknown:
        ap.error(f"unknown rules: {unknown}")
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    else:
        sizes = [(10, D_SMALL), (50, D_SMALL)] if args.quick else [TARGET]

    import numpy  # only for the version: the CPU kernels use it

    meta = {
        "torch": torch.__version__, "numpy": numpy.__version__, "device": str(device),
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "loadavg_start": os.getloadavg()[0],
    }  # fmt: skip
    print(f"torch {torch.__version__}, {device}, {meta['threads']} threads, "
          f"load {meta['loadavg_start']:.1f}")  # fmt: skip
    bench_size(10, 4096, rules, device, repeat=1, quiet=True)  # warm up kernels and thread pools
    results = []
    for n, d in sizes:
        # Best of 3 for small cases, of 2 for big ones (each run is seconds there).
        repeat = args.repeat or (3 if n * d <= 50 * D_SMALL else 2)
        results.append(bench_size(n, d, rules, device, repeat))
    meta["loadavg_end"] = os.getloadavg()[0]
    out = {"meta": meta, "target_ratio": TARGET_RATIO, "sizes": results}
    print("\n".join(render(out)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
