"""Run every benchmark and write benchmarks/results.md and benchmarks/results.json.

    python benchmarks/run_all.py [--quick] [--model smollm2-135m-instruct]

Each figure is recorded with the machine, library versions and the command that re-runs it. Ratios are
measured side by side in one process (these machines are noisy); times are medians over repeats.
"""

from __future__ import annotations

import argparse
import importlib
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


def _script(name: str) -> str:
    return SCRIPTS.get(name, f"bench_{name}")


def _run(name: str, args: list[str]) -> dict:
    out = HERE / "out" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / f"{_script(name)}.py"), *args, "--json", str(out)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    rec = {"command": "python benchmarks/" + " ".join([f"{_script(name)}.py", *args]), "seconds": round(time.time() - t0, 1),
           "ok": p.returncode == 0}
    if p.returncode == 0 and out.exists():
        rec["result"] = json.loads(out.read_text())
    else:
        rec["error"] = (p.stderr or p.stdout)[-2000:]
    print(f"{name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']} s", flush=True)
    return rec


TITLES = {
    "engine": "Engine overhead and memory",
    "peer": "Peer: an OpenFedLLM-style loop (new TRL SFTTrainer per client per round) vs ours",
    "generation": "Generation: batched vs batch size 1",
    "prefix": "Frozen-prefix caching (LoRA on the top L layers)",
    "batched": "Batched clients (fl.batch_clients)",
    "aggregators": "Aggregation",
    "coordinatewise": "Coordinate-wise rules: compiled kernel vs numpy, n = 100, d = 16.8M",
    "clients": "Scale in clients: K = 10, 100, 1,000 with m = 10 per round",
    "flower_sim": "Scale in clients on Flower's Simulation Engine: K = 10, 100 and 1,000 simulated SuperNodes",
    "gpu": "GPU check (CUDA)",
}
SCRIPTS = {"gpu": "gpu_check"}  # sections whose script is not bench_<name>.py
NO_GPU = "Not measured: no GPU available."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--only", default=None, help="comma-separated subset; the others keep their previous figures "
                    "in results.json (default: all; gpu only where CUDA is available)")
    ap.add_argument("--merge", action="append", default=[], metavar="NAME=JSON",
                    help="take a section's result from a JSON file a script wrote elsewhere (e.g. "
                         "gpu=benchmarks/out/gpu_check.json from a GPU machine) and re-render; runs nothing else")
    ap.add_argument("--render", action="store_true",
                    help="only re-render results.md from results.json (after editing a section's note); runs nothing")
    a = ap.parse_args()
    if a.render:
        return _merge([])  # nothing to take in: re-render results.md from results.json
    m = ["--model", a.model]
    args = {"engine": m + (["--repeats", "2"] if a.quick else []),
            "peer": m + (["--rounds", "1"] if a.quick else []),
            "generation": m + (["--prompts", "16"] if a.quick else []),
            "prefix": m + (["--repeats", "2"] if a.quick else []),
            "batched": m + (["--clients", "3", "--repeats", "1", "--threads", "1"] if a.quick else []),
            "aggregators": ["--quick"] if a.quick else [],
            "coordinatewise": ["--d", "2097152", "--residual-d", "32768"] if a.quick else [],
            "clients": ["--clients", "10,100", "--rounds", "6"] if a.quick else [],
            "flower_sim": ["--clients", "10,20", "--rounds", "3"] if a.quick else [], "gpu": []}
    if a.merge:
        return _merge(a.merge)
    import torch

    cuda = torch.cuda.is_available()
    only = [x for x in (a.only or ",".join(k for k in TITLES if k != "gpu" or cuda)).split(",") if x]
    if "gpu" in only and not cuda:
        raise SystemExit("--only gpu needs a CUDA machine (the GPU check's section stays as it is)")
    unknown = sorted(set(only) - set(TITLES))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(TITLES)}")
    prev_file = HERE / "results.json"
    prev = json.loads(prev_file.read_text()).get("benchmarks", {}) if prev_file.exists() else {}
    machine = _machine()
    bench = {}
    for k in TITLES:
        if k in only:
            bench[k] = _run(k, args[k]) | {"machine": machine}
        else:  # keep what an earlier run measured, with its own machine and date
            bench[k] = prev.get(k) or {"ok": False, "error": "not run yet", "command": f"python benchmarks/{_script(k)}.py"}
    res = {"machine": machine, "benchmarks": bench}
    (HERE / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (HERE / "results.md").write_text(render(res))
    print(f"wrote {HERE / 'results.md'}")


def _merge(items: list[str]) -> None:
    """Put results measured elsewhere into results.json (with the machine they were measured on) and re-render."""
    prev_file = HERE / "results.json"
    res = json.loads(prev_file.read_text())
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or name not in TITLES:
            raise SystemExit(f"--merge {item!r}: give NAME=JSON with NAME one of {', '.join(TITLES)}")
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge {item!r}: cannot read {path}: {e}") from None
        rec = {"command": f"python benchmarks/{_script(name)}.py", "ok": True, "result": result}
        if isinstance(result, dict) and isinstance(result.get("machine"), dict):
            rec["machine"] = result["machine"]
        res["benchmarks"][name] = rec
    prev_file.write_text(json.dumps(res, indent=2) + "\n")
    (HERE / "results.md").write_text(render(res))
    print(f"wrote {HERE / 'results.md'}")


def _engine_md(e: dict) -> list[str]:
    o, mem = e["overhead"], e["memory"]
    return ["| figure | value | target |", "|---|---|---|",
            f"| engine s / local step | {o['engine_s_per_step']:.3f} | |",
            f"| plain PEFT loop s / step (same loss) | {o['plain_same_loss_s_per_step']:.3f} | |",
            f"| plain PEFT loop s / step (HF `labels=` loss) | {o['plain_hf_loss_s_per_step']:.3f} | |",
            f"| overhead (engine ÷ plain, same loss) | {o['overhead_vs_same_loss']:.3f} | <= 1.10 |",
            f"| engine ÷ plain HF-loss loop | {o['ratio_vs_hf_loss']:.3f} | |",
            f"| peak RSS K=10 / K=100 (MB) | {mem['peak_rss_mb_k10']:.0f} / {mem['peak_rss_mb_k100']:.0f} | |",
            f"| RSS ratio K=100 ÷ K=10 | {mem['ratio']:.3f} | <= 1.2 |", ""]


def _generation_md(g: dict) -> list[str]:
    bs = [k for k in g if k.startswith("bs") and k != "bs1"][0]
    return ["| batch | tokens/s |", "|---|---|", f"| 1 | {g['bs1']['tokens_per_s']:.1f} |",
            f"| {bs[2:]} | {g[bs]['tokens_per_s']:.1f} |", "", f"Speed-up {g['speedup']:.2f}x (target >= 4x).", ""]


def _prefix_md(p: dict) -> list[str]:
    lines = ["| L | full forward s/step | cached s/step | speed-up | prefix once (s, per batch) | loss full / cached |",
             "|---|---|---|---|---|---|"]
    for r in p["rows"]:
        lines.append(f"| {r['L']} | {r['full_s_per_step']:.3f} | {r['cached_s_per_step']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['prefix_once_s']:.3f} | {r['loss_full']:.5f} / {r['loss_cached']:.5f} |")
    return lines + [""]


def _module_md(name: str, result: dict) -> list[str]:
    """Sections whose script knows best how to show itself: ``bench_<name>.render(result)``."""
    sys.path.insert(0, str(HERE))
    try:
        mod = importlib.import_module(_script(name))
    finally:
        sys.path.pop(0)
    if hasattr(mod, "render"):
        return list(mod.render(result))
    return ["```", json.dumps(result, indent=1)[:6000], "```", ""]


SECTION_MD = {"engine": _engine_md, "generation": _generation_md, "prefix": _prefix_md}


def render(res: dict) -> str:
    mach = res["machine"]
    lines = ["# Benchmark results", "",
             f"Machine: {mach['platform']}, {mach['cpus']} CPUs, GPU: {mach['cuda'] or 'none'}; Python {mach['python']}, "
             f"torch {mach['torch']}, transformers {mach['transformers']}, peft {mach['peft']}; {mach['date']}.", "",
             "Re-run everything with `python benchmarks/run_all.py` (or `--only NAME,...`); each section gives its "
             "own command, and the date it was measured when that differs from the line above.", ""]
    for name, title in TITLES.items():
        rec = res["benchmarks"].get(name, {})
        if lines[-1] != "":
            lines.append("")  # a section that ends without a blank line must not swallow the next heading
        lines += [f"## {title}", "", f"`{rec.get('command', f'python benchmarks/{_script(name)}.py')}`", ""]
        when = (rec.get("machine") or {}).get("date")
        if when and when != mach["date"]:
            lines += [f"Measured {when}.", ""]
        if rec.get("note"):  # what the numbers alone do not say (the load, a peer that changed), kept in results.json
            lines += [rec["note"], ""]
        if rec.get("ok") and rec.get("result") is not None:
            fn = SECTION_MD.get(name)
            lines += fn(rec["result"]) if fn else _module_md(name, rec["result"])
        elif rec.get("error") in (None, "not run", "not run yet"):
            lines += [NO_GPU if name == "gpu" else "Not run yet.", ""]
        else:
            lines += ["failed:", "```", rec["error"], "```", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
