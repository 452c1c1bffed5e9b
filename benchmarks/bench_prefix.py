"""Frozen-prefix caching: time per training step with LoRA on the top L layers, full forward vs cached
prefix, for L in {2, 4, 8} on the embedded model (equivalence is tested in tests/test_prefix_cache.py).

    python benchmarks/bench_prefix.py [--model smollm2-135m-instruct] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", default="2,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    a = ap.parse_args()
    from fedsafe.config import load_config
    from fedsafe.data.sources import load_source
    from fedsafe.data.templates import collate
    from fedsafe.lm import collate_prefix, prefix_hidden, response_loss
    from fedsafe.runtime import get_runtime

    recs = load_source("sharegpt")[: a.batch]
    out = {"model": a.model, "batch": a.batch, "rows": []}
    for L in [int(x) for x in a.layers.split(",")]:
        cfg = load_config("demo", [f"model.name={a.model}", f"lora.layers={L}"])
        rt = get_runtime(cfg.model, cfg.lora)
        ex = rt.tokenize(recs)
        first = rt.first_adapted_layer
        full_b = collate(ex, rt.pad_id, rt.device)
        t0 = time.perf_counter()
        pre = prefix_hidden(rt.model, ex, first, rt.device)
        t_prefix = time.perf_counter() - t0
        pre_b = collate_prefix(ex, pre, first, rt.device)
        rt.model.train()

        def step(b):
            for p in rt.handle.params:
                p.grad = None
            t = time.perf_counter()
            loss, _ = response_loss(rt.model, b)
            loss.backward()
            return time.perf_counter() - t, float(loss)

        step(full_b)
        tf, lf = zip(*[step(full_b) for _ in range(a.repeats)])
        tc, lc = zip(*[step(pre_b) for _ in range(a.repeats)])
        rt.model.eval()
        row = {"L": L, "full_s_per_step": statistics.median(tf), "cached_s_per_step": statistics.median(tc),
               "speedup": statistics.median(tf) / statistics.median(tc), "prefix_once_s": t_prefix,
               "loss_full": lf[0], "loss_cached": lc[0]}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
