"""Batched clients: one round's client training with the m clients one by one vs together in one forward.

    python benchmarks/bench_batched.py [--model smollm2-135m-instruct|tiny] [--clients 3] [--repeats 2]
        [--threads 1,2] [--json OUT]

Both paths train the same sampled clients from the same global adapter on the same micro-batches (each
client's batches come from its own seeded generator), side by side in one process; the time is the
client-training part of a round (aggregation and logging are identical in both). Each configuration also
reports the largest difference between the two paths' client adapters (equivalence; tolerance-level).
Settings follow the demo preset: batch 8, 4 local steps, seq 128, LoRA r16 on the top 8 layers, with the
frozen-prefix cache on (default) and off (full forward).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch


def _engine(model: str, m: int, prefix: bool, tmp: str):
    from fedsafe.config import load_config
    from fedsafe.pipeline import build_engine

    tiny = model == "tiny"
    common = [f"fl.sample_clients={m}", "fl.rounds=100", f"fl.prefix_cache={str(prefix).lower()}", "lora.dropout=0.0",
              f"data.groups=[{{name: all, clients: {max(10, m)}, mix: {{{'tiny' if tiny else 'sharegpt'}: 1.0}}}}]"]
    # tiny: LoRA on its top layer so the prefix cache has something to skip; demo: its own top-8 layers
    extra = ["lora.layers=1"] if tiny else [f"model.name={model}", "monitor.every=0", "fl.sampling=random"]
    cfg = load_config("tiny" if tiny else "demo", common + extra)
    cfg.init.adapter = ""  # time training from a fresh adapter; alignment is not part of a round
    return build_engine(cfg, tmp, progress=False, round_callback=None)


def time_groupings(eng, groups: list[int], repeats: int) -> tuple[dict[int, float], float]:
    """Median seconds of one round's client training for each ``fl.batch_clients`` in ``groups`` (the same
    sampled clients, adapters and batches every way, order rotated per round) and the largest adapter
    difference from the first grouping. Round 0 warms up; the prefix cache is filled outside the clock."""
    from fedsafe.fl.engine import sample_clients

    fl = eng.cfg.fl
    times: dict[int, list[float]] = {g: [] for g in groups}
    worst = 0.0
    for rnd in range(repeats + 1):
        sampled = sample_clients(eng.cfg.seed, rnd, eng.K, fl.sample_clients, eng.malicious, fl.sampling)
        for c in sampled:
            if eng.use_prefix:
                eng._prefix_fn(c)(list(range(len(eng.examples[c]))))
        outs = {}
        k = rnd % len(groups)
        for g in groups[k:] + groups[:k]:  # rotate the order: no position bias
            fl.batch_clients = g
            t0 = time.perf_counter()
            outs[g] = [sd for _cid, sd, _ in eng._client_updates(sampled, rnd, fl.lr)]  # ends on the host: synced
            if rnd > 0:
                times[g].append(time.perf_counter() - t0)
        for g in groups[1:]:
            for a, b in zip(outs[groups[0]], outs[g]):
                worst = max(worst, max(float((a[n] - b[n]).abs().max()) for n in a))
    return {g: statistics.median(v) for g, v in times.items()}, worst


def one(model: str, m: int, prefix: bool, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        eng = _engine(model, m, prefix, tmp)
        fl = eng.cfg.fl
        med, worst = time_groupings(eng, [1, m], repeats)
    seq, bat = med[1], med[m]
    return {"clients": m, "prefix_cache": prefix, "sequential_s": seq, "batched_s": bat, "speedup": seq / bat,
            "max_abs_diff": worst, "steps": fl.local_steps, "batch_size": fl.batch_size}


def render(res: dict) -> list[str]:
    lines = ["| torch threads | clients per round | prefix cache | one by one (s) | batched (s) | speed-up | "
             "max adapter diff |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r.get('threads', '')} | {r['clients']} | {'on' if r['prefix_cache'] else 'off'} | "
                     f"{r['sequential_s']:.2f} | "
                     f"{r['batched_s']:.2f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    lines += ["", "Time is one round's client training (the same clients, adapters and batches both ways); "
              "`fl.batch_clients=N` switches it on. Equivalence: tests/test_batched_clients.py. On a CPU the "
              "base model's matmuls are already full at one client's batch, so batching clients is neutral here; "
              "it is meant for GPUs, where one client's batch under-fills the device.", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", default="3", help="comma-separated clients per round (e.g. 3,10)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", default="1,2",
                    help="comma-separated torch thread counts to measure (one thread is the steady figure on a "
                         "shared machine: more threads stall each other when one loses its core)")
    ap.add_argument("--json")
    a = ap.parse_args()
    rows = []
    for threads in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(threads)
        for m in [int(x) for x in a.clients.split(",")]:
            for prefix in ((True, False) if m <= 3 else (True,)):  # full forward at m=10: minutes, no news
                r = one(a.model, m, prefix, a.repeats) | {"threads": threads}
                print(f"threads={threads} m={m} prefix={'on' if prefix else 'off'}: one by one "
                      f"{r['sequential_s']:.2f} s, batched {r['batched_s']:.2f} s, {r['speedup']:.2f}x, "
                      f"max diff {r['max_abs_diff']:.1e}", flush=True)
                rows.append(r)
                if a.json:  # after every row: a long run that is stopped keeps what it measured
                    res = {"model": a.model, "rows": rows, "machine": {"platform": platform.platform(),
                                                                         "cpus": os.cpu_count(),
                                                                         "torch": torch.__version__}}
                    with open(a.json, "w") as f:
                        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
