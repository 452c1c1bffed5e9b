"""Matplotlib figures (Agg backend, PNG bytes). Each returns None when the runs lack the data."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import read_jsonl  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# Distinct marker / dash / width per line, so that lines which coincide (e.g. FedAvg and FoolsGold when
# FoolsGold keeps every weight at 1) stay visible: wider solid lines are drawn first, narrower dashed ones on top.
_STYLES = [("o", "-", 4.0, 9), ("s", "--", 3.2, 7.5), ("^", ":", 2.6, 6.5), ("D", "-.", 2.2, 5.5), ("v", "--", 1.8, 5),
           ("P", ":", 1.5, 4.5), ("X", "-.", 1.3, 4), ("*", "--", 1.1, 4)]


def refusal_by_round(runs: list[dict]) -> bytes | None:
    """Probe refusal per round, from round 0 (the start adapter, ``round: -1`` in metrics.jsonl) on."""
    fig = refusal_by_round_figure(runs)
    return None if fig is None else _png(fig)


def refusal_by_round_figure(runs: list[dict]):
    from matplotlib.ticker import MaxNLocator

    series = []
    for r in runs:
        pts = sorted({m["round"] + 1: m["probe_refusal"] for m in r["metrics"]
                      if m.get("probe_refusal") is not None}.items())
        if pts:
            series.append((r["label"], pts))
    if not series:
        return None
    # a legend note for every line hidden under an earlier identical one
    same: dict[int, list[str]] = {}
    for i, (_, pts) in enumerate(series):
        first = next(j for j, (_, q) in enumerate(series) if q == pts)
        if first != i:
            same.setdefault(first, []).append(series[i][0])
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    for i, (label, pts) in enumerate(series):
        marker, dash, width, size = _STYLES[i % len(_STYLES)]
        x, y = zip(*pts)
        first = next(j for j, (_, q) in enumerate(series) if q == pts)
        name = label if first == i else f"{label} (= {series[first][0]})"
        ax.plot(x, [100 * v for v in y], marker=marker, linestyle=dash, linewidth=width, markersize=size,
                label=name, zorder=2 + i, alpha=0.9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    xmax = max(p[0] for _, pts in series for p in pts)
    ax.set_xlim(min(p[0] for _, pts in series for p in pts) - 0.3, xmax + 0.3)
    ax.set_xlabel("round (0 = start adapter, before federation)")
    ax.set_ylabel("refusal on probe prompts (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if same:
        ax.set_title("identical curves are drawn on top of each other; the legend marks them with '='", fontsize=8)
    return fig


def methods_bar(runs: list[dict]) -> bytes | None:
    from .collect import table_rows

    rows = table_rows(runs)
    if not rows:
        return None
    labels = [r["method"] for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    for off, key, colour, name in ((-0.2, "refusal", "#2b7bba", "refusal on harmful ↑"),
                                   (0.2, "false_refusal", "#e08a2b", "false refusal on benign ↓")):
        vals = [r.get(key) or 0 for r in rows]
        err = None
        if all(r.get(f"{key}_ci") for r in rows):
            err = np.array([[v - r[f"{key}_ci"][0], r[f"{key}_ci"][1] - v] for v, r in zip(vals, rows)]).T
        elif all(r.get(f"{key}_std") is not None for r in rows):
            err = [r[f"{key}_std"] for r in rows]
        ax.bar(x + off, vals, 0.4, yerr=err, capsize=3, color=colour, label=name)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def malicious_per_round(cfg: dict) -> int | None:
    """Malicious clients in every round of a run's config (None when it varies, i.e. random sampling)."""
    fl = cfg.get("fl") or {}
    groups = (cfg.get("data") or {}).get("groups") or []
    n_mal = sum(g.get("clients", 0) for g in groups if g.get("malicious"))
    if n_mal == 0:
        return 0
    if fl.get("sampling") != "stratified":
        return None
    if fl.get("malicious_per_round") is not None:
        return int(fl["malicious_per_round"])
    k = sum(g.get("clients", 0) for g in groups)
    return round(fl.get("sample_clients", 0) * n_mal / max(k, 1))


def dose_points(runs: list[dict]) -> dict[int, list[dict]]:
    """Trained FedAvg runs without a defense, grouped by malicious clients per round (the paper's Table 7)."""
    out: dict[int, list[dict]] = {}
    for r in runs:
        cfg = r["config"]
        if not r["metrics"] or r.get("defense") or (cfg.get("fl") or {}).get("aggregator") != "mean":
            continue
        if (cfg.get("fl") or {}).get("fed_alg", "fedavg") != "fedavg" or "refusal" not in r["results"]:
            continue
        dose = malicious_per_round(cfg)
        if dose is not None:
            out.setdefault(dose, []).append(r)
    return out


def dose_response(runs: list[dict]) -> bytes | None:
    """Refusal (95% Wilson interval; one dot per seed) against malicious clients per round; needs >= 3 doses."""
    pts = dose_points(runs)
    if len(pts) < 3:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    doses = sorted(pts)
    for key, colour, name in (("refusal", "#2b7bba", "refusal on harmful ↑"),
                              ("false_refusal", "#e08a2b", "false refusal on benign ↓")):
        means = []
        for dose in doses:
            vals = [100 * r["results"][key]["rate"] for r in pts[dose] if key in r["results"]]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
            if len(pts[dose]) == 1 and key in pts[dose][0]["results"]:
                s = pts[dose][0]["results"][key]
                ax.errorbar([dose], [100 * s["rate"]], yerr=[[100 * (s["rate"] - s["ci_low"])],
                                                              [100 * (s["ci_high"] - s["rate"])]],
                            color=colour, capsize=4, fmt="none")
            else:
                ax.scatter([dose] * len(vals), vals, color=colour, s=14, alpha=0.6)
        ax.plot(doses, means, marker="o", color=colour, label=name)
    ax.set_xticks(doses)
    ax.set_xlabel("malicious clients per round (of %d sampled)" % (runs[0]["config"].get("fl") or {}).get("sample_clients", 0))
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("FedAvg: dose-response of the attack (bars: 95% Wilson; dots: seeds)", fontsize=9)
    return _png(fig)


def _forensics(run: dict) -> list[dict]:
    from pathlib import Path

    p = Path(run["dir"]) / "forensics.jsonl"
    return read_jsonl(p, tolerate_torn_tail=True) if p.exists() else []


def _forensics_full(run: dict) -> dict | None:
    import json
    from pathlib import Path

    p = Path(run["dir"]) / "forensics_full.json"  # fedsafe.forensic_pass.FILE
    return json.loads(p.read_text()) if p.exists() else None


def _sampled_mean_cosine(rows: list[dict]):
    """Mean pairwise cosine over the rounds in which both clients were sampled (NaN: never met)."""
    K = 1 + max(c for f in rows for c in f["clients"])
    S, C = np.zeros((K, K)), np.zeros((K, K))
    mal = set()
    for f in rows:
        ids = f["clients"]
        cos = np.array(f["cosine"])
        for a, i in enumerate(ids):
            if f["malicious"][a]:
                mal.add(i)
            for b, j in enumerate(ids):
                S[i, j] += cos[a, b]
                C[i, j] += 1
    return np.where(C > 0, S / np.maximum(C, 1), np.nan), mal


def _attacked(label: str) -> bool:
    lab = label.lower()
    return "attack" in lab and "no attack" not in lab and "defense" not in lab


def cosine_heatmap(runs: list[dict]) -> bytes | None:
    """Pairwise cosine of client updates: the full matrix of a forensic pass (every client trained once
    from the same adapter) when a run has one, else the mean over rounds in which both were sampled."""
    cand = [r for r in runs if "fedavg" in r["label"].lower() and _attacked(r["label"])]
    cand = cand + [r for r in runs if r not in cand]
    full = next(((r, f) for r in cand if (f := _forensics_full(r)) is not None), None)
    if full is not None:
        run, f = full
        M, mal = np.array(f["cosine"]), {c for c, m in zip(f["clients"], f["malicious"]) if m}
        ids = list(f["clients"])
        where = "final global adapter" if f.get("at") == "final" else "start adapter"
        title = f"update cosine, every client trained once from the {where}\n{run['label']}"
    else:
        run, rows = next(((r, rows) for r in cand if (rows := _forensics(r))), (None, None))
        if run is None:
            return None
        M, mal = _sampled_mean_cosine(rows)
        ids = list(range(M.shape[0]))
        title = f"update cosine, mean over rounds both were sampled (blank: never met)\n{run['label']}"
    K = len(ids)
    fig, ax = plt.subplots(figsize=(5.8, 5.0))
    off = M[~np.eye(K, dtype=bool)] if K > 1 else M.ravel()
    lo = float(np.nanmin(off)) if np.isfinite(off).any() else -1.0
    hi = float(np.nanmax(off)) if np.isfinite(off).any() else 1.0
    # colour range from the off-diagonal entries (the diagonal is 1 and would wash out the contrast)
    im = ax.imshow(M, cmap="viridis", vmin=lo, vmax=max(hi, lo + 1e-6))
    ticks = [f"{i}*" if i in mal else str(i) for i in ids]
    ax.set_xticks(range(K), ticks, fontsize=7)
    ax.set_yticks(range(K), ticks, fontsize=7)
    for t in ax.get_xticklabels() + ax.get_yticklabels():
        if t.get_text().endswith("*"):
            t.set_color("#c0392b")
            t.set_fontweight("bold")
    ax.set_xlabel("client (* red: malicious)", fontsize=8)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def client_weights(runs: list[dict]) -> bytes | None:
    panels = []
    for run in runs:
        rows = _forensics(run)
        if not rows or "defense" in run["label"].lower():
            continue
        K = 1 + max(c for f in rows for c in f["clients"])
        s, n, mal = np.zeros(K), np.zeros(K), set()
        for f in rows:
            for c, w, m in zip(f["clients"], f["client_weights"], f["malicious"]):
                s[c] += w
                n[c] += 1
                if m:
                    mal.add(c)
        if not mal:
            continue
        panels.append((run["label"], np.where(n > 0, s / np.maximum(n, 1), 0), mal))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (label, w, mal) in zip(axes[0], panels):
        ax.bar(range(len(w)), w, color=["#c0392b" if i in mal else "#2b7bba" for i in range(len(w))])
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("client", fontsize=8)
        ax.set_xticks(range(len(w)))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("mean weight when sampled")
    return _png(fig)
