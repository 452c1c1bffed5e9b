"""Peer benchmark: an OpenFedLLM-style FedIT loop on TRL against fedsafe's engine, per round, side by side.

    python benchmarks/bench_peer.py [--model smollm2-135m-instruct|tiny] [--rounds 3] [--threads 1]
        [--set KEY=VALUE ...] [--json OUT]

The peer reproduces OpenFedLLM's ``main_sft.py`` round with the TRL 1.16 API: for each sampled client,
load the global adapter (``set_peft_model_state_dict``), draw this round's subset (``random.seed(round)``,
``batch_size * grad_accum * max_steps`` records), build a *new* ``SFTTrainer`` on the same peft model (which
re-tokenises the subset), ``train()``, copy ``get_peft_model_state_dict``; then sample-weighted FedAvg.
Ours is ``Engine.run_round`` (tokenised once per run; frozen-prefix states of every client record computed once
up front, ``fl.prefix_precompute=always``, timed separately as a one-off; then the full forward, no cache). Both sides use the
same base model object, LoRA adapter, client records, sampled clients, steps, batch size, length and
learning rate. Rounds are interleaved (order rotated each round) after one warm-up round; medians reported.
Target (issue 19): ours >= 3x faster per round (was 1.5x). Needs the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch

TARGET = 3.0  # raised from 1.5 (issue 19)
NOTES = [
    "Peer: a new TRL SFTTrainer per client per round on the same peft model (OpenFedLLM main_sft.py), "
    "prompt/completion dataset = completion-only loss (TRL's replacement for DataCollatorForCompletionOnlyLM).",
    "Peer runs fp32 without gradient checkpointing, like ours (TRL defaults bf16=True and gradient_checkpointing=True; "
    "OpenFedLLM defaults to checkpointing too): the comparison does not lean on settings that only slow the peer.",
    "First-round losses should be in the same range, not equal: TRL averages per-step token means, draws a "
    "different subset (random.seed(round)) and re-tokenises prompt+completion jointly.",
    "Ours includes everything Engine.run_round does (validation, aggregation, metrics, a checkpoint every round); "
    "its frozen-prefix hidden states of every client record are computed once before round 0 in one batched pass "
    "(fl.prefix_precompute=always; 'auto' does so when a run draws at least as many records as the clients hold), "
    "reported as a one-off beside the per-round figures; rounds then run only the adapted top layers.",
    "Wall and process CPU seconds per round, interleaved, 1 torch thread by default (--threads): on a shared machine "
    "OpenMP threads that lose their core stall the others; one thread's CPU seconds track the work done.",
]


def _machine() -> dict:
    import peft
    import transformers
    import trl

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _cfg(model: str, rounds: int, extra: list[str], prefix_cache: bool):
    from fedsafe.config import load_config

    # demo sizes (m=3, 4 steps, batch 8, length 128, 100 samples/client, LoRA r=16 on the top 8 layers);
    # tiny: the tiny preset with LoRA on its top layer so the prefix cache has something to skip.
    # Fresh LoRA (no server alignment) and no per-round monitor: OpenFedLLM does neither.
    base = ["lora.layers=1"] if model == "tiny" else []
    return load_config("tiny" if model == "tiny" else "demo", base + [
        f"model.name={model}", "monitor.every=0", "init.adapter=", f"fl.rounds={rounds}",
        f"fl.prefix_cache={str(prefix_cache).lower()}"] + (["fl.prefix_precompute=always"] if prefix_cache else []) + extra)


def _client_dataset(tok, examples):
    """One HF Dataset per client, built once (OpenFedLLM's local_datasets). Texts are fedsafe's template
    rendering decoded from its tokenised examples, so both sides train on the same (truncated) sequences."""
    from datasets import Dataset

    from fedsafe.data.templates import IGNORE

    prompts, completions = [], []
    for ex in examples:
        n = sum(1 for x in ex.labels if x == IGNORE)
        prompts.append(tok.decode(ex.input_ids[:n]))
        completions.append(tok.decode(ex.input_ids[n:]))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def peer_round(rt, cfg, datasets: list, sizes: list[int], global_sd: dict, sampled: list[int], rnd: int,
               out_dir: str) -> tuple[dict, float, float]:
    """One OpenFedLLM round; returns the new global adapter state dict, the mean client training loss and the
    seconds spent building trainers (config, dataset preparation = re-tokenising, accelerator)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from fedsafe.lm import cosine_lr

    fl, model = cfg.fl, rt.model
    lr = cosine_lr(rnd, fl.rounds, fl.lr, fl.lr_min, fl.lr_schedule)  # cosine over rounds, constant within
    local, losses, setup = {}, [], 0.0
    for cid in sampled:
        set_peft_model_state_dict(model, global_sd)
        need = fl.batch_size * fl.grad_accum * fl.local_steps  # get_dataset_this_round
        random.seed(rnd)
        sub = datasets[cid].select(random.sample(range(len(datasets[cid])), min(need, len(datasets[cid]))))
        args = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=fl.batch_size, gradient_accumulation_steps=fl.grad_accum,
            max_steps=fl.local_steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=fl.weight_decay, max_grad_norm=fl.max_grad_norm, optim="adamw_torch",
            max_length=cfg.model.seq_length, completion_only_loss=True, packing=False,
            gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=rt.device.type == "cpu",
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=cfg.seed + rnd)
        t0 = time.perf_counter()
        trainer = SFTTrainer(model=model, args=args, train_dataset=sub, processing_class=rt.tokenizer)
        trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the bar for a print of the final metrics
        setup += time.perf_counter() - t0
        losses.append(trainer.train().training_loss)
        local[cid] = copy.deepcopy(get_peft_model_state_dict(model))
    # OpenFedLLM global_aggregate, fedavg: weights = client sample counts
    tot = sum(sizes[c] for c in sampled)
    new = {k: sum(local[c][k] * (sizes[c] / tot) for c in sampled) for k in global_sd}
    set_peft_model_state_dict(model, new)
    return new, sum(losses) / len(losses), setup


def run(model: str, rounds: int, extra: list[str], threads: int) -> dict:
    from fedsafe.fl.engine import sample_clients
    from fedsafe.pipeline import build_engine

    torch.set_num_threads(threads)
    load0 = os.getloadavg()[0]
    total = rounds + 1  # round 0 warms up every path (allocator, first trainer, first prefix states)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = _cfg(model, total, extra, prefix_cache=True)
        ours = build_engine(cfg, os.path.join(tmp, "ours"), progress=False)
        full = build_engine(_cfg(model, total, extra, prefix_cache=False), os.path.join(tmp, "full"), progress=False)
        rt = ours.rt  # one shared base + LoRA adapter: the same model object for all three
        assert full.rt is rt and torch.equal(ours.global_vec, full.global_vec)
        up_front = ours.precompute_prefix()  # the one-off pass (run_round would do it before round 0), timed alone
        print(f"up front: {up_front}", flush=True)
        fl = cfg.fl
        datasets = [_client_dataset(rt.tokenizer, ex) for ex in ours.examples]
        peer_sd = rt.handle.state_dict(ours.global_vec)  # the same starting adapter
        times = {"peer": [], "ours": [], "full": []}
        cpu = {"peer": [], "ours": [], "full": []}  # process CPU seconds: what a round costs, whoever else runs
        loss0, setup = {}, []

        def do_peer(rnd):
            nonlocal peer_sd
            sampled = sample_clients(cfg.seed, rnd, ours.K, fl.sample_clients, ours.malicious, fl.sampling)
            peer_sd, loss, s = peer_round(rt, cfg, datasets, ours.sizes, peer_sd, sampled, rnd,
                                          os.path.join(tmp, "trl"))
            setup.append(s)
            return loss

        sides = [("peer", do_peer), ("ours", lambda r: ours.run_round(r)["train_loss"]),
                 ("full", lambda r: full.run_round(r)["train_loss"])]
        for rnd in range(total):
            for name, fn in sides[rnd % 3:] + sides[:rnd % 3]:  # rotate the order: no side always runs first
                t0, c0 = time.perf_counter(), time.process_time()
                loss = fn(rnd)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if rnd == 0:
                    loss0[name] = loss
                else:
                    times[name].append(dt)
                    cpu[name].append(dc)
            print(f"round {rnd}{' (warm-up)' if rnd == 0 else ''}: " + ", ".join(
                f"{k} {v[-1]:.2f}s wall {cpu[k][-1]:.2f}s cpu" for k, v in times.items() if rnd and v), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    mc = {k: statistics.median(v) for k, v in cpu.items()}
    return {"rounds": rounds, "warmup_rounds": 1, "peer_s_per_round": med["peer"], "ours_s_per_round": med["ours"],
            "ours_full_forward_s_per_round": med["full"], "speedup": med["peer"] / med["ours"],
            "speedup_full_forward": med["peer"] / med["full"], "target": TARGET,
            "peer_cpu_s_per_round": mc["peer"], "ours_cpu_s_per_round": mc["ours"],
            "ours_full_forward_cpu_s_per_round": mc["full"], "speedup_cpu": mc["peer"] / mc["ours"],
            "speedup_full_forward_cpu": mc["peer"] / mc["full"], "threads": threads,
            "peer_trainer_setup_s_per_round": statistics.median(setup[1:]),
            "prefix_up_front": up_front,
            "load_average_1min": {"start": load0, "end": os.getloadavg()[0]},
            "per_round_s": times, "per_round_cpu_s": cpu,
            "first_round_loss": {"peer": loss0["peer"], "ours": loss0["ours"], "ours_full_forward": loss0["full"]},
            "settings": {"model": model, "clients": ours.K, "clients_per_round": fl.sample_clients,
                         "local_steps": fl.local_steps, "batch_size": fl.batch_size, "grad_accum": fl.grad_accum,
                         "seq_length": cfg.model.seq_length, "samples_per_client": cfg.data.samples_per_client,
                         "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "layers": cfg.lora.layers,
                                  "target_modules": cfg.lora.target_modules},
                         "lr": fl.lr, "lr_min": fl.lr_min, "overrides": extra},
            "notes": NOTES}


def render(result: dict) -> list[str]:
    """Markdown section body for benchmarks/results.md."""
    r, s = result, result["settings"]
    loss, load = r["first_round_loss"], r["load_average_1min"]
    return [
        "| per round (median) | wall s | peer ÷ this | CPU s | peer ÷ this (CPU) | target |",
        "|---|---|---|---|---|---|",
        f"| peer: TRL `SFTTrainer` per client per round (OpenFedLLM) | {r['peer_s_per_round']:.2f} | 1.00 | "
        f"{r['peer_cpu_s_per_round']:.2f} | 1.00 | |",
        f"| fedsafe engine (frozen-prefix states precomputed) | {r['ours_s_per_round']:.2f} | {r['speedup']:.2f}x | "
        f"{r['ours_cpu_s_per_round']:.2f} | {r['speedup_cpu']:.2f}x | >= {r['target']}x |",
        f"| fedsafe engine, `fl.prefix_cache=false` (full forward) | {r['ours_full_forward_s_per_round']:.2f} | "
        f"{r['speedup_full_forward']:.2f}x | {r['ours_full_forward_cpu_s_per_round']:.2f} | "
        f"{r['speedup_full_forward_cpu']:.2f}x | |", "", *_up_front_lines(r),
        f"Of the peer's round, {r['peer_trainer_setup_s_per_round']:.2f} s is building the {s['clients_per_round']} "
        "trainers (dataset preparation = re-tokenising each client's subset); the rest is `trainer.train()` "
        "and FedAvg.",
        "",
        f"Median of {r['rounds']} rounds after 1 warm-up, interleaved in one process; {s['model']}, "
        f"{s['clients_per_round']} clients/round x {s['local_steps']} steps x batch {s['batch_size']}, length "
        f"{s['seq_length']}, LoRA r={s['lora']['r']} on the top {s['lora']['layers']} layers. First-round mean loss "
        f"peer {loss['peer']:.3f} / ours {loss['ours']:.3f} (same range expected, not equality: sampling and "
        f"loss averaging differ). {r['threads']} torch thread(s); 1-min load average {load['start']:.1f} -> "
        f"{load['end']:.1f} on {r.get('machine', {}).get('cpus', '?')} CPUs (CPU seconds are the steadier figure "
        "when the machine is shared; with several torch threads they also count spin-waits).", ""]


def _up_front_lines(r: dict) -> list[str]:
    u = r.get("prefix_up_front") or {}
    if not u.get("done"):
        return [f"Frozen-prefix states were not precomputed ({u.get('reason', 'no prefix cache')}).", ""]
    saved = r["ours_full_forward_s_per_round"] - r["ours_s_per_round"]
    even = f"{u['seconds'] / saved:.1f} rounds" if saved > 0 else "never"
    return [f"One-off, before round 0: the lower-layer states of all {u['records']} client records ({u['mb']:.0f} MB "
            f"float32) in one batched pass took {u['seconds']:.2f} s wall / {u['cpu_seconds']:.2f} s CPU; against "
            f"the full forward it pays for itself after {even} (wall). Lazily (`fl.prefix_precompute=never`) the "
            "same work is spread over the rounds that first meet each record.", ""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=3, help="measured rounds (+1 warm-up)")
    # 1 thread by default: on a shared machine, OpenMP threads that lose their core stall each other and wall
    # times jump 5x at random; one thread keeps the interleaved rounds comparable. With more threads the compute
    # shrinks and the peer's single-threaded trainer setup does not, so 1 thread is also the conservative choice.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, see comment)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    ap.add_argument("--json")
    a = ap.parse_args()
    try:
        import datasets
        import trl  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench_peer.py needs TRL and datasets ({e.name} is missing): pip install -e '.[bench]'")
    # a trainer per client per round would print its config, dataset progress bars and advisories every time
    import transformers

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    res = run(a.model, a.rounds, a.set, a.threads)
    res["machine"] = _machine()
    print("\n".join(render(res)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
