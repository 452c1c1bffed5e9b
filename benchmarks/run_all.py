"""Run every benchmark and write benchmarks/results.md and benchmarks/results.json.

    python benchmarks/run_all.py [--quick] [--model smollm2-135m-instruct]

Each figure is recorded with the machine, library versions and the command that re-runs it. Ratios are
measured side by side in one process (these machines are noisy); times are medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _machine() -> dict:
    import torch
    import transformers

    try:
        import peft

        pv = peft.__version__
    except ImportError:  # pragma: no cover
        pv = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": pv,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _run(name: str, args: list[str]) -> dict:
    out = HERE / "out" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *args, "--json", str(out)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec = {"command": "python benchmarks/" + " ".join([f"bench_{name}.py", *args]), "seconds": round(time.time() - t0, 1),
           "ok": p.returncode == 0}
    if p.returncode == 0 and out.exists():
        rec["result"] = json.loads(out.read_text())
    else:
        rec["error"] = (p.stderr or p.stdout)[-2000:]
    print(f"{name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']} s", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--only", default="engine,generation,prefix,aggregators", help="comma-separated subset")
    a = ap.parse_args()
    m = ["--model", a.model]
    args = {"engine": m + (["--repeats", "2"] if a.quick else []),
            "generation": m + (["--prompts", "16"] if a.quick else []),
            "prefix": m + (["--repeats", "2"] if a.quick else []),
            "aggregators": ["--quick"] if a.quick else []}
    only = a.only.split(",")
    res = {"machine": _machine(), "benchmarks": {k: (_run(k, v) if k in only else {"ok": False, "error": "not run",
                                                                                    "command": f"bench_{k}.py"})
                                                 for k, v in args.items()}}
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (HERE / "results.md").write_text(render(res))
    print(f"wrote {HERE / 'results.md'}")


def render(res: dict) -> str:
    mach = res["machine"]
    lines = ["# Benchmark results", "",
             f"Machine: {mach['platform']}, {mach['cpus']} CPUs, GPU: {mach['cuda'] or 'none'}; Python {mach['python']}, "
             f"torch {mach['torch']}, transformers {mach['transformers']}, peft {mach['peft']}; {mach['date']}.", "",
             "Re-run everything with `python benchmarks/run_all.py`; each section gives its own command.", ""]
    b = res["benchmarks"]
    e = b["engine"].get("result")
    lines += ["## Engine overhead and memory", "", f"`{b['engine']['command']}`", ""]
    if e:
        o, mem = e["overhead"], e["memory"]
        lines += ["| figure | value | target |", "|---|---|---|",
                  f"| engine s / local step | {o['engine_s_per_step']:.3f} | |",
                  f"| plain PEFT loop s / step (same loss) | {o['plain_same_loss_s_per_step']:.3f} | |",
                  f"| plain PEFT loop s / step (HF `labels=` loss) | {o['plain_hf_loss_s_per_step']:.3f} | |",
                  f"| overhead (engine ÷ plain, same loss) | {o['overhead_vs_same_loss']:.3f} | <= 1.10 |",
                  f"| engine ÷ plain HF-loss loop | {o['ratio_vs_hf_loss']:.3f} | |",
                  f"| peak RSS K=10 / K=100 (MB) | {mem['peak_rss_mb_k10']:.0f} / {mem['peak_rss_mb_k100']:.0f} | |",
                  f"| RSS ratio K=100 ÷ K=10 | {mem['ratio']:.3f} | <= 1.2 |", ""]
    else:
        lines += ["failed:", "```", b["engine"].get("error", ""), "```", ""]
    g = b["generation"].get("result")
    lines += ["## Generation: batched vs batch size 1", "", f"`{b['generation']['command']}`", ""]
    if g:
        bs = [k for k in g if k.startswith("bs") and k != "bs1"][0]
        lines += ["| batch | tokens/s |", "|---|---|", f"| 1 | {g['bs1']['tokens_per_s']:.1f} |",
                  f"| {bs[2:]} | {g[bs]['tokens_per_s']:.1f} |", "",
                  f"Speed-up {g['speedup']:.2f}x (target >= 4x).", ""]
    else:
        lines += ["failed:", "```", b["generation"].get("error", ""), "```", ""]
    p = b["prefix"].get("result")
    lines += ["## Frozen-prefix caching (LoRA on the top L layers)", "", f"`{b['prefix']['command']}`", ""]
    if p:
        lines += ["| L | full forward s/step | cached s/step | speed-up | prefix once (s, per batch) | loss full / cached |",
                  "|---|---|---|---|---|---|"]
        for r in p["rows"]:
            lines.append(f"| {r['L']} | {r['full_s_per_step']:.3f} | {r['cached_s_per_step']:.3f} | {r['speedup']:.2f}x | "
                         f"{r['prefix_once_s']:.3f} | {r['loss_full']:.5f} / {r['loss_cached']:.5f} |")
        lines.append("")
    else:
        lines += ["failed:", "```", b["prefix"].get("error", ""), "```", ""]
    ag = b["aggregators"].get("result")
    lines += ["## Aggregation", "", f"`{b['aggregators']['command']}`", ""]
    if ag:
        lines += ["```", json.dumps(ag, indent=1)[:6000], "```", ""]
    else:
        lines += ["failed:", "```", b["aggregators"].get("error", ""), "```", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
