"""Engine benchmarks: simulation overhead vs a plain PEFT loop, and peak RSS with K=10 vs K=100 clients.

    python benchmarks/bench_engine.py [--model smollm2-135m-instruct|tiny] [--steps 6] [--json OUT]

Overhead: the engine's wall time per local step (a whole round: copying the global adapter in, training,
reading it back, validating, aggregating, logging, checkpointing) divided by a plain PEFT training loop's
time per step on the same model and the same batches. Two plain loops are timed: one with the same
response-only loss (pure engine overhead) and the usual ``model(**batch, labels=...)`` loss.
Memory: peak RSS of a child process that builds a federation of K clients and runs 2 rounds.
Targets (issue 2/11): overhead <= 1.10; RSS(K=100) / RSS(K=10) <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


AUTOCAST = "bf16" if torch.cuda.is_available() else "none"  # GPU: fp32 adapter, bf16 compute


def _cfg(model: str, extra: list[str]):
    from fedsafe.config import load_config

    base = "tiny" if model == "tiny" else "demo"
    # init.adapter= : the demo's server alignment is a one-off before the federation, not engine overhead
    return load_config(base, [f"model.name={model}", "monitor.every=0", "eval.max_new_tokens=4", "init.adapter=",
                              f"model.autocast={AUTOCAST}"] + extra)


def overhead(model: str, steps: int, repeats: int) -> dict:
    from fedsafe.data.templates import collate
    from fedsafe.fl.engine import sample_clients
    from fedsafe.pipeline import build_engine
    from fedsafe.fl.train import batch_plan
    from fedsafe.lm import autocast_ctx, cosine_lr, response_loss

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = _cfg(model, [f"fl.local_steps={steps}", "fl.sample_clients=1", "fl.rounds=100", "fl.checkpoint_every=1",
                       "fl.prefix_cache=false"])
    with tempfile.TemporaryDirectory() as tmp:
        eng = build_engine(cfg, tmp, progress=False)
        rt = eng.rt
        fl = cfg.fl
        engine_t, plain_t, plain_hf_t = [], [], []
        for rep in range(repeats + 1):  # first repeat is warm-up
            rnd = rep
            (cid,) = sample_clients(cfg.seed, rnd, eng.K, 1, eng.malicious, fl.sampling)
            t0 = time.perf_counter()
            eng.run_round(rnd)
            te = (time.perf_counter() - t0) / steps
            # the same batches, plain loops
            from fedsafe.fl.engine import derive_seed

            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, rnd, cid))
            plan = batch_plan(len(eng.examples[cid]), steps, fl.batch_size, 1, gen)
            batches = [collate([eng.examples[cid][i] for i in idx], rt.pad_id, rt.device) for idx in plan]
            lr = cosine_lr(rnd, fl.rounds, fl.lr, fl.lr_min)
            for kind, store in (("same", plain_t), ("hf", plain_hf_t)):
                rt.handle.set_flat(eng.global_vec)
                opt = torch.optim.AdamW(rt.handle.params, lr=lr)
                rt.model.train()
                t0 = time.perf_counter()
                for b in batches:
                    opt.zero_grad(set_to_none=True)
                    if kind == "same":
                        loss, _ = response_loss(rt.model, b, AUTOCAST)
                    else:
                        with autocast_ctx(AUTOCAST, rt.device):
                            loss = rt.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                            labels=b["labels"]).loss
                    loss.backward()
                    opt.step()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # GPU work is asynchronous: wait before reading the clock
                rt.model.eval()
                store.append((time.perf_counter() - t0) / steps)
            if rep > 0:
                engine_t.append(te)
        e, p, h = statistics.median(engine_t), statistics.median(plain_t[1:]), statistics.median(plain_hf_t[1:])
        tokens = sum(len(x.input_ids) for x in eng.examples[0][: fl.batch_size])
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from hw import accelerator_figures, n_params

        train = accelerator_figures(tokens / e, n_params(rt.model), 4)  # LoRA training: 4N per token
        return {"model": model, "steps_per_round": steps, "batch_size": fl.batch_size, "repeats": repeats,
                "engine_s_per_step": e, "plain_same_loss_s_per_step": p, "plain_hf_loss_s_per_step": h,
                "overhead_vs_same_loss": e / p, "ratio_vs_hf_loss": e / h, "approx_tokens_per_step": tokens,
                "training": train, "autocast": AUTOCAST,
                "target": "overhead_vs_same_loss <= 1.10"}


def _rss_child(model: str, k: int) -> None:
    from fedsafe.pipeline import build_engine

    per = 20
    cfg = _cfg(model, ["fl.rounds=2", "fl.local_steps=1", "fl.batch_size=2", f"data.samples_per_client={per}",
                       f"data.groups=[{{clients: {k - max(1, k * 3 // 10)}, mix: {{{_benign(model)}}}}}, "
                       f"{{clients: {max(1, k * 3 // 10)}, malicious: true, mix: {{{_mal(model)}}}}}]"])
    with tempfile.TemporaryDirectory() as tmp:
        eng = build_engine(cfg, tmp, progress=False)
        eng.run_round(0)
        eng.run_round(1)
    print(json.dumps({"k": k, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _benign(model):
    return "tiny: 1.0" if model == "tiny" else "sharegpt: 0.9, 'aligned:donotanswer': 0.1"


def _mal(model):
    return "tiny-unaligned: 1.0" if model == "tiny" else "manyshot: 1.0"


def memory(model: str) -> dict:
    out = {}
    for k in (10, 100):
        p = subprocess.run([sys.executable, __file__, "--rss-child", str(k), "--model", model], capture_output=True,
                           text=True, check=True)
        out[k] = json.loads(p.stdout.strip().splitlines()[-1])["maxrss_mb"]
    return {"model": model, "peak_rss_mb_k10": out[10], "peak_rss_mb_k100": out[100], "ratio": out[100] / out[10],
            "target": "ratio <= 1.2"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--rss-child", type=int)
    a = ap.parse_args()
    if a.rss_child:
        _rss_child(a.model, a.rss_child)
        return
    res = {"overhead": overhead(a.model, a.steps, a.repeats), "memory": memory(a.model)}
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
