"""Render a report: Table-1-style table (markdown, CSV, JSON), plots (PNG) and one self-contained HTML page."""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .collect import VS, add_comparisons, fmt_rate, fmt_vs, load_run, table_rows

COLUMNS = [("method", "Method"), ("refusal", "Refusal on harmful ↑ (%)"), ("false_refusal", "False refusal on benign ↓ (%)"),
           ("ref_nll", "Ref. NLL ↓")]
VS_HEADERS = {"vs_clean": "vs clean (Δ points [95% CI], p)", "vs_attacked": "vs attacked (Δ points [95% CI], p)"}


def _vs_columns(rows: list[dict]) -> list[str]:
    """The comparison columns that some row has (none when the runs hold no clean / attacked FedAvg)."""
    return [col for col, _ in VS if any(col in r for r in rows)]


def _vs_cell(row: dict, col: str, sep: str) -> str:
    if col not in row:
        return "–"
    if "error" in row[col]:
        return "n/a"
    return f"refusal {fmt_vs(row, col, 'refusal')}{sep}false ref. {fmt_vs(row, col, 'false_refusal')}"


def _cells(r: dict, vs_cols: list[str], sep: str) -> list[str]:
    nll = "–" if r.get("ref_nll") is None else f"{r['ref_nll']:.3f}"
    return ([str(r["method"]), fmt_rate(r, "refusal"), fmt_rate(r, "false_refusal"), nll]
            + [_vs_cell(r, c, sep) for c in vs_cols])


def markdown_table(rows: list[dict]) -> str:
    vs_cols = _vs_columns(rows)
    names = [c[1] for c in COLUMNS] + [VS_HEADERS[c] for c in vs_cols]
    head = "| " + " | ".join(names) + " |"
    sep = "|" + "|".join("---" for _ in names) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_cells(r, vs_cols, "; ")) + " |")
    n_h = next((r.get("refusal_n") for r in rows if r.get("refusal_n")), None)
    n_b = next((r.get("false_refusal_n") for r in rows if r.get("false_refusal_n")), None)
    judge = next((r.get("judge") for r in rows if r.get("judge")), "rule")
    lines.append("")
    lines.append(f"Judge: `{judge}`; n = {n_h} harmful and {n_b} benign prompts; brackets: 95% Wilson interval"
                 " (multi-seed rows: mean ± std). Ref. NLL: mean per-token NLL of held-out reference answers."
                 + (" vs clean / vs attacked: this row minus that FedAvg run on the same prompts, in points, 95% interval"
                    " by Newcombe's method 10 for paired proportions, p from the exact McNemar test (multi-seed: mean ±"
                    " sd of the per-seed differences, paired t-test p)." if vs_cols else ""))
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    keys = ["method", "seeds", "refusal", "refusal_ci", "refusal_std", "refusal_n", "false_refusal", "false_refusal_ci",
            "false_refusal_std", "false_refusal_n", "ref_nll", "judge"]
    vs_cols = _vs_columns(rows)
    vs_keys = [f"{c}_{m}" for c in vs_cols for m in ("refusal", "false_refusal")]
    w = csv.DictWriter(buf, fieldnames=keys + vs_keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        d = {k: (";".join(f"{x:.2f}" for x in r[k]) if isinstance(r.get(k), list) else r.get(k)) for k in keys}
        d.update({f"{c}_{m}": fmt_vs(r, c, m) for c in vs_cols for m in ("refusal", "false_refusal")})
        w.writerow(d)
    return buf.getvalue()


def render(run_dirs: list[str | Path], out_dir: str | Path, title: str = "fedsafe report", notes: str = "",
           matrix_reference: str | None = None) -> Path:
    from . import plots

    runs = [load_run(d) for d in run_dirs]  # every run directory checked before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(runs)
    add_comparisons(runs, rows)
    md = markdown_table(rows)
    atomic_write_text(out / "table.md", md)
    atomic_write_text(out / "table.csv", write_csv(rows))
    atomic_write_json(out / "table.json", {"rows": rows})
    figs = {}
    for name, fn in (("refusal_by_round", plots.refusal_by_round), ("methods", plots.methods_bar),
                     ("dose_response", plots.dose_response), ("cosine_heatmap", plots.cosine_heatmap),
                     ("client_weights", plots.client_weights)):
        png = fn(runs)
        if png is not None:
            atomic_write_bytes(out / f"{name}.png", png)
            figs[name] = png
    from . import matrix

    m = matrix.build(runs, reference=matrix_reference)  # only for sweeps with an attack axis
    if m is not None:
        atomic_write_text(out / "matrix.md", matrix.markdown(m))
        atomic_write_json(out / "matrix.json", m)
        figs["attack_matrix"] = matrix.heatmap(m)
        atomic_write_bytes(out / "attack_matrix.png", figs["attack_matrix"])
    atomic_write_text(out / "index.html", _html(title, md, rows, figs, notes))
    return out


_CAPTIONS = {
    "refusal_by_round": "Refusal rate on the server's probe prompts at the start (round 0: the start adapter) and "
                        "after each monitored round, per scenario. Identical curves overlap; the legend marks them "
                        "with '=' and each line has its own marker and dash.",
    "methods": "Safety (refusal on harmful prompts, higher is better) and helpfulness proxy (false refusal on "
               "benign prompts, lower is better) per method, with 95% intervals.",
    "dose_response": "Attacked FedAvg with 0 (the clean run), 1, 2, ... malicious clients in every round, same "
                     "federation and prompts: refusal falls as the dose rises if the attack causes the drop "
                     "(cf. the paper's Table 7).",
    "cosine_heatmap": "Pairwise cosine similarity of client updates (attacked FedAvg; malicious clients marked *), "
                      "cf. the paper's Fig. 3a: no benign/malicious clusters. After a forensic pass "
                      "(fedsafe.forensic_pass) every client has trained once from the same global adapter and "
                      "every pair is shown; otherwise only pairs sampled in the same round are.",
    "attack_matrix": "Refusal on harmful prompts for every defense x attack cell (mean over seeds); the last "
                     "column is each defense's worst case over the attacks (matrix.md has false refusal too). "
                     "Cells marked † do not differ significantly from the no-defense row under the same attack "
                     "(exact McNemar on the same prompts, p ≥ 0.05).",
    "client_weights": "Mean weight each robust rule gave each client over the rounds it was sampled "
                      "(malicious clients in red), cf. the paper's Fig. 3b.",
}


def _html(title: str, md: str, rows: list[dict], figs: dict[str, bytes], notes: str) -> str:
    vs_cols = _vs_columns(rows)
    th = "".join(f"<th>{html.escape(c)}</th>" for c in [c[1] for c in COLUMNS] + [VS_HEADERS[c] for c in vs_cols])
    trs = []
    for r in rows:
        cells = [html.escape(c).replace("\n", "<br>") for c in _cells(r, vs_cols, "\n")]
        trs.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
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
