"""Read run directories into table rows (one per scenario; mean ± std over seeds)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import yaml

from ..errors import FedsafeError
from ..eval.stats import mean_std
from ..io import read_jsonl


def load_run(d: str | Path) -> dict:
    d = Path(d)
    res_p = d / "results.json"
    if not res_p.exists():
        raise FedsafeError(f"{d}: no results.json (the run has not been evaluated; `fedsafe eval {d}`)")
    from ..rundir import refuse_pickled

    refuse_pickled(d)  # never render a run directory that carries a pickle checkpoint
    res = json.loads(res_p.read_text())
    cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").exists() else {}
    label_p = d / "label.txt"
    label = label_p.read_text().strip() if label_p.exists() else cfg.get("name", d.name)
    metrics = read_jsonl(d / "metrics.jsonl", tolerate_torn_tail=True) if (d / "metrics.jsonl").exists() else []
    defense = json.loads((d / "defense.json").read_text()) if (d / "defense.json").exists() else None
    return {"dir": str(d), "label": label, "results": res, "config": cfg, "metrics": metrics, "defense": defense}


def _pct(x):
    return None if x is None else 100.0 * x


def table_rows(runs: list[dict]) -> list[dict]:
    """Group runs by label; single runs report rate [Wilson CI], groups report mean ± std over seeds."""
    groups: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for r in runs:
        if r["label"] not in groups:
            order.append(r["label"])
        groups[r["label"]].append(r)
    rows = []
    for label in order:
        rs = groups[label]
        row: dict = {"method": label, "seeds": len(rs)}
        for key, name in (("refusal", "refusal"), ("false_refusal", "false_refusal")):
            vals = [r["results"].get(key, {}).get("rate") for r in rs]
            if len(rs) == 1:
                s = rs[0]["results"].get(key) or {}
                row[name] = _pct(s.get("rate"))
                row[f"{name}_ci"] = [_pct(s.get("ci_low")), _pct(s.get("ci_high"))]
                row[f"{name}_n"] = s.get("n")
            else:
                m, sd = mean_std(vals)
                row[name], row[f"{name}_std"] = _pct(m), _pct(sd)
                row[f"{name}_n"] = rs[0]["results"].get(key, {}).get("n")
        nll = [r["results"].get("ref_nll") for r in rs]
        m, sd = mean_std(nll)
        row["ref_nll"] = m
        if len(rs) > 1:
            row["ref_nll_std"] = sd
        row["judge"] = rs[0]["results"].get("judge")
        row["runs"] = [r["dir"] for r in rs]
        rows.append(row)
    return rows


def fmt_rate(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    if f"{key}_std" in row:
        return f"{v:.1f} ± {row[f'{key}_std']:.1f}"
    lo, hi = row.get(f"{key}_ci", [None, None])
    return f"{v:.1f} [{lo:.1f}, {hi:.1f}]" if lo is not None else f"{v:.1f}"


# The demo's two reference scenarios (demo.py labels them; a plain `fedsafe run` keeps its config name).
CLEAN_LABELS = ("FedAvg (no attack)", "clean_fedavg")
ATTACKED_LABELS = ("FedAvg (attack)", "attack_fedavg")
VS = (("vs_clean", CLEAN_LABELS), ("vs_attacked", ATTACKED_LABELS))


def add_comparisons(runs: list[dict], rows: list[dict], seed: int = 0) -> None:
    """Give every row ``vs_clean`` / ``vs_attacked``: this row minus the reference, paired on the same prompts.

    One run per side, or one run against the same seed's run of a multi-seed reference: difference
    [Newcombe 95% CI], discordant counts and exact McNemar p per metric. Several seeds per side: runs paired
    by config seed, mean difference and the tests on the per-seed differences. A pair that cannot be
    compared (other prompts, other judge) gets ``{"error": reason}``.
    """
    from ..eval.compare import compare_pair, load_evaluated
    from ..eval.paired import seed_test

    loaded: dict[str, dict] = {}

    def load(r):
        if r["dir"] not in loaded:
            loaded[r["dir"]] = load_evaluated(r["dir"])
        return loaded[r["dir"]]

    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_label[r["label"]].append(r)
    for col, names in VS:
        ref_label = next((n for n in names if n in by_label), None)
        if ref_label is None:
            continue
        refs = by_label[ref_label]
        for row in rows:
            if row["method"] == ref_label:
                continue
            try:
                row[col] = _compare_group(by_label[row["method"]], refs, load, compare_pair, seed_test, seed)
            except FedsafeError as e:
                row[col] = {"error": str(e)}
            row[col]["reference"] = ref_label


def _compare_group(group, refs, load, compare_pair, seed_test, seed) -> dict:
    if len(group) == 1 and len(refs) == 1:
        pairs = [(group[0], refs[0])]
    else:
        ref_by_seed = {r["config"].get("seed"): r for r in refs}
        pairs = [(r, ref_by_seed.get(r["config"].get("seed"))) for r in group]
        pairs = [(r, s) for r, s in pairs if s is not None]
    if not pairs:
        raise FedsafeError("no seed in common with the reference")
    if len(pairs) == 1:  # one run per side (or one seed of a multi-seed reference): paired prompt by prompt
        return dict(compare_pair(load(pairs[0][0]), load(pairs[0][1]), seed=seed)["metrics"])
    per_seed = [compare_pair(load(r), load(s), seed=seed)["metrics"] for r, s in pairs]
    out = {}
    for key in per_seed[0]:
        out[key] = dict(seed_test([m[key]["diff"] for m in per_seed if key in m]), per_seed=[m.get(key) for m in per_seed])
    return out


def fmt_vs(row: dict, col: str, key: str = "refusal") -> str:
    """``-10.0 [-18.1, -2.0] p=0.039`` (one seed) or ``-10.0 ± 3.1, p=0.04 (3 seeds)``; '–' when absent."""
    c = row.get(col)
    if not c or "error" in c or key not in c:
        return "–"
    m = c[key]
    if "k" in m:  # across seeds
        if m["mean"] is None:
            return "–"
        sd = "" if m["sd"] is None else f" ± {100 * m['sd']:.1f}"
        p = m["p_t"] if m["p_t"] is not None else m["p_signflip"]
        return f"{100 * m['mean']:+.1f}{sd}, p={_fmt_p(p)} ({m['k']} seeds)"
    return f"{100 * m['diff']:+.1f} [{100 * m['ci_low']:+.1f}, {100 * m['ci_high']:+.1f}] p={_fmt_p(m['p_mcnemar'])}"


def _fmt_p(p) -> str:
    if p is None:
        return "–"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"
