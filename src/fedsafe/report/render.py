"""Render a report: Table-1-style table (markdown, CSV, JSON), plots (PNG) and one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .collect import fmt_rate, load_run, table_rows

COLUMNS = [("method", "Method"), ("refusal", "Refusal on harmful ↑ (%)"), ("false_refusal", "False refusal on benign ↓ (%)"),
           ("ref_nll", "Ref. NLL ↓")]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        nll = "–" if r.get("ref_nll") is None else f"{r['ref_nll']:.3f}"
        lines.append(f"| {r['method']} | {fmt_rate(r, 'refusal')} | {fmt_rate(r, 'false_refusal')} | {nll} |")
    n_h = next((r.get("refusal_n") for r in rows if r.get("refusal_n")), None)
    n_b = next((r.get("false_refusal_n") for r in rows if r.get("false_refusal_n")), None)
    judge = next((r.get("judge") for r in rows if r.get("judge")), "rule")
    lines.append("")
    lines.append(f"Judge: `{judge}`; n = {n_h} harmful and {n_b} benign prompts; brackets: 95% Wilson interval"
                 " (multi-seed rows: mean ± std). Ref. NLL: mean per-token NLL of held-out reference answers.")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = ["method", "seeds", "refusal", "refusal_ci", "refusal_std", "refusal_n", "false_refusal", "false_refusal_ci",
            "false_refusal_std", "false_refusal_n", "ref_nll", "judge"]
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (";".join(f"{x:.2f}" for x in r[k]) if isinstance(r.get(k), list) else r.get(k)) for k in keys})
    return buf.getvalue()


def render(run_dirs: list[str | Path], out_dir: str | Path, title: str = "fedsafe report", notes: str = "") -> Path:
    from . import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(d) for d in run_dirs]
    rows = table_rows(runs)
    md = markdown_table(rows)
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", write_csv(rows))
    atomic_write_json(out / "table.json", {"rows": rows})
    figs = {}
    for name, fn in (("refusal_by_round", plots.refusal_by_round), ("methods", plots.methods_bar),
                     ("cosine_heatmap", plots.cosine_heatmap), ("client_weights", plots.client_weights)):
        png = fn(runs)
        if png is not None:
            atomic_write_bytes(out / f"{name}.png", png)
            figs[name] = png
    from . import matrix

    m = matrix.build(runs)  # only for sweeps with an attack axis
    if m is not None:
        atomic_write_text(out / "matrix.md", matrix.markdown(m))
        atomic_write_json(out / "matrix.json", m)
        figs["attack_matrix"] = matrix.heatmap(m)
        atomic_write_bytes(out / "attack_matrix.png", figs["attack_matrix"])
    atomic_write_text(out / "index.html", _html(title, md, rows, figs, notes))
    return out


_CAPTIONS = {
    "refusal_by_round": "Refusal rate on the server's probe prompts after each monitored round, per scenario.",
    "methods": "Safety (refusal on harmful prompts, higher is better) and helpfulness proxy (false refusal on "
               "benign prompts, lower is better) per method, with 95% intervals.",
    "cosine_heatmap": "Pairwise cosine similarity of client updates (attacked FedAvg; malicious clients marked *), "
                      "cf. the paper's Fig. 3a: no benign/malicious clusters.",
    "attack_matrix": "Refusal on harmful prompts for every defense x attack cell (mean over seeds); the last "
                     "column is each defense's worst case over the attacks (matrix.md has false refusal too).",
    "client_weights": "Mean weight each robust rule gave each client over the rounds it was sampled "
                      "(malicious clients in red), cf. the paper's Fig. 3b.",
}


def _html(title: str, md: str, rows: list[dict], figs: dict[str, bytes], notes: str) -> str:
    th = "".join(f"<th>{html.escape(c[1])}</th>" for c in COLUMNS)
    trs = []
    for r in rows:
        nll = "–" if r.get("ref_nll") is None else f"{r['ref_nll']:.3f}"
        cells = [html.escape(str(r["method"])), fmt_rate(r, "refusal"), fmt_rate(r, "false_refusal"), nll]
        trs.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    foot = html.escape(md.strip().splitlines()[-1])
    imgs = "".join(
        f'<figure><img alt="{k}" src="data:image/png;base64,{base64.b64encode(v).decode()}"/>'
        f"<figcaption>{html.escape(_CAPTIONS.get(k, k))}</figcaption></figure>"
        for k, v in figs.items()
    )
    notes_html = f"<p>{html.escape(notes)}</p>" if notes else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}th,td{{border:1px solid #ccc;padding:.35em .7em;text-align:left}}
th{{background:#f3f3f3}}figure{{margin:1.5em 0}}img{{max-width:100%;border:1px solid #eee}}
figcaption{{color:#555;font-size:.9em}}</style></head><body>
<h1>{html.escape(title)}</h1>{notes_html}
<table id="results"><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>
<p><small>{foot}</small></p>{imgs}</body></html>
"""
