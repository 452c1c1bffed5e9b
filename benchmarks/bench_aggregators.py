"""Time every aggregation rule on random updates and compare with one-pass baselines.

Not a test. Prints one row per (rule, n, d):

* distance-based rules (Gram matrix): time / one ``(n x d) @ (d x n)`` matmul;
* coordinate-wise and linear rules: time / one pass ``updates.sum(0)``.

Usage::

    PYTHONPATH=src python benchmarks/bench_aggregators.py          # n: 10,50,100; d: 1M,16.8M
    PYTHONPATH=src python benchmarks/bench_aggregators.py --quick    # n in {10,50}, d = 1M
    PYTHONPATH=src python benchmarks/bench_aggregators.py --json out.json --rules krum,median

Memory: one ``(n, d)`` fp32 matrix (6.7 GB at n=100, d=16.8M) plus small blocks; FoolsGold is
timed without history (``state=None``), which would add another copy.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable

import torch

from fedsafe.aggregators import REGISTRY, forensics, rule_needs

D_LORA = 16_777_216  # Llama-2-7B, r=32 on q/v: 2 * 32 * 32 layers * (4096 + 4096) = 16.8M
D_SMALL = 1 << 20

# Which baseline each rule is compared with.
DISTANCE = {
    "krum", "multi_krum", "krum_paper", "bulyan", "geometric_median",
    "foolsgold", "foolsgold_paper", "forensics",
}  # fmt: skip

# residual is O(n^2 d): skip sizes that would take many minutes on a CPU.
RESIDUAL_MAX_WORK = 1e9

# Inputs this script can supply; rules needing others (e.g. probe scores) are left out.
SUPPLIED = {"client_ids", "round", "root_update"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall time over up to ``repeat`` runs; runs over a second are not repeated.

    With ``repeat > 1`` an untimed first run warms caches and allocator pools.
    """
    if repeat > 1:
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
        if best > 1.0:
            break
    return best


def make_updates(n: int, d: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.empty(n, d, device=device)
    return x.normal_(generator=gen).mul_(1e-3)  # in place: no second (n, d) buffer


def assumed_attackers(name: str, n: int) -> int:
    """``f`` = 20% of ``n``, capped by the rule's bound (Krum n > 2f + 2, Bulyan n >= 4f + 3)."""
    most = (n - 3) // 4 if name == "bulyan" else (n - 3) // 2
    return max(0, min(n // 5, most))


def rule_call(name: str, x: torch.Tensor, root: torch.Tensor) -> Callable[[], object]:
    if name == "forensics":
        return lambda: forensics(x)
    params = {"client_ids": list(range(x.shape[0])), "round": 1}
    if name == "fltrust":
        params["root_update"] = root
    if name in {"krum", "multi_krum", "bulyan"}:
        params["f"] = assumed_attackers(name, x.shape[0])
    return lambda: REGISTRY[name](x, None, state=None, **params)


def bench_size(
    n: int, d: int, rules: list[str], device: torch.device, repeat: int, quiet: bool = False
) -> list[dict]:
    x = make_updates(n, d, device)
    root = x.mean(dim=0)
    t_mm = timed(lambda: x @ x.T, device, repeat)
    t_sum = timed(lambda: x.sum(dim=0), device, repeat)
    rows = []
    for name in rules:
        kind = "matmul" if name in DISTANCE else "sum"
        row = {"rule": name, "n": n, "d": d, "baseline": kind}
        if name == "residual" and n * n * d > RESIDUAL_MAX_WORK:
            row.update(seconds=None, ratio=None, skipped="O(n^2 d) too slow")
        else:
            seconds = timed(rule_call(name, x, root), device, repeat)
            row.update(seconds=seconds, ratio=seconds / (t_mm if kind == "matmul" else t_sum))
        rows.append(row)
        if not quiet:
            print_row(row, flush=True)
    if not quiet:
        print(f"   baselines n={n} d={d}: matmul {t_mm:.4f}s, sum {t_sum:.4f}s", flush=True)
    del x, root
    return rows + [
        {"rule": "<matmul>", "n": n, "d": d, "seconds": t_mm},
        {"rule": "<sum>", "n": n, "d": d, "seconds": t_sum},
    ]


def print_row(row: dict, flush: bool = False) -> None:
    if row.get("seconds") is None:
        cell = f"{'skipped':>10}  {row.get('skipped', '')}"
    else:
        cell = f"{row['seconds']:10.4f}  {row['ratio']:8.2f} x {row['baseline']}"
    print(f"{row['rule']:<20} {row['n']:>4} {row['d']:>10}  {cell}", flush=flush)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only d=1M and n in {10, 50}")
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    ap.add_argument("--rules", help="comma-separated subset (default: all + forensics)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per timing, best kept")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    default = [r for r in sorted(REGISTRY) if rule_needs(r) <= SUPPLIED] + ["forensics"]
    rules = args.rules.split(",") if args.rules else default
    unknown = [r for r in rules if r not in REGISTRY and r != "forensics"]
    if unknown:
        ap.error(f"unknown rules: {unknown}")
    ns = [10, 50] if args.quick else [10, 50, 100]
    ds = [D_SMALL] if args.quick else [D_SMALL, D_LORA]

    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    bench_size(10, 4096, rules, device, repeat=1, quiet=True)  # warm up kernels and thread pools
    print(f"{'rule':<20} {'n':>4} {'d':>10}  {'seconds':>10}  {'ratio':>8}")
    results = []
    for d in ds:
        for n in ns:
            # Repeat small cases to smooth out noise; big ones once (each pass is seconds).
            repeat = args.repeat or (3 if n * d <= 50 * D_SMALL else 1)
            results += bench_size(n, d, rules, device, repeat)
    if args.json:
        meta = {
            "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "machine": platform.machine(), "python": platform.python_version(),
        }  # fmt: skip
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
