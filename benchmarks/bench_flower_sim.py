"""Scale in clients on Flower's Simulation Engine: `fedsafe flower sim` of the tiny model with K = 10, 100
and 1,000 simulated SuperNodes, m = 10 clients per round.

    python benchmarks/bench_flower_sim.py [--clients 10,100,1000] [--rounds 12] [--json OUT]

Not a test. Each K is one ``fedsafe flower sim tiny ... --no-eval`` subprocess on the same synthetic data and
overrides as ``bench_clients.py`` (K x 8 unique records, 30% of the clients malicious, stratified sampling,
one local step of batch 2). Measured:

* wall time of the whole command (SuperLink, Ray and its actors start, every round, teardown);
* per round: ``round_seconds`` from ``metrics.jsonl`` (the ServerApp's wall time for the round: sending
  instructions to the sampled nodes, their training, replies, aggregation), median over the rounds after
  the first, and the ServerApp's own time in the round (``seconds``);
* peak memory of every process of the simulation together, as the sum of their PSS (proportional set size:
  shared pages counted once), sampled every 0.5 s.

Issue 19 asks for 100 SuperNodes "if the machine allows; say what limits it": there is no target ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_clients import PER_CLIENT, overrides, write_data

from fedsafe.flower.sim import processes_with_env

def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def run_one(k: int, data: Path, rounds: int, work: Path) -> dict:
    run_dir = work / f"sim-k{k}"
    cmd = [sys.executable, "-m", "fedsafe.cli", "flower", "sim", "tiny", *overrides(k, data, rounds, "fedavg"),
           "--run-dir", str(run_dir), "--no-eval", "-q", "--timeout", "1800"]
    # every process of this simulation (Ray daemons re-parent away from the CLI) inherits this marker
    mark = f"FEDSAFE_BENCH_SIM={os.getpid()}-{k}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict([mark.split("=", 1)])}
    peak = {"pss_mb": 0.0, "processes": 0}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample() -> None:
        while not done.wait(0.5):
            pids = {proc.pid, *processes_with_env(mark)}
            peak["pss_mb"] = max(peak["pss_mb"], sum(_pss_kb(p) for p in pids) / 1024)
            peak["processes"] = max(peak["processes"], len(pids))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"K={k}: fedsafe flower sim failed ({proc.returncode}):\n{out[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("round", -1) >= 0 and "round_seconds" in r]
    later = rows[1:] or rows
    return {"clients": k, "rounds": len(rows), "wall_s": round(wall, 1),
            "round_s_median": round(statistics.median(r["round_seconds"] for r in later), 3),
            "first_round_s": rows[0]["round_seconds"], "round_s": [r["round_seconds"] for r in rows],
            "server_s_median": round(statistics.median(r.get("seconds", 0.0) for r in later), 4),
            "peak_pss_mb": round(peak["pss_mb"]), "peak_processes": peak["processes"],
            "load_after": round(os.getloadavg()[0], 1)}


def render(result: dict) -> list[str]:
    rows = result["rows"]
    base = rows[0]
    lines = ["| K (simulated SuperNodes) | wall s (whole command) | per round, median s | ÷ K=10 | first round s "
             "| ServerApp's own s / round | peak PSS, all processes (MB) | ÷ K=10 | processes | load after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']:,} | {r['wall_s']:.1f} | {r['round_s_median']:.2f} "
                     f"| {r['round_s_median'] / base['round_s_median']:.2f} | {r['first_round_s']:.2f} "
                     f"| {r['server_s_median']:.3f} | {r['peak_pss_mb']:,} | {r['peak_pss_mb'] / base['peak_pss_mb']:.2f} "
                     f"| {r['peak_processes']} | {r['load_after']} |")
    m = result["meta"]
    lines += ["", f"`fedsafe flower sim tiny` (Ray, one CPU per simulated client, {m['cpus']} CPUs), m = 10 clients "
              f"a round, {PER_CLIENT} records per client, one local step of batch 2, {m['rounds']} rounds, no evaluation; "
              "per-round figures are medians over the rounds after the first. PSS counts pages shared between "
              "processes once. No target (issue 19: \"if the machine allows; say what limits it\").", ""]
    return lines + list(result.get("notes", []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="10,100,1000", help="comma-separated K values (default 10,100,1000)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args(argv)
    missing = [m for m in ("flwr", "ray") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"bench_flower_sim.py needs {' and '.join(missing)}: pip install -e \".[flower]\" \"flwr[simulation]\"",
              file=sys.stderr)
        return 2
    ks = [int(x) for x in a.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-flower-sim-") as tmp:
        work = Path(tmp)
        data = work / "data.jsonl"
        write_data(data, max(ks) * PER_CLIENT)
        rows = []
        for k in ks:
            rows.append(run_one(k, data, a.rounds, work))
            print(json.dumps(rows[-1]), flush=True)
    res = {"meta": {"rounds": a.rounds, "cpus": os.cpu_count()}, "rows": rows,
           "machine": {"date": time.strftime("%Y-%m-%d %H:%M")}}
    print("\n".join(render(res)))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
