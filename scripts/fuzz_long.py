#!/usr/bin/env python
"""Long fuzzing run: the properties of ``tests/test_fuzz.py`` with many more examples.

    python scripts/fuzz_long.py --examples 2000            # every property, 2000 examples each
    python scripts/fuzz_long.py --examples 500 -k config   # only properties whose name contains "config"

Same strategies and the same contract as the test file (user input ends in a FedsafeError or success,
never another exception). Prints, per property, the examples run and how they ended (accepted or which
FedsafeError subclass), and the falsifying example of any failure; exits 1 if any property failed.
The crashes it found earlier are fixed and kept as regression cases in the test file.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="examples per property (default 2000)")
    ap.add_argument("-k", dest="select", default="", help="only properties whose name contains this")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args(argv)
    if args.examples < 1:
        ap.error("--examples must be >= 1")

    os.environ["FEDSAFE_FUZZ_EXAMPLES"] = str(args.examples)  # read by the test module at import
    os.environ.pop("FEDSAFE_DEBUG", None)
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "src"))
    import test_fuzz as tf  # noqa: E402
    from hypothesis import seed as hyp_seed

    props = [(n, f) for n, f in vars(tf).items()
             if n.startswith("test_") and hasattr(f, "hypothesis") and args.select in n]
    if not props:
        print(f"no property matches {args.select!r}", file=sys.stderr)
        return 2
    failed = []
    t_all = time.time()
    print(f"{'property':45} {'examples':>8} {'seconds':>8}  outcomes")
    for name, fn in props:
        tf.CURRENT[0] = name
        calls = collections.Counter()
        inner = fn.hypothesis.inner_test

        def counting(*a, _inner=inner, **kw):
            calls["n"] += 1
            return _inner(*a, **kw)

        fn.hypothesis.inner_test = counting
        if args.seed is not None:
            hyp_seed(args.seed)(fn)
        t0 = time.time()
        status = ""
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on with the other properties
            failed.append(name)
            status = "FAILED"
            traceback.print_exc()
        finally:
            fn.hypothesis.inner_test = inner
        outcomes = {o: c for (p, o), c in tf.STATS.items() if p == name}
        print(f"{name:45} {calls['n']:8d} {time.time() - t0:8.1f}  {status} {dict(sorted(outcomes.items()))}",
              flush=True)
    print(f"{len(props)} properties, {len(failed)} failed, {time.time() - t_all:.0f}s"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
