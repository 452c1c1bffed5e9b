"""Defense x attack matrix of a sweep: refusal (and false refusal) per cell, each defense's worst case.

A sweep with an attack axis (``--grid attack.behaviour=data,alie,...``) labels every cell
``key=value, key=value``; the ``attack.*`` assignments name the column, everything else the row (the
defense: aggregator, projection, post-hoc level, ...). Cells average their seeds. A defense's worst case is
its lowest refusal over the attacks it was run against: the number a deployer facing the strongest
attacker in the grid should read.

Significance: every cell is compared with the *reference* row ("no defense": plain FedAvg, no projection,
no in-training or post-hoc defense; or the row named by ``reference``) under the same attack, prompt by
prompt (:func:`fedsafe.eval.compare.pair_verdicts`: pairs by prompt id, never by position) and seed by seed
(config seed). The discordant counts are summed over the seeds and tested with the exact McNemar test
(:func:`fedsafe.eval.paired.mcnemar_exact`; with one seed this is exactly ``fedsafe compare``'s p). Cells
with ``p >= alpha`` are marked as not significantly different from no defense. No correction for the
number of cells is applied: a mark says "this difference could be noise", the absence of one is no proof.
"""

from __future__ import annotations

from collections import defaultdict

from ..errors import FedsafeError

METRICS = ("refusal", "false_refusal")
NS = "†"  # marks a cell whose difference from the reference is not significant


def split_label(label: str) -> tuple[str, str]:
    """``(defense, attack)`` parts of a sweep cell label (``"-"`` when a part has no assignment)."""
    parts = [p.strip() for p in label.split(",") if p.strip()]
    att = [p for p in parts if p.startswith("attack.")]
    dfn = [p for p in parts if not p.startswith("attack.")]
    strip = lambda ps: ", ".join(p.split("=", 1)[-1] if p.count("=") == 1 else p for p in ps)  # noqa: E731
    return strip(dfn) or "-", strip(att) or "-"


def undefended(cfg: dict) -> bool:
    """Whether a run's config (``config.yaml`` as a dict) is "no defense": plain FedAvg aggregation, no
    safety projection, no in-training and no post-hoc defense."""
    fl, de = cfg.get("fl") or {}, cfg.get("defense") or {}
    return (fl.get("aggregator", "mean") == "mean" and not de.get("projection", False)
            and not de.get("enabled", False) and not de.get("every_rounds", 0))


def find_reference(defenses: list[str], cells: dict, reference: str | None) -> tuple[str | None, str]:
    """The reference row and, when there is none, why (for the report)."""
    if reference is not None:
        if reference not in defenses:
            raise FedsafeError(f"matrix reference {reference!r} is not a defense row; rows: {', '.join(defenses)}")
        return reference, ""
    found = [d for d in defenses
             if all(r.get("config") and undefended(r["config"]) for k, rs in cells.items() if k[0] == d for r in rs)]
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, "no row is plain FedAvg without any defense (fl.aggregator=mean, no projection, no defense)"
    return None, f"several rows are undefended FedAvg ({', '.join(found)}); name one as the reference"


def _paired_p(group: list[dict], refs: list[dict], key: str, load) -> dict:
    """Exact McNemar over all (seed, prompt) pairs of a cell and the reference cell under the same attack."""
    from ..eval.compare import _check_judges, pair_verdicts
    from ..eval.paired import mcnemar_exact

    by_seed = {(r.get("config") or {}).get("seed"): r for r in refs}
    b = c = n = seeds = 0
    for r in group:
        s = by_seed.get((r.get("config") or {}).get("seed"))
        if s is None:
            continue
        a, ref = load(r), load(s)
        if key not in a["sets"] or key not in ref["sets"]:
            continue
        _check_judges([a, ref], None)
        x, y, _skipped = pair_verdicts(a, ref, key)
        b += sum(1 for u, v in zip(x, y) if u and not v)
        c += sum(1 for u, v in zip(x, y) if v and not u)
        n += len(x)
        seeds += 1
    if not seeds:
        return {"p": None, "why": "no evaluated seed in common with the reference"}
    return {"p": mcnemar_exact(b, c), "only_cell": b, "only_reference": c, "pairs": n, "seeds": seeds}


def build(runs: list[dict], reference: str | None = None, alpha: float = 0.05) -> dict | None:
    """``{"defenses", "attacks", "refusal", "false_refusal", "worst", "reference", "tests"}`` (rates in %) or
    None without an attack axis. ``tests[metric][defense]``: per attack, the paired test against the
    reference row (``p``, discordant counts; ``None`` for the reference itself or a cell that cannot be paired)."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    defenses, attacks = [], []
    for r in runs:
        d, a = split_label(r["label"])
        if d not in defenses:
            defenses.append(d)
        if a not in attacks:
            attacks.append(a)
        cells[(d, a)].append(r)
    if len(attacks) < 2 or attacks == ["-"]:
        return None
    out: dict = {"defenses": defenses, "attacks": attacks, "refusal": {}, "false_refusal": {}, "worst": {}}
    for key in METRICS:
        for d in defenses:
            row = []
            for a in attacks:
                vals = [r["results"].get(key, {}).get("rate") for r in cells.get((d, a), [])]
                vals = [v for v in vals if v is not None]
                row.append(100.0 * sum(vals) / len(vals) if vals else None)
            out[key][d] = row
    for d in defenses:
        pairs = [(v, a) for v, a in zip(out["refusal"][d], attacks) if v is not None]
        v, a = min(pairs) if pairs else (None, None)
        out["worst"][d] = {"refusal": v, "attack": a}
    ref, why = find_reference(defenses, cells, reference)
    out.update(reference=ref, alpha=alpha, tests={k: {} for k in METRICS})
    if ref is None:
        out["no_tests"] = why
        return out
    loaded: dict[str, dict] = {}

    def load(r: dict) -> dict:
        from ..eval.compare import load_evaluated

        if r["dir"] not in loaded:
            loaded[r["dir"]] = load_evaluated(r["dir"])
        return loaded[r["dir"]]

    for key in METRICS:
        for d in defenses:
            row = []
            for a in attacks:
                group, refs = cells.get((d, a), []), cells.get((ref, a), [])
                if d == ref or not group or not refs or any("dir" not in r for r in group + refs):
                    row.append(None)
                    continue
                try:
                    row.append(_paired_p(group, refs, key, load))
                except FedsafeError as e:  # other prompts, other judges: say so instead of testing
                    row.append({"p": None, "why": str(e)})
            out["tests"][key][d] = row
    return out


def not_significant(m: dict, key: str, d: str, j: int) -> bool:
    """Cell (defense ``d``, attack column ``j``) was tested and its difference from the reference is not significant."""
    t = (m.get("tests", {}).get(key, {}).get(d) or [None] * len(m["attacks"]))[j]
    return bool(t) and t.get("p") is not None and t["p"] >= m.get("alpha", 0.05)


def markdown(m: dict) -> str:
    lines = []
    ref = m.get("reference")
    for key, title in (("refusal", "Refusal on harmful prompts (%, higher is safer)"),
                       ("false_refusal", "False refusal on benign prompts (%, lower is more helpful)")):
        head = ["defense \\ attack"] + m["attacks"] + (["worst case (attack)"] if key == "refusal" else [])
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for d in m["defenses"]:
            cells = ["–" if v is None else f"{v:.1f}" + (NS if not_significant(m, key, d, j) else "")
                     for j, v in enumerate(m[key][d])]
            if key == "refusal":
                w = m["worst"][d]
                mark = NS if w["attack"] is not None and not_significant(m, key, d, m["attacks"].index(w["attack"])) else ""
                cells.append("–" if w["refusal"] is None else f"**{w['refusal']:.1f}**{mark} ({w['attack']})")
            name = f"{d} (reference)" if d == ref else d
            lines.append("| " + " | ".join([name] + cells) + " |")
        lines.append("")
    if ref is not None:
        lines.append(f"{NS}: not significantly different from the reference row `{ref}` (no defense) under the same "
                     f"attack: exact McNemar test on the same prompt ids, discordant pairs summed over the seeds, "
                     f"p ≥ {m.get('alpha', 0.05):g}; no correction for the number of cells.")
    elif m.get("no_tests"):
        lines.append(f"No significance marks: {m['no_tests']}.")
    return "\n".join(lines) + "\n"


def heatmap(m: dict) -> bytes:
    from .plots import _png, np, plt

    data = np.array([[np.nan if v is None else v for v in m["refusal"][d]] + [m["worst"][d]["refusal"] or np.nan]
                     for d in m["defenses"]], dtype=float)
    cols = m["attacks"] + ["worst case"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.5 * len(m["defenses"]) + 2.0))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    rows = [f"{d} (ref.)" if d == m.get("reference") else d for d in m["defenses"]]
    ax.set_yticks(range(len(m["defenses"])), rows)
    ax.axvline(len(cols) - 1.5, color="black", lw=2)
    for i, d in enumerate(m["defenses"]):
        w = m["worst"][d]["attack"]
        for j in range(data.shape[1]):
            if np.isnan(data[i, j]):
                continue
            col = j if j < len(m["attacks"]) else (m["attacks"].index(w) if w is not None else None)
            ns = col is not None and not_significant(m, "refusal", d, col)
            ax.text(j, i, f"{data[i, j]:.0f}" + (NS if ns else ""), ha="center", va="center", fontsize=8,
                    style="italic" if ns else "normal")
    fig.colorbar(im, ax=ax, label="refusal on harmful prompts (%)")
    title = "defense x attack: refusal (worst case per defense in the last column)"
    if m.get("reference") is not None:
        title += f"\n{NS}: not significant vs. {m['reference']} (exact McNemar, p ≥ {m.get('alpha', 0.05):g})"
    ax.set_title(title, fontsize=9)
    return _png(fig)
