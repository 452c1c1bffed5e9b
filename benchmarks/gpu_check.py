"""The prepared GPU check: everything this project wants measured on a CUDA machine, in one command.

    python benchmarks/gpu_check.py                 # on a CUDA machine, <= 8 minutes (--budget-s)
    python benchmarks/gpu_check.py --dry-run       # on any machine: tiny sizes on CPU, checks the script (CI)
    python benchmarks/run_all.py --merge gpu=benchmarks/out/gpu_check.json   # into results.md / results.json

GPU machines come rarely and for minutes, and only 64 MiB of the working tree travels to them, so nothing
here downloads or loads weights: the models are built from ``transformers`` configs of the real shapes with
random initialisation (a step's time does not depend on the weights) and trained on random token ids of full
length. Sections, each written to the JSON as soon as it is done (a run that is stopped keeps what it has):

1. ``tests``: the CUDA-marked tests (``pytest -m cuda``);
2. ``engine``: ``Engine.run_round`` time per local step, tokens/s and the fraction of the card's bf16 peak
   (4N FLOPs per trained token, see hw.py) for SmolLM2-135M- and Llama-2-7B-shaped models, LoRA and batch as
   in the ``paper`` preset (r=32 on q/v of every layer, batch 16, length 512), bf16 weights and autocast;
3. ``batched``: one round's client training of 10 clients, 1, 3 and 10 per forward (``fl.batch_clients``),
   SmolLM2 shape with the ``demo`` preset's LoRA and batch (the prefix cache on), with the adapters' largest
   difference from one by one;
4. ``aggregators``: every rule at n = 100, d = 16.8M on CUDA (bench_aggregators.py's timing and baselines).

Sections that no longer fit in the time budget are recorded as skipped. Without CUDA and without
``--dry-run`` the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # hw.py and the other bench scripts' functions

# transformers LlamaConfig fields of the real models (SmolLM2-135M is a Llama; its config.json on the hub)
SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         rope_theta=100000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
                       max_position_embeddings=4096, rms_norm_eps=1e-5),
}
# --dry-run: the same architectures shrunk so that the whole script runs on a CPU in well under a minute
DRY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2)
CUDA_TEST_FILES = ["tests/test_cuda.py", "tests/test_aggregators.py"]
D_TARGET = 16_777_216  # Llama-2-7B LoRA r=32 on q/v (bench_aggregators.D_LORA)


class Check:
    """Sizes and the clock of one run."""

    def __init__(self, dry: bool, budget_s: float, out: Path, md: Path | None):
        self.dry, self.budget_s, self.out, self.md = dry, budget_s, out, md
        self.t0 = time.perf_counter()
        self.device = torch.device("cpu" if dry else "cuda")
        self.dtype = torch.float32 if dry else torch.bfloat16
        self.autocast = "none" if dry else "bf16"
        self.result: dict = {"dry_run": dry, "machine": machine(), "budget_s": budget_s, "sections": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def record(self, name: str, value: dict) -> None:
        self.result["sections"][name] = value
        self.result["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1) + "\n")
        os.replace(tmp, self.out)
        if self.md is not None:
            self.md.write_text("\n".join(render(self.result)) + "\n")
        print(f"[{self.result['elapsed_s']:6.1f} s] {name}: {summary(value)}", flush=True)


def machine() -> dict:
    import transformers

    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name(0) if cuda else None,
            "cuda_version": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M")}


def summary(sec: dict) -> str:
    if "skipped" in sec:
        return "skipped: " + sec["skipped"]
    if "error" in sec:
        return "FAILED: " + sec["error"].strip().splitlines()[-1][:200]
    return "ok"


def guarded(chk: Check, name: str, need_s: float, fn) -> None:
    """Run one section unless it would overrun the budget; a failure is recorded, the next section still runs."""
    if chk.left() < need_s:
        chk.record(name, {"skipped": f"time budget: {chk.left():.0f} s left, about {need_s:.0f} s needed"})
        return
    try:
        chk.record(name, fn(chk))
    except Exception as e:  # noqa: BLE001 -- a GPU check must report, not stop, on a section's failure
        import traceback

        chk.record(name, {"error": traceback.format_exc()[-3000:], "exception": repr(e)[:300]})
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- tests
def cuda_tests(chk: Check) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *CUDA_TEST_FILES]
    if chk.dry:
        cmd.append("--collect-only")  # no CUDA here: check that the selection exists and imports
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=max(30, min(240, chk.left() - 120)))
    tail = (p.stdout + p.stderr).strip().splitlines()
    return {"command": " ".join(["python", *cmd[1:]]), "returncode": p.returncode, "ok": p.returncode == 0,
            "summary": tail[-1] if tail else "", "seconds": round(time.perf_counter() - t0, 1),
            "output_tail": "\n".join(tail[-25:])}


# ------------------------------------------------------------------------------------------------ models
def build_base(shape: str, chk: Check):
    """A randomly initialised Llama of ``shape`` on the check's device and dtype (frozen, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(SHAPES[shape], **DRY_SHAPE) if chk.dry else SHAPES[shape]
    cfg = LlamaConfig(**fields, bos_token_id=None, pad_token_id=0, eos_token_id=1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(chk.dtype)
    torch.manual_seed(0)
    try:
        with torch.device(chk.device):  # initialise in place on the GPU: no 27 GB host copy for the 7B shape
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def make_engine(base, preset: str, chk: Check, tmp: str, *, clients: int, sampled: int, steps: int,
                dropout: float | None = None):
    """An :class:`Engine` on ``base`` with ``preset``'s LoRA, batch size and lengths, the built-in tiny data
    for its clients' records and, as their training examples, random token ids of the full length."""
    from fedsafe.config import load_config
    from fedsafe.data.partition import build_federation
    from fedsafe.data.templates import IGNORE, Example
    from fedsafe.fl.engine import Engine
    from fedsafe.models import LoraHandle, add_lora, tiny_tokenizer
    from fedsafe.runtime import Runtime

    ref = load_config(preset)
    seq = 32 if chk.dry else ref.model.seq_length
    per = 8
    cfg = load_config("tiny", [
        f"data.groups=[{{name: all, clients: {clients}, mix: {{tiny: 1.0}}}}]", f"data.samples_per_client={per}",
        "monitor.every=0", "fl.rounds=1000", "fl.checkpoint_every=1000", f"fl.sample_clients={sampled}",
        f"fl.local_steps={steps}", f"fl.batch_size={2 if chk.dry else ref.fl.batch_size}",
        f"model.seq_length={seq}", f"model.max_prompt_length={seq // 2}", f"model.autocast={chk.autocast}",
        f"model.device={chk.device.type}", "fl.sampling=random"])
    cfg.lora = ref.lora
    if dropout is not None:
        cfg.lora.dropout = dropout
    if chk.dry and cfg.lora.layers:  # the shrunk model has fewer layers than the preset adapts
        cfg.lora.layers = min(cfg.lora.layers, base.config.num_hidden_layers // 2)
    lc = cfg.lora
    pm = add_lora(base, lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.layers)
    pm.eval()
    rt = Runtime(cfg.model, cfg.lora, pm, tiny_tokenizer(), LoraHandle.of(pm), chk.device)
    fed = build_federation(cfg.data, seed=cfg.seed)
    eng = Engine(cfg, Path(tmp), fed, rt, progress=False, round_callback=None)
    gen = torch.Generator().manual_seed(0)
    prompt = seq // 4
    vocab = base.config.vocab_size
    eng.examples = []
    for recs in (c.records for c in fed.clients):  # one example per record: the prefix cache keys on records
        ids = torch.randint(2, vocab, (len(recs), seq), generator=gen).tolist()
        eng.examples.append([Example(input_ids=r, labels=[IGNORE] * prompt + r[prompt:]) for r in ids])
    return eng


def engine_shape(chk: Check, shape: str, steps: int, repeats: int) -> dict:
    from hw import accelerator_figures, n_params

    t0 = time.perf_counter()
    base = build_base(shape, chk)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(base, "paper", chk, tmp, clients=4, sampled=1, steps=steps)
        fl, seq = eng.cfg.fl, eng.cfg.model.seq_length
        if chk.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_step = []
        for rnd in range(repeats + 1):  # round 0 warms up (kernels, allocator)
            t = time.perf_counter()
            eng.run_round(rnd)  # ends by reading the adapter back to the host: the GPU is synchronised
            if rnd:
                per_step.append((time.perf_counter() - t) / steps)
        s = sorted(per_step)[len(per_step) // 2]
        tokens = fl.batch_size * seq
        out = {"shape": shape, "params": n_params(eng.rt.model), "lora_params": eng.rt.handle.numel,
               "lora": {"r": eng.cfg.lora.r, "alpha": eng.cfg.lora.alpha, "target_modules": eng.cfg.lora.target_modules,
                        "layers": eng.cfg.lora.layers},
               "batch_size": fl.batch_size, "seq_length": seq, "steps_per_round": steps, "repeats": repeats,
               "s_per_step": s, "s_per_step_all": per_step, "build_s": build_s, "dtype": str(chk.dtype),
               "autocast": chk.autocast,
               "peak_gpu_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if chk.device.type == "cuda" else None}
        out |= {"training": accelerator_figures(tokens / s, out["params"], 4)}
        if shape == "llama-2-7b":
            out["target"] = "fraction_of_bf16_peak >= 0.40"
        del eng
    del base
    return out


def engine(chk: Check) -> dict:
    steps, repeats = (1, 1) if chk.dry else (3, 3)
    rows = [engine_shape(chk, "smollm2-135m", steps, repeats)]
    chk.record("engine", {"rows": rows, "partial": True})
    if chk.left() < (5 if chk.dry else 150):
        return {"rows": rows, "skipped_7b": f"time budget: {chk.left():.0f} s left"}
    rows.append(engine_shape(chk, "llama-2-7b", steps, repeats))
    return {"rows": rows}


def batched(chk: Check) -> dict:
    from bench_batched import time_groupings

    m, repeats = (3, 1) if chk.dry else (10, 2)
    groups = [1, 3, m] if m > 3 else [1, m]
    base = build_base("smollm2-135m", chk)
    with tempfile.TemporaryDirectory() as tmp:
        eng = make_engine(base, "demo", chk, tmp, clients=m, sampled=m, steps=2 if chk.dry else 4, dropout=0.0)
        med, worst = time_groupings(eng, groups, repeats)
        fl = eng.cfg.fl
        rows = [{"clients_per_forward": g, "seconds": med[g], "speedup_vs_one_by_one": med[1] / med[g]}
                for g in groups]
        return {"shape": "smollm2-135m", "clients_per_round": m, "steps": fl.local_steps,
                "batch_size": fl.batch_size, "seq_length": eng.cfg.model.seq_length,
                "lora": {"r": eng.cfg.lora.r, "layers": eng.cfg.lora.layers}, "prefix_cache": eng.use_prefix,
                "repeats": repeats, "rows": rows, "max_abs_diff": worst}


def aggregators(chk: Check) -> dict:
    from bench_aggregators import bench_size, default_rules

    n, d = (10, 4096) if chk.dry else (100, D_TARGET)
    rules = default_rules()
    bench_size(10, 4096, rules, chk.device, repeat=1, quiet=True)  # warm up kernels
    res = bench_size(n, d, rules, chk.device, repeat=1 if chk.dry else 2)
    return {"device": str(chk.device), **res}


# ------------------------------------------------------------------------------------------------ render
def _millions(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def render(result: dict) -> list[str]:
    """Markdown lines (no heading) for the GPU section of results.md."""
    m, secs = result.get("machine", {}), result.get("sections", {})
    lines = []
    if result.get("dry_run"):
        lines += ["**Dry run** (CPU, tiny sizes): checks the script, not figures.", ""]
    lines += [f"Device: {m.get('cuda') or 'none (CPU)'}; torch {m.get('torch')} (CUDA {m.get('cuda_version')}), "
              f"transformers {m.get('transformers')}; {m.get('date')}; {result.get('elapsed_s', '?')} s of a "
              f"{result.get('budget_s', '?')} s budget. Models are randomly initialised from the real shapes' configs.",
              ""]
    t = secs.get("tests")
    if t:
        lines += [f"CUDA tests: {summary(t) if 'skipped' in t or 'error' in t else t['summary']} "
                  f"(`{t.get('command', '')}`)", ""]
    e = secs.get("engine")
    if e and "rows" in e:
        lines += ["| model shape (random init) | params | LoRA | batch x length | s / local step | tokens/s | "
                  "TFLOP/s | fraction of bf16 peak | peak GPU GB | target |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in e["rows"]:
            tr = r["training"]
            frac = tr.get("fraction_of_bf16_peak")
            tf = tr.get("achieved_tflops")
            mem = r.get("peak_gpu_mem_gb")
            lines.append(f"| {r['shape']} | {_millions(r['params'])} | r={r['lora']['r']} on "
                         f"{'/'.join(r['lora']['target_modules'])} | {r['batch_size']} x {r['seq_length']} | "
                         f"{r['s_per_step']:.3f} | {tr['tokens_per_s']:,.0f} | {'' if tf is None else f'{tf:.0f}'} | "
                         f"{'' if frac is None else f'{frac:.0%}'} | {'' if mem is None else f'{mem:.1f}'} | "
                         f"{'>= 40%' if r.get('target') else ''} |")
        if "skipped_7b" in e:
            lines.append(f"| llama-2-7b | | | | not measured: {e['skipped_7b']} | | | | | >= 40% |")
        lines.append("")
    elif e:
        lines += [f"Engine: {summary(e)}", ""]
    b = secs.get("batched")
    if b and "rows" in b:
        lines += [f"Batched clients: {b['clients_per_round']} clients' round of training ({b['shape']} shape, "
                  f"{b['steps']} steps x batch {b['batch_size']}, length {b['seq_length']}, LoRA r={b['lora']['r']} "
                  f"on the top {b['lora']['layers']} layers, prefix cache {'on' if b['prefix_cache'] else 'off'}); "
                  f"largest adapter difference from one by one {b['max_abs_diff']:.1e}.", "",
                  "| clients per forward | seconds | speed-up vs one by one |", "|---|---|---|"]
        lines += [f"| {r['clients_per_forward']} | {r['seconds']:.3f} | {r['speedup_vs_one_by_one']:.2f}x |"
                  for r in b["rows"]]
        lines.append("")
    elif b:
        lines += [f"Batched clients: {summary(b)}", ""]
    a = secs.get("aggregators")
    if a and "rows" in a:
        lines += [f"Aggregators on {a['device']}, n = {a['n']}, d = {a['d']:,}: matmul "
                  f"{a['baseline_seconds']['matmul']:.4f} s, one pass {a['baseline_seconds']['pass']:.4f} s.", "",
                  "| rule | seconds | baseline | ratio |", "|---|---|---|---|"]
        for r in a["rows"]:
            sub = r.get("extrapolated_from_d")
            lines.append(f"| {r['rule']} | {r['seconds']:.4f}{f' (timed on d = {sub:,}, scaled)' if sub else ''} | "
                         f"{r['kind']} | {r['ratio']:.1f} |")
        lines.append("")
    elif a:
        lines += [f"Aggregators: {summary(a)}", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: check the script without a GPU")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; later sections are skipped "
                    "when it runs out (default 450 s: the check fits in 8 minutes with start-up)")
    ap.add_argument("--json", default=str(HERE / "out" / "gpu_check.json"))
    ap.add_argument("--md", help="also write the markdown section here")
    ap.add_argument("--only", default="tests,engine,batched,aggregators", help="comma-separated sections")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; run it on a GPU machine, or pass --dry-run to "
              "check the script on CPU", file=sys.stderr)
        return 2
    sections = {"tests": (cuda_tests, 30), "engine": (engine, 60), "batched": (batched, 40),
                "aggregators": (aggregators, 60)}
    only = [s for s in a.only.split(",") if s]
    bad = sorted(set(only) - set(sections))
    if bad:
        print(f"gpu_check: unknown section(s) {', '.join(bad)}; choose from {', '.join(sections)}", file=sys.stderr)
        return 2
    if a.dry_run:
        torch.set_num_threads(1)
    chk = Check(a.dry_run, a.budget_s, Path(a.json), Path(a.md) if a.md else None)
    for name in only:
        fn, need = sections[name]
        guarded(chk, name, 0 if a.dry_run else need, fn)
    print("\n".join(render(chk.result)))
    print(f"wrote {chk.out}")
    failed = [k for k, v in chk.result["sections"].items() if "error" in v or (k == "tests" and not v.get("ok"))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
