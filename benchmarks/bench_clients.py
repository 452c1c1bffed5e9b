"""Scale in clients: `fedsafe run` on the tiny model with K = 10, 100, 1,000 clients, m = 10 per round.

    python benchmarks/bench_clients.py [--clients 10,100,1000] [--rounds 12] [--json OUT]

Each (variant, K) is one child process running ``fedsafe run tiny ... --no-eval`` in-process on a synthetic
file data set of K x 8 unique records (30% of the clients malicious, stratified sampling). Measured there:

* peak RSS of the process (``ru_maxrss``: the model, the data, every round);
* per-round wall time *excluding client training*: ``Engine.run_round`` (sampling, validation, aggregation,
  forensics, metrics, the checkpoint with its per-client state) minus the time in ``Engine.client_update``,
  median over the rounds after the first.

Variants: ``fedavg`` (fresh optimiser per client per round, the paper), ``scaffold`` (a control variate per
client that trained), ``keep_opt`` (``fl.reset_optimizer=false``: an AdamW state per client that trained):
the last two carry per-client state, which lives on disk (``client_state/``, see fl/client_state.py) and is
written only for the clients that trained, so neither RAM nor the checkpoint grows with K.
Target (issue 19): K = 1,000 within 1.2x of K = 10 for both figures. The children run one after another,
variants interleaved per K; the 1-min load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_CLIENT = 8
M = 10
TARGET = 1.2
VARIANTS = {"fedavg": [], "scaffold": ["fl.fed_alg=scaffold"], "keep_opt": ["fl.reset_optimizer=false"]}


def write_data(path: Path, n: int) -> None:
    """``n`` unique short (instruction, response) pairs: distinct products, tiny-model sized."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = 13 + i // 97, 2 + i % 97
            f.write(json.dumps({"instruction": f"What is {a} times {b}?", "response": f"{a} times {b} is {a * b}."})
                    + "\n")


def overrides(k: int, data: Path, rounds: int, variant: str) -> list[str]:
    mal = max(1, k * 3 // 10)
    src = f"'file:{data}'"
    return [f"data.groups=[{{name: benign, clients: {k - mal}, mix: {{{src}: 1.0}}}}, "
            f"{{name: malicious, clients: {mal}, malicious: true, mix: {{{src}: 1.0}}}}]",
            f"data.samples_per_client={PER_CLIENT}", "data.upsample=false", f"fl.sample_clients={M}",
            "fl.sampling=stratified", f"fl.rounds={rounds}", "fl.local_steps=1", "fl.batch_size=2",
            "monitor.every=0", "fl.keep_checkpoints=2", *VARIANTS[variant]]


def child(k: int, data: str, rounds: int, variant: str, run_dir: str) -> None:
    """Run `fedsafe run` in this process with timers around the engine's round and client training."""
    import torch

    from fedsafe import cli
    from fedsafe.fl import checkpoint
    from fedsafe.fl.engine import Engine

    torch.set_num_threads(1)
    rounds_s, client_s, rounds_cpu, client_cpu = [], [0.0], [], [0.0]
    run_round, client_update = Engine.run_round, Engine.client_update

    def timed_round(self, rnd):
        client_s.append(0.0)
        client_cpu.append(0.0)
        t0, c0 = time.perf_counter(), time.process_time()
        row = run_round(self, rnd)
        rounds_s.append(time.perf_counter() - t0)
        rounds_cpu.append(time.process_time() - c0)
        return row

    def timed_client(self, cid, rnd, lr):
        t0, c0 = time.perf_counter(), time.process_time()
        out = client_update(self, cid, rnd, lr)
        client_s[-1] += time.perf_counter() - t0
        client_cpu[-1] += time.process_time() - c0
        return out

    Engine.run_round, Engine.client_update = timed_round, timed_client
    rc = cli.main(["run", "tiny", *overrides(k, Path(data), rounds, variant), "--run-dir", run_dir, "--no-eval",
                   "--quiet"])
    if rc:
        raise SystemExit(rc)
    other = [r - c for r, c in zip(rounds_s, client_s[1:])]
    other_cpu = [r - c for r, c in zip(rounds_cpu, client_cpu[1:])]
    ck = sorted((Path(run_dir) / "checkpoints").glob(f"round_*{checkpoint.SUFFIX}"))  # the newest round's
    print(json.dumps({"k": k, "variant": variant, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "round_s": rounds_s, "client_s": client_s[1:], "other_s": other,
                      "other_s_median": statistics.median(other[1:]),
                      "other_cpu_s": other_cpu, "other_cpu_s_median": statistics.median(other_cpu[1:]),
                      "client_s_median": statistics.median(client_s[2:]),
                      "checkpoint_bytes": ck[-1].stat().st_size if ck else None,
                      "client_state_files": len(list((Path(run_dir) / "client_state").glob("*.safetensors")))}))


def run(ks: list[int], rounds: int, variants: list[str], parallel: int = 1) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        write_data(data, max(ks) * PER_CLIENT + 200)  # + room for the held-out evaluation and probe sets

        def one(kv):
            k, v = kv
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--child", str(k), "--data", str(data), "--rounds",
                                str(rounds), "--variant", v, "--run-dir", str(Path(tmp) / f"{v}-{k}")],
                               capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"K={k} {v} failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1]) | {"wall_s": time.perf_counter() - t0}
            print(f"K={k:5d} {v:9s} peak RSS {r['maxrss_mb']:.0f} MB, per round excl. training "
                  f"{r['other_s_median'] * 1e3:.1f} ms wall / {r['other_cpu_s_median'] * 1e3:.1f} ms CPU "
                  f"(training {r['client_s_median']:.2f} s), checkpoint {r['checkpoint_bytes']} B", flush=True)
            return r

        # children side by side (--parallel) share the CPUs: wall times then include waiting for them, process
        # CPU seconds and peak RSS do not
        with ThreadPoolExecutor(max_workers=max(1, parallel)) as ex:
            rows = list(ex.map(one, [(k, v) for k in ks for v in variants]))
    lo = min(ks)
    ratios = {}
    for v in variants:
        base = next(r for r in rows if r["variant"] == v and r["k"] == lo)
        for r in rows:
            if r["variant"] == v:
                r["rss_ratio"] = r["maxrss_mb"] / base["maxrss_mb"]
                r["other_ratio"] = r["other_s_median"] / base["other_s_median"]
                r["other_cpu_ratio"] = r["other_cpu_s_median"] / base["other_cpu_s_median"]
        top = next(r for r in rows if r["variant"] == v and r["k"] == max(ks))
        ratios[v] = {"rss": top["rss_ratio"], "other": top["other_ratio"], "other_cpu": top["other_cpu_ratio"]}
    return {"clients": ks, "m": M, "rounds": rounds, "parallel": parallel, "per_client": PER_CLIENT, "rows": rows, "ratios": ratios,
            "target": TARGET, "load_average_1min": {"start": load0, "end": os.getloadavg()[0]},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}}


def render(res: dict) -> list[str]:
    lines = ["| fed_alg / client state | K | peak RSS (MB) | ÷ K=10 | per round excl. training, wall (ms) | ÷ K=10 | "
             "same, CPU (ms) | ÷ K=10 | checkpoint (bytes) | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"fedavg": "fedavg (fresh optimiser)", "scaffold": "scaffold (c_i per client)",
             "keep_opt": "reset_optimizer=false (AdamW per client)"}
    for r in res["rows"]:
        lines.append(f"| {names[r['variant']]} | {r['k']:,} | {r['maxrss_mb']:.0f} | {r['rss_ratio']:.2f} | "
                     f"{r['other_s_median'] * 1e3:.1f} | {r['other_ratio']:.2f} | {r['other_cpu_s_median'] * 1e3:.1f} | "
                     f"{r['other_cpu_ratio']:.2f} | {r['checkpoint_bytes']:,} | "
                     f"{'<= ' + str(res['target']) + 'x' if r['k'] == max(res['clients']) else ''} |")
    load = res["load_average_1min"]
    lines += ["", f"`fedsafe run tiny` with m = {res['m']} of K clients per round ({res['per_client']} records each, "
              f"30% malicious, stratified sampling), {res['rounds']} rounds, a checkpoint every round (the newest 2 "
              "kept), no evaluation; medians over the rounds after the first, one torch thread. CPU = process CPU "
              "seconds, the steadier figure while other processes load the machine. Per-client state "
              "(SCAFFOLD's c_i, kept AdamW states) is written to `client_state/` for the clients that trained and "
              f"read back when they are sampled again. 1-min load average {load['start']:.1f} -> {load['end']:.1f} "
              f"on {res['machine']['cpus']} CPUs; {res.get('parallel', 1)} child process(es) at a time"
              + (" (so the wall column measures waiting for the other processes, not the engine: judge by CPU)"
                 if res.get("parallel", 1) > 1 else "") + ".", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="10,100,1000")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--parallel", type=int, default=1, help="children at a time (CPU seconds and RSS stay "
                    "comparable; wall times then include waiting for each other)")
    ap.add_argument("--json")
    ap.add_argument("--child", type=int)
    ap.add_argument("--data")
    ap.add_argument("--variant")
    ap.add_argument("--run-dir")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.data, a.rounds, a.variant, a.run_dir)
        return
    res = run([int(x) for x in a.clients.split(",")], a.rounds, a.variants.split(","), a.parallel)
    print("\n".join(render(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
