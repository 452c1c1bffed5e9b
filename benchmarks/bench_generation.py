"""Batched vs batch-size-1 generation throughput on the embedded model (target: >= 4x at batch 16, CPU).

    python benchmarks/bench_generation.py [--model smollm2-135m-instruct] [--prompts 32] [--new 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--json")
    a = ap.parse_args()
    from functools import partial

    from fedsafe.data.sources import load_source
    from fedsafe.data.templates import format_prompt
    from fedsafe.llm.hf import HFGenerator
    from fedsafe.models import load_base

    from hw import accelerator_figures, n_params

    model, tok = load_base(a.model, a.dtype)
    prompts = [r.instruction for r in load_source("strongreject")[: a.prompts]]
    fmt = partial(format_prompt, "chat", tok)
    res = {"model": a.model, "prompts": len(prompts), "max_new_tokens": a.new, "device": str(model.device),
           "threads": torch.get_num_threads(),
           "dtype": a.dtype}
    for bs in (1, a.batch):
        gen = HFGenerator(model, tok, fmt, batch_size=bs)
        gen.generate(prompts[:2], max_new_tokens=4)  # warm-up
        t0 = time.perf_counter()
        outs = gen.generate(prompts, max_new_tokens=a.new)
        dt = time.perf_counter() - t0
        ntok = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outs)
        res[f"bs{bs}"] = {"seconds": dt, "new_tokens": ntok, "tokens_per_s": ntok / dt,
                          "accelerator": accelerator_figures(ntok / dt, n_params(model), 2)}  # 2N per new token
    res["speedup"] = res[f"bs{a.batch}"]["tokens_per_s"] / res["bs1"]["tokens_per_s"]
    res["target"] = f"speedup >= 4 at batch {a.batch}"
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
