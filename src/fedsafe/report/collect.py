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
    from ..fl.checkpoint import refuse_pickled

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
