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


def refusal_by_round(runs: list[dict]) -> bytes | None:
    series = []
    for r in runs:
        pts = [(m["round"] + 1, m["probe_refusal"]) for m in r["metrics"] if m.get("probe_refusal") is not None]
        if pts:
            series.append((r["label"], pts))
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, pts in series:
        x, y = zip(*pts)
        ax.plot(x, [100 * v for v in y], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("refusal on probe prompts (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


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


def _forensics(run: dict) -> list[dict]:
    from pathlib import Path

    p = Path(run["dir"]) / "forensics.jsonl"
    return read_jsonl(p, tolerate_torn_tail=True) if p.exists() else []


def cosine_heatmap(runs: list[dict]) -> bytes | None:
    """Mean pairwise cosine of client updates, over the rounds in which both were sampled."""
    def attacked(label: str) -> bool:
        lab = label.lower()
        return "attack" in lab and "no attack" not in lab and "defense" not in lab

    cand = [r for r in runs if "fedavg" in r["label"].lower() and attacked(r["label"])]
    cand = cand or [r for r in runs if _forensics(r)]
    for run in cand:
        rows = _forensics(run)
        if not rows:
            continue
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
        M = np.where(C > 0, S / np.maximum(C, 1), np.nan)
        fig, ax = plt.subplots(figsize=(5.5, 4.6))
        im = ax.imshow(M, cmap="viridis", vmin=np.nanmin(M) if np.isfinite(M).any() else -1, vmax=1)
        ticks = [f"{i}*" if i in mal else str(i) for i in range(K)]
        ax.set_xticks(range(K), ticks, fontsize=7)
        ax.set_yticks(range(K), ticks, fontsize=7)
        ax.set_title(f"update cosine similarity: {run['label']}", fontsize=9)
        fig.colorbar(im, ax=ax)
        return _png(fig)
    return None


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
