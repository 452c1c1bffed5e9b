"""``fedsafe demo``: the paper's Table 1 in miniature, offline, in one command.

Scenarios (each a normal run directory under ``DEMO_DIR/runs/``):
  clean FedAvg (no attack) -> attacked FedAvg -> attacked + robust rules -> post-hoc defense
  (Levels 1 and 2) on the attacked FedAvg adapter. Then one report (table, plots, HTML).
Finished scenarios are skipped and interrupted ones resumed when the same DEMO_DIR is given again.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path

from rich.console import Console

from .config import RunConfig, dump_yaml, load_config
from .forensic_pass import FILE
from .forensic_pass import forensic_pass as run_forensic_pass
from .io import atomic_write_json, atomic_write_text
from .pipeline import build_engine, defend, evaluate_run, resume_run, start_run
from .report.render import render

console = Console(stderr=True)

# With 3 clients per round canonical Krum is impossible (it needs n > 2f + 2), so the demo uses the
# paper's variant (mean of the n - f models nearest the Krum choice), as the paper did.
ROBUST = [("median", "median", {}), ("krum_paper", "krum_paper", {"f": 1}), ("foolsgold", "foolsgold", {})]


def scenario_configs(base: RunConfig, rules=ROBUST) -> list[tuple[str, str, RunConfig]]:
    """(slug, label, config) for every training scenario."""
    out = []
    clean = copy.deepcopy(base)
    benign = next(g for g in clean.data.groups if not g.malicious)
    for g in clean.data.groups:
        if g.malicious:
            g.malicious = False
            g.mix = dict(benign.mix)
            g.name = (g.name or "group") + "-benign"
    out.append(("clean_fedavg", "FedAvg (no attack)", dataclasses.replace(clean, name="clean_fedavg")))
    out.append(("attack_fedavg", "FedAvg (attack)", dataclasses.replace(copy.deepcopy(base), name="attack_fedavg")))
    for slug, rule, params in rules:
        c = copy.deepcopy(base)
        c.fl.aggregator = rule
        c.fl.aggregator_params = dict(params)
        out.append((f"attack_{slug}", f"{rule} (attack)", dataclasses.replace(c, name=f"attack_{slug}")))
    for _, _, c in out:
        c.validate()
    return out


def _reference_rows(base: RunConfig, runs: Path, progress: bool) -> list[Path]:
    """Rows for the model before federation: as shipped, and (with init.adapter=align) after the server's
    safety alignment, evaluated on the same held-out sets."""
    out = []
    clean = scenario_configs(base)[0][2]
    eng = None
    rows = [("shipped_model", "Model as shipped (no adapter)", None)]
    if base.init.adapter:
        rows.append(("start_adapter", "Start of federation (server-aligned)", "init"))
    for slug, label, which in rows:
        d = runs / slug
        if not (d / "results.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            if eng is None:
                eng = build_engine(clean, d, progress=progress)
            atomic_write_text(d / "config.yaml", dump_yaml(clean))
            vec = eng.init_vec if which == "init" else None
            if vec is None:
                evaluate_run(d, cfg=clean, fed=eng.fed, rt=eng.rt, progress=progress, vec=None, base_only=True)
            else:
                evaluate_run(d, cfg=clean, fed=eng.fed, rt=eng.rt, progress=progress, vec=vec)
        atomic_write_text(d / "label.txt", label + "\n")
        out.append(d)
    return out


def run_demo(preset: str = "demo", overrides: list[str] | None = None, out_dir: str | Path | None = None, *,
             quick: bool = False, levels=(1, 2), progress: bool = True, forensic_pass: bool = False) -> Path:
    """``forensic_pass``: train every client once from the attacked FedAvg's final adapter, so the report's
    cosine heat-map shows every pair (the paper's Fig. 3a); costs about K/m rounds of training."""
    t_all = time.time()
    base = load_config("demo-quick" if quick and preset == "demo" else preset, overrides)
    root = Path(out_dir) if out_dir else Path(base.output_dir) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    (root / "runs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    run_dirs: list[Path] = []
    t0 = time.time()
    run_dirs += _reference_rows(base, root / "runs", progress)
    timings["reference_rows"] = round(time.time() - t0, 1)
    for slug, label, cfg in scenario_configs(base):
        d = root / "runs" / slug
        t0 = time.time()
        console.rule(f"[bold]{label}")
        if (d / "results.json").exists():
            console.print(f"done already: {d}")
        elif (d / "config.yaml").exists():
            resume_run(d, progress=progress)
        else:
            start_run(cfg, d, progress=progress)
        atomic_write_text(d / "label.txt", label + "\n")
        timings[slug] = round(time.time() - t0, 1)
        run_dirs.append(d)
    attacked = root / "runs" / "attack_fedavg"
    if forensic_pass:
        t0 = time.time()
        if not (attacked / FILE).exists():
            console.rule("[bold]forensic pass: every client once from the attacked FedAvg's final adapter")
            run_forensic_pass(attacked, progress=progress)
        timings["forensic_pass"] = round(time.time() - t0, 1)
    for lvl in levels:
        d = root / "runs" / f"attack_fedavg_defense_L{lvl}"
        t0 = time.time()
        label = f"FedAvg (attack) + post-hoc defense L{lvl}"
        console.rule(f"[bold]{label}")
        if not (d / "results.json").exists():
            # the defense settings come from this demo's preset (not the attacked run's copy), so a resumed
            # demo picks up the current preset
            over = {k: getattr(base.defense, k) for k in ("n_generated", "gen_max_new_tokens", "generator")}
            defend(attacked, level=lvl, out=d, progress=progress, cfg_overrides=over)
        atomic_write_text(d / "label.txt", label + "\n")
        timings[f"defense_L{lvl}"] = round(time.time() - t0, 1)
        run_dirs.append(d)
    t0 = time.time()
    notes = (f"Model {base.model.name}; {base.num_clients} clients ({sum(g.clients for g in base.data.groups if g.malicious)} "
             f"malicious), {base.fl.sample_clients} per round, {base.fl.rounds} rounds x {base.fl.local_steps} local steps, "
             f"LoRA r={base.lora.r} on {','.join(base.lora.target_modules)}.")
    rep = render(run_dirs, root / "report", title="fedsafe demo: safety attack and defense in FedIT (miniature)", notes=notes)
    timings["report"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - t_all, 1)
    atomic_write_json(root / "timings.json", timings)
    console.rule("[bold]timings (s)")
    for k, v in timings.items():
        console.print(f"  {k:32s} {v:8.1f}")
    print((rep / "table.md").read_text(), file=sys.stderr)
    console.print(f"report: {rep / 'index.html'}")
    return root
