"""``fedsafe demo``: the paper's Table 1 in miniature, offline, in one command.

Scenarios (each a normal run directory under ``DEMO_DIR/runs/``):
  clean FedAvg (no attack) -> attacked FedAvg -> attacked + robust rules -> post-hoc defense
  (Levels 1 and 2) on the attacked FedAvg adapter. Then one report (table, plots, HTML).
Finished scenarios are skipped and interrupted ones resumed when the same DEMO_DIR is given again.

Three tiers (:data:`TIERS`) write the same report layout: ``quick`` (the structure in minutes),
``default`` and ``full`` (more seeds for the clean/attacked pair, the dose-response of the attack, all six
of the paper's robust rules, the forensic pass for the full cosine matrix).
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
from .pipeline import build_engine, defend, evaluate_run, run_or_resume, shared_start
from .report.render import render

console = Console(stderr=True)

# With 3 clients per round canonical Krum is impossible (it needs n > 2f + 2), so the demo uses the
# paper's variant (mean of the n - f models nearest the Krum choice), as the paper did.
ROBUST = [("median", "median", {}), ("krum_paper", "krum_paper", {"f": 1}), ("foolsgold", "foolsgold", {})]
# the paper's six rules (Table 1); DnC and the paper's Krum are told f = 1, as the paper's code did
ROBUST_FULL = [("median", "median", {}), ("trimmed_mean", "trimmed_mean", {}), ("krum_paper", "krum_paper", {"f": 1}),
               ("dnc", "dnc", {"f": 1}), ("foolsgold", "foolsgold", {}), ("residual", "residual", {})]


@dataclasses.dataclass(frozen=True)
class Tier:
    """What one demo runs. The first seed runs every scenario; further seeds repeat the clean and the
    attacked FedAvg, which the report pairs seed by seed. ``doses``: extra attacked FedAvg runs with exactly
    that many malicious clients in every round (the dose-response; 0 is the clean run, 1 the attacked)."""

    preset: str
    seeds: tuple[int, ...] = (0,)  # offsets from the preset's seed
    rules: tuple = tuple(ROBUST)
    doses: tuple[int, ...] = ()
    levels: tuple[int, ...] = (1, 2)
    forensic_pass: bool = False


TIERS = {
    "quick": Tier("demo-quick"),
    # Level 2 (its generator writes its data: ~5 of its ~7 min) only in --full: the default tier aims at 20 min
    "default": Tier("demo", rules=tuple(ROBUST[:2]), levels=(1,)),
    # dose 3 (every sampled client malicious) is left out: the attack is at its floor by dose 2
    "full": Tier("demo", seeds=(0, 1, 2), rules=tuple(ROBUST_FULL), doses=(2,), forensic_pass=True),
}


def scenario_configs(base: RunConfig, rules=ROBUST, start: str | None = None) -> list[tuple[str, str, RunConfig]]:
    """(slug, label, config) for every training scenario. ``start`` (see :func:`~fedsafe.pipeline.shared_start`):
    the clean run's ``init.adapter``, so that it federates from the attacked runs' start, not from one aligned
    on the other held-out records its benign-only federation leaves (the attacked configurations draw the
    same records themselves, and keep them out of their defense pools)."""
    out = []
    clean = copy.deepcopy(base)
    if start is not None:
        clean.init.adapter = start
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


def _reference_rows(base: RunConfig, runs: Path, progress: bool, start: str | None = None) -> list[Path]:
    """Rows for the model before federation: as shipped, and (with init.adapter=align) after the server's
    safety alignment (``start``, shared by every scenario), evaluated on the same held-out sets."""
    out = []
    clean = scenario_configs(base, start=start)[0][2]
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
            eng.rt.set_base_delta(None)  # both rows are on the base as shipped (a merged start is the same model)
            vec = eng.start_vec if which == "init" else None
            if vec is None:
                evaluate_run(d, cfg=clean, fed=eng.fed, rt=eng.rt, progress=progress, vec=None, base_only=True)
            else:
                evaluate_run(d, cfg=clean, fed=eng.fed, rt=eng.rt, progress=progress, vec=vec)
        atomic_write_text(d / "label.txt", label + "\n")
        out.append(d)
    return out


def dose_configs(base: RunConfig, doses) -> list[tuple[str, str, RunConfig]]:
    """Attacked FedAvg with exactly ``k`` malicious clients per round, for each ``k`` in ``doses``."""
    out = []
    for k in doses:
        c = copy.deepcopy(base)
        c.fl.sampling, c.fl.malicious_per_round = "stratified", int(k)
        out.append((f"attack_fedavg_dose{k}", f"FedAvg (attack, {k} malicious per round)",
                    dataclasses.replace(c, name=f"attack_fedavg_dose{k}").validate()))
    return out


def _train(cfg: RunConfig, d: Path, label: str, progress: bool) -> None:
    """Train + evaluate one scenario into ``d`` unless done; resume an interrupted one."""
    console.rule(f"[bold]{label}")
    run_or_resume(cfg, d, progress=progress, say=console.print)
    atomic_write_text(d / "label.txt", label + "\n")


def run_demo(preset: str = "demo", overrides: list[str] | None = None, out_dir: str | Path | None = None, *,
             quick: bool = False, full: bool = False, levels=None, progress: bool = True,
             forensic_pass: bool | None = None) -> Path:
    """Run (or resume) a demo into ``out_dir`` and render its report.

    ``quick`` / ``full`` pick the tier (:data:`TIERS`); with a preset other than ``demo`` the tier keeps
    that preset. ``levels`` and ``forensic_pass`` override the tier's. The forensic pass trains every client
    once from the attacked FedAvg's final adapter, so the report's cosine heat-map shows every pair (the
    paper's Fig. 3a); it costs about K/m rounds of training."""
    tier = TIERS["quick" if quick else "full" if full else "default"]
    levels = tier.levels if levels is None else tuple(levels)
    forensic_pass = tier.forensic_pass if forensic_pass is None else forensic_pass
    t_all = time.time()
    base = load_config(tier.preset if preset == "demo" else preset, overrides)
    root = Path(out_dir) if out_dir else Path(base.output_dir) / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    (root / "runs").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    run_dirs: list[Path] = []
    t0 = time.time()
    start = shared_start(base, root / "start", progress=progress)  # one start for every scenario of this seed
    run_dirs += _reference_rows(base, root / "runs", progress, start)
    timings["reference_rows"] = round(time.time() - t0, 1)
    scenarios = [(slug, label, cfg) for slug, label, cfg in scenario_configs(base, list(tier.rules), start)]
    scenarios += dose_configs(base, tier.doses)
    def train(slug: str, label: str, cfg: RunConfig) -> None:
        d = root / "runs" / slug
        t0 = time.time()
        _train(cfg, d, label, progress)
        timings[slug] = round(time.time() - t0, 1)
        run_dirs.append(d)

    for slug, label, cfg in scenarios:
        train(slug, label, cfg)
    # the first seed's findings are complete (defenses included) before further seeds repeat its pair, so an
    # interrupted --full already has every row of the table once
    attacked = root / "runs" / "attack_fedavg"
    for lvl in levels:
        d = root / "runs" / f"attack_fedavg_defense_L{lvl}"
        t0 = time.time()
        label = f"FedAvg (attack) + post-hoc defense L{lvl}"
        console.rule(f"[bold]{label}")
        if not (d / "results.json").exists():
            # the defense settings come from this demo's preset (not the attacked run's copy), so a resumed
            # demo picks up the current preset
            over = {k: getattr(base.defense, k)
                    for k in ("n_generated", "gen_max_new_tokens", "generator", "harmful_prompts", "aligned_ratio")}
            defend(attacked, level=lvl, out=d, progress=progress, cfg_overrides=over)
        atomic_write_text(d / "label.txt", label + "\n")
        timings[f"defense_L{lvl}"] = round(time.time() - t0, 1)
        run_dirs.append(d)
    if forensic_pass:
        t0 = time.time()
        if not (attacked / FILE).exists():
            console.rule("[bold]forensic pass: every client once from the attacked FedAvg's final adapter")
            run_forensic_pass(attacked, progress=progress)
        timings["forensic_pass"] = round(time.time() - t0, 1)
    for off in tier.seeds[1:]:  # the same clean / attacked pair on other seeds; same label -> mean ± sd rows
        seeded = dataclasses.replace(base, seed=base.seed + off)
        t0 = time.time()
        start = shared_start(seeded, root / f"start_seed{seeded.seed}", progress=progress)
        timings[f"start_seed{seeded.seed}"] = round(time.time() - t0, 1)  # that seed's server alignment
        for slug, label, cfg in scenario_configs(seeded, rules=[], start=start):
            train(f"{slug}_seed{seeded.seed}", label, cfg)
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
