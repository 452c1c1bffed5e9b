"""Evaluation with the prompts' frozen-layer states memoised (``Runtime.prompt_prefill``) against an ordinary
prefill: the demo preset's model and held-out prompts, 16-token greedy decoding, batch 40.

    python benchmarks/bench_eval_memo.py [N_PROMPTS]     # default 80 (3/4 harmful, 1/4 benign)

Prints the seconds of an ordinary prefill, of the first memoised call (which fills the memo) and of a later
one, and how many responses agree. Run it on an idle machine: timings on 2 cores are not comparable beside
another job.
"""

from __future__ import annotations

import sys
import time
from functools import partial

from fedsafe.config import load_config
from fedsafe.data.partition import build_federation
from fedsafe.data.templates import format_prompt
from fedsafe.llm.hf import HFGenerator
from fedsafe.runtime import get_runtime


def main(n: int = 80) -> None:
    cfg = load_config("demo", [])
    fed = build_federation(cfg.data, seed=cfg.seed)
    rt = get_runtime(cfg.model, cfg.lora)
    prompts = [r.instruction for r in fed.eval_harmful[: n * 3 // 4] + fed.eval_benign[: n // 4]]
    out = {}
    for name, prefill in (("ordinary", None), ("memo (filling)", rt.prompt_prefill), ("memo", rt.prompt_prefill)):
        gen = HFGenerator(rt.model, rt.tokenizer, partial(format_prompt, rt.model_cfg.template, rt.tokenizer),
                          batch_size=40, prefill=prefill)
        t = time.perf_counter()
        out[name] = gen.generate(prompts, max_new_tokens=16)
        print(f"{name:16s} {time.perf_counter() - t:6.1f} s", flush=True)
    same = sum(a == b for a, b in zip(out["ordinary"], out["memo"]))
    print(f"same responses: {same} / {len(prompts)}; memo {rt._prompt_cache_bytes / 2**20:.0f} MB")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 80)
