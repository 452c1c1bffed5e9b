"""Where one engine round's time goes, at bench_peer.py's settings (demo sizes, frozen-prefix cache on).

    python benchmarks/profile_round.py [--model smollm2-135m-instruct] [--round 1] [--top 25] [--lazy]

Builds the same engine as bench_peer.py's "ours" side (lower-layer states of every record computed up front;
``--lazy``: computed when a round first meets a record), runs the rounds before ``--round`` unprofiled, then
profiles that round with cProfile and prints the functions with the most cumulative time, plus the split the
issue asks about: computing lower-layer states of records met for the first time vs training the top layers vs
everything else (validation, aggregation, checkpoint).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from bench_peer import _cfg

    from fedsafe import runtime
    from fedsafe.fl import train
    from fedsafe.pipeline import build_engine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lazy", action="store_true", help="fl.prefix_precompute=never: lower-layer states computed "
                    "when a round first meets a record (bench_peer precomputes them all before round 0)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spent = {"prefix": 0.0, "train_local": 0.0}
    wrap = {"prefix": (runtime, "prefix_hidden"), "train_local": (train, "train_local")}
    for key, (mod, name) in wrap.items():
        fn = getattr(mod, name)

        def timed(*args, _fn=fn, _key=key, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                spent[_key] += time.perf_counter() - t0

        setattr(mod, name, timed)
    from fedsafe.fl import engine as engine_mod

    engine_mod.train_local = train.train_local  # the engine imported the name before the wrap
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["fl.prefix_precompute=never"] if a.lazy else []
        eng = build_engine(_cfg(a.model, a.round + 1, extra, prefix_cache=True), tmp, progress=False)
        eng.precompute_prefix()  # not part of any round (a no-op with --lazy)
        for r in range(a.round):
            eng.run_round(r)
        spent.update(prefix=0.0, train_local=0.0)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        eng.run_round(a.round)
        prof.disable()
        total = time.perf_counter() - t0
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(a.top)
    print(s.getvalue())
    pre = spent["prefix"]
    print(f"round {a.round}: {total:.2f} s wall; lower-layer states of new records {pre:.2f} s "
          f"({pre / total:.0%}); train_local (top layers, incl. those states) {spent['train_local']:.2f} s; "
          f"rest {total - spent['train_local']:.2f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
