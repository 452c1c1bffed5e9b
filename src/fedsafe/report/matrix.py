"""Defense x attack matrix of a sweep: refusal (and false refusal) per cell, each defense's worst case.

A sweep with an attack axis (``--grid attack.behaviour=data,alie,...``) labels every cell
``key=value, key=value``; the ``attack.*`` assignments name the column, everything else the row (the
defense: aggregator, projection, post-hoc level, ...). Cells average their seeds. A defense's worst case is
its lowest refusal over the attacks it was run against: the number a deployer facing the strongest
attacker in the grid should read.
"""

from __future__ import annotations

from collections import defaultdict


def split_label(label: str) -> tuple[str, str]:
    """``(defense, attack)`` parts of a sweep cell label (``"-"`` when a part has no assignment)."""
    parts = [p.strip() for p in label.split(",") if p.strip()]
    att = [p for p in parts if p.startswith("attack.")]
    dfn = [p for p in parts if not p.startswith("attack.")]
    strip = lambda ps: ", ".join(p.split("=", 1)[-1] if p.count("=") == 1 else p for p in ps)  # noqa: E731
    return strip(dfn) or "-", strip(att) or "-"


def build(runs: list[dict]) -> dict | None:
    """``{"defenses", "attacks", "refusal", "false_refusal", "worst"}`` (rates in %) or None without an attack axis."""
    cells: dict[tuple[str, str], list[dict]] = defaultdict(list)
    defenses, attacks = [], []
    for r in runs:
        d, a = split_label(r["label"])
        if d not in defenses:
            defenses.append(d)
        if a not in attacks:
            attacks.append(a)
        cells[(d, a)].append(r["results"])
    if len(attacks) < 2 or attacks == ["-"]:
        return None
    out: dict = {"defenses": defenses, "attacks": attacks, "refusal": {}, "false_refusal": {}, "worst": {}}
    for key in ("refusal", "false_refusal"):
        for d in defenses:
            row = []
            for a in attacks:
                vals = [res.get(key, {}).get("rate") for res in cells.get((d, a), [])]
                vals = [v for v in vals if v is not None]
                row.append(100.0 * sum(vals) / len(vals) if vals else None)
            out[key][d] = row
    for d in defenses:
        pairs = [(v, a) for v, a in zip(out["refusal"][d], attacks) if v is not None]
        v, a = min(pairs) if pairs else (None, None)
        out["worst"][d] = {"refusal": v, "attack": a}
    return out


def markdown(m: dict) -> str:
    lines = []
    for key, title in (("refusal", "Refusal on harmful prompts (%, higher is safer)"),
                       ("false_refusal", "False refusal on benign prompts (%, lower is more helpful)")):
        head = ["defense \\ attack"] + m["attacks"] + (["worst case (attack)"] if key == "refusal" else [])
        lines += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for d in m["defenses"]:
            cells = ["–" if v is None else f"{v:.1f}" for v in m[key][d]]
            if key == "refusal":
                w = m["worst"][d]
                cells.append("–" if w["refusal"] is None else f"**{w['refusal']:.1f}** ({w['attack']})")
            lines.append("| " + " | ".join([d] + cells) + " |")
        lines.append("")
    return "\n".join(lines)


def heatmap(m: dict) -> bytes:
    from .plots import _png, np, plt

    data = np.array([[np.nan if v is None else v for v in m["refusal"][d]] + [m["worst"][d]["refusal"] or np.nan]
                     for d in m["defenses"]], dtype=float)
    cols = m["attacks"] + ["worst case"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.5 * len(m["defenses"]) + 1.8))
    im = ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(m["defenses"])), m["defenses"])
    ax.axvline(len(cols) - 1.5, color="black", lw=2)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="refusal on harmful prompts (%)")
    ax.set_title("defense x attack: refusal (worst case per defense in the last column)")
    return _png(fig)
