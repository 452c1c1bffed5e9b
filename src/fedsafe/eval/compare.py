"""``fedsafe compare RUN_A RUN_B``: two evaluated runs, prompt by prompt.

Responses are paired by prompt id (``eval/harmful.jsonl``, ``eval/benign.jsonl`` as written by
:func:`fedsafe.eval.runner.evaluate_adapter`; ``fedsafe eval --out DIR`` writes the same files directly
into DIR). Never by position: runs evaluated on different prompts, with different judges, or not yet
evaluated are refused with one line. Several seeds per side (``RUN_A1,RUN_A2``) are paired by their
config seed, and the per-seed differences get a test of their own (:func:`fedsafe.eval.paired.seed_test`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import FedsafeError
from ..io import read_jsonl
from .paired import paired_summary, seed_test
from .stats import SAFE, UNSAFE

# results.json key -> (per-sample file stem, words for the user)
METRICS = (("refusal", "harmful", "refusal (harmful)"), ("false_refusal", "benign", "false refusal (benign)"))
METRIC_SET = {key: stem for key, stem, _ in METRICS}


def _eval_file(d: Path, stem: str) -> Path | None:
    for p in (d / "eval" / f"{stem}.jsonl", d / f"{stem}.jsonl"):
        if p.is_file():
            return p
    return None


def load_evaluated(run_dir: str | Path) -> dict:
    """A run directory's stored verdicts: ``{"dir", "label", "seed", "judge", "sets": {metric: rows}}``."""
    d = Path(run_dir)
    if not d.is_dir():
        raise FedsafeError(f"{d}: no such run directory")
    res_p = d / "results.json"
    if not res_p.is_file():
        raise FedsafeError(f"{d}: not evaluated yet (no results.json); finish it with `fedsafe run --resume {d}` "
                           f"or `fedsafe eval {d}`")
    try:
        res = json.loads(res_p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FedsafeError(f"{res_p}: unreadable ({e})") from None
    sets = {}
    for key, stem, _ in METRICS:
        if key not in res:
            continue
        p = _eval_file(d, stem)
        if p is None:
            raise FedsafeError(f"{d}: results.json has {key} but no {stem}.jsonl with the per-prompt verdicts; "
                               f"re-evaluate with `fedsafe eval {d}`")
        try:
            rows = read_jsonl(p)
        except (ValueError, OSError) as e:
            raise FedsafeError(f"{p}: unreadable ({e}); re-evaluate the run") from None
        n = (res[key] or {}).get("n")
        if n is not None and n != len(rows):
            raise FedsafeError(f"{p} has {len(rows)} verdicts but results.json counts {n}; re-evaluate the run")
        sets[key] = rows
    if not sets:
        raise FedsafeError(f"{d}: results.json holds no refusal or false-refusal evaluation")
    label_p = d / "label.txt"
    seed = None
    cfg_p = d / "config.yaml"
    if cfg_p.is_file():
        import yaml

        try:
            seed = (yaml.safe_load(cfg_p.read_text(encoding="utf-8")) or {}).get("seed")
        except (yaml.YAMLError, ValueError, OSError):
            seed = None
    return {"dir": str(d), "label": label_p.read_text().strip() if label_p.is_file() else d.name, "seed": seed,
            "judge": res.get("judge"), "sets": sets}


def _keyed(rows: list[dict], where: str) -> dict:
    """(prompt id, sample, occurrence) -> row. Occurrence numbers repeated ids (identical records)."""
    out, seen = {}, {}
    for r in rows:
        if "id" not in r or "label" not in r:
            raise FedsafeError(f"{where}: a verdict row lacks its prompt id or label; re-evaluate the run")
        k0 = (r["id"], r.get("sample", 0))
        seen[k0] = seen.get(k0, -1) + 1
        out[k0 + (seen[k0],)] = r
    return out


def _rejudge(rows: list[dict], judge: str) -> list[dict]:
    from .judges import get_judge

    verdicts = get_judge(judge).judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    return [dict(r, label=v.label, judge=judge) for r, v in zip(rows, verdicts)]


def pair_verdicts(a: dict, b: dict, key: str, judge: str | None = None) -> tuple[list[int], list[int], int]:
    """Refusal indicators of A and B on the same prompts (paired by id) and the number of pairs left out
    because a verdict was undecided (``unparsed`` / ``n/a``)."""
    where = f"{key} set"
    ra, rb = a["sets"][key], b["sets"][key]
    if judge:
        ra = ra if all(r.get("judge") == judge for r in ra) else _rejudge(ra, judge)
        rb = rb if all(r.get("judge") == judge for r in rb) else _rejudge(rb, judge)
    ka, kb = _keyed(ra, f"{a['dir']} {where}"), _keyed(rb, f"{b['dir']} {where}")
    if ka.keys() != kb.keys():
        only_a, only_b = len(ka.keys() - kb.keys()), len(kb.keys() - ka.keys())
        raise FedsafeError(f"{a['dir']} and {b['dir']} were evaluated on different {METRIC_SET[key]} prompts "
                           f"({only_a} only in A, {only_b} only in B); compare runs evaluated on the same held-out set")
    x, y, skipped = [], [], 0
    for k, r in ka.items():
        s = kb[k]
        if r.get("prompt") != s.get("prompt"):
            raise FedsafeError(f"{a['dir']} and {b['dir']}: prompt id {k[0]} has different text in the two runs")
        if r["label"] not in (SAFE, UNSAFE) or s["label"] not in (SAFE, UNSAFE):
            skipped += 1
            continue
        x.append(int(r["label"] == SAFE))
        y.append(int(s["label"] == SAFE))
    return x, y, skipped


def _check_judges(runs: list[dict], judge: str | None) -> str:
    judges = {r["judge"] for r in runs}
    if judge:
        return judge
    if len(judges) != 1:
        raise FedsafeError(f"the runs were judged by different judges ({', '.join(sorted(map(str, judges)))}); "
                           "pass --judge NAME to re-judge the stored responses with one judge")
    return judges.pop()


def compare_pair(a: dict, b: dict, judge: str | None = None, seed: int = 0) -> dict:
    """Paired comparison of two loaded runs (see :func:`load_evaluated`) on every metric both have."""
    used = _check_judges([a, b], judge)
    rejudge = used if judge else None
    out = {"a": a["dir"], "b": b["dir"], "label_a": a["label"], "label_b": b["label"], "judge": used, "metrics": {}}
    common = [k for k, _, _ in METRICS if k in a["sets"] and k in b["sets"]]
    if not common:
        raise FedsafeError(f"{a['dir']} and {b['dir']} share no evaluated prompt set (harmful or benign)")
    for key in common:
        x, y, skipped = pair_verdicts(a, b, key, rejudge)
        m = paired_summary(x, y, bootstrap_seed=seed)
        m["undecided_pairs"] = skipped
        out["metrics"][key] = m
    return out


def _split(arg: str | Path) -> list[str]:
    return [s for s in str(arg).split(",") if s]


def compare_runs(run_a: str | Path, run_b: str | Path, judge: str | None = None, seed: int = 0) -> dict:
    """``RUN_A`` vs ``RUN_B``; each may be a comma-separated list of seeds' runs (paired by config seed)."""
    side_a = [load_evaluated(p) for p in _split(run_a)]
    side_b = [load_evaluated(p) for p in _split(run_b)]
    if not side_a or not side_b:
        raise FedsafeError("give two run directories: fedsafe compare RUN_A RUN_B")
    _check_judges(side_a + side_b, judge)
    if len(side_a) == 1 and len(side_b) == 1:
        return compare_pair(side_a[0], side_b[0], judge, seed)
    seeds_a, seeds_b = [r["seed"] for r in side_a], [r["seed"] for r in side_b]
    if None in seeds_a or None in seeds_b or len(set(seeds_a)) != len(seeds_a) or len(set(seeds_b)) != len(seeds_b):
        raise FedsafeError("with several runs per side every run needs its own config seed (config.yaml)")
    if sorted(seeds_a) != sorted(seeds_b):
        raise FedsafeError(f"the two sides have different seeds ({sorted(seeds_a)} vs {sorted(seeds_b)}); "
                           "give one run per seed on each side")
    by_b = {r["seed"]: r for r in side_b}
    pairs = [dict(compare_pair(r, by_b[r["seed"]], judge, seed), seed=r["seed"])
             for r in sorted(side_a, key=lambda r: r["seed"])]
    out = {"a": [r["dir"] for r in side_a], "b": [r["dir"] for r in side_b], "label_a": side_a[0]["label"],
           "label_b": side_b[0]["label"], "judge": pairs[0]["judge"], "seeds": sorted(seeds_a), "per_seed": pairs,
           "across_seeds": {}}
    for key in pairs[0]["metrics"]:
        diffs = [p["metrics"][key]["diff"] for p in pairs if key in p["metrics"]]
        out["across_seeds"][key] = seed_test(diffs)
    return out


def _pts(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "–"
    return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def format_comparison(res: dict) -> str:
    """Plain-text table: per metric the two rates, A − B [95% CI], discordant a:b and the McNemar p."""
    lines = [f"A: {res['label_a']} ({res['a'] if isinstance(res['a'], str) else ', '.join(res['a'])})",
             f"B: {res['label_b']} ({res['b'] if isinstance(res['b'], str) else ', '.join(res['b'])})",
             f"judge: {res['judge']}; difference A − B in percentage points, 95% interval by Newcombe's method 10; "
             "a:b = prompts refused only by A : only by B; p: exact McNemar (two-sided)", ""]
    head = f"{'metric':24s} {'seed':>5s} {'n':>5s} {'A %':>6s} {'B %':>6s} {'A − B [95% CI]':>24s} {'a:b':>8s} {'p':>8s}"
    lines.append(head)
    for pair in res.get("per_seed") or [res]:
        seed = str(pair.get("seed", "")) if "per_seed" in res else ""
        for key, _, words in METRICS:
            m = pair["metrics"].get(key)
            if m is None:
                continue
            ci = f"{_pts(m['diff'], True)} [{_pts(m['ci_low'], True)}, {_pts(m['ci_high'], True)}]"
            lines.append(f"{words:24s} {seed:>5s} {m['n']:>5d} {_pts(m['rate_a']):>6s} {_pts(m['rate_b']):>6s} "
                         f"{ci:>24s} {m['only_a']:>3d}:{m['only_b']:<4d} {_p(m['p_mcnemar']):>8s}")
    if "per_seed" not in res:
        for key, _, words in METRICS:
            m = res["metrics"].get(key)
            if m:
                lo, hi = m["bootstrap_ci"]
                extra = f"; {m['undecided_pairs']} pairs with an undecided verdict left out" if m["undecided_pairs"] else ""
                lines.append(f"  {words}: paired bootstrap 95% CI [{_pts(lo, True)}, {_pts(hi, True)}] "
                             f"({m['bootstrap_reps']} resamples of the prompts, seed {m['bootstrap_seed']}){extra}")
    else:
        lines.append("")
        for key, _, words in METRICS:
            s = res["across_seeds"].get(key)
            if s:
                sd = "–" if s["sd"] is None else f"{100 * s['sd']:.1f}"
                lines.append(f"{words} across {s['k']} seeds: mean A − B {_pts(s['mean'], True)} (sd {sd}); paired "
                             f"t-test p = {_p(s['p_t'])}; sign-flip permutation p = {_p(s['p_signflip'])}")
    return "\n".join(lines)
