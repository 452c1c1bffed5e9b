"""The pipeline: one federation from a config to an evaluated (and, if asked, defended) run directory.

This layer sits above ``fl/`` (the engine), ``eval/``, ``defense/`` and ``attack/`` and wires them
together; the CLI, ``demo``, ``sweep`` and the Flower apps call it and nothing below it. It is also the
Python API for notebooks and scripts::

    from fedsafe.config import load_config
    from fedsafe import pipeline

    cfg = load_config("tiny", ["fl.rounds=2", "defense.enabled=true"])
    done = pipeline.run(cfg)                    # train, evaluate, post-hoc defense (defense.enabled)
    done.results["refusal"]["rate"]             # the attacked run's refusal rate
    done.defense_dir                            # the defended sibling run directory
    pipeline.evaluate(done.run_dir)             # re-evaluate (e.g. after changing eval.* in config.yaml)
    pipeline.defend(done.run_dir, level=2)      # another post-hoc defense of the same run
    pipeline.compare([done.run_dir, done.defense_dir])   # table rows, as ``fedsafe report`` shows them

Every function writes the run-directory layout of :mod:`fedsafe.rundir`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .attack.data import apply_benign_mix
from .config import RunConfig
from .data.partition import Federation, build_federation
from .defense.align import initial_vec, reserve
from .defense.classifier import make_classifier_fn
from .defense.finetune import defend_run, inline_defense_hook
from .defense.probe import make_probe_fn
from .defense.projection import projection_hook
from .defense.root import make_root_fn
from .eval.compare import compare_runs
from .eval.runner import evaluate_run, make_monitor
from .fl.engine import Engine, rule_needs
from .io import atomic_write_json
from .report.collect import load_run, table_rows
from .rundir import (
    CONFIG,
    FINAL_ADAPTER,
    RESULTS,
    START_ADAPTER,
    TRAIN_SUMMARY,
    load_run_config,
    set_up_run_dir,
    write_run_header,
)
from .runtime import Runtime, get_runtime

__all__ = [
    "Finished",
    "build_engine",
    "compare",
    "defend",
    "defend_run",
    "evaluate",
    "evaluate_run",
    "finish_run",
    "paired",
    "resume",
    "resume_run",
    "run_or_resume",
    "run",
    "save_final",
    "start_run",
]


@dataclass
class Finished:
    """What a finished run produced: its directory, its evaluation (None with ``evaluate=False``) and
    the post-hoc defense's run directory (None unless ``defense.enabled``)."""

    run_dir: Path
    results: dict | None = None
    defense_dir: Path | None = None
    defense_results: dict | None = None


def shared_start(cfg: RunConfig, out_dir: Path, *, progress: bool = True) -> str:
    """The server-aligned start of ``cfg`` (``init.adapter: align``), saved once as an adapter directory in
    ``out_dir``; returns what ``init.adapter`` should name so that other scenarios federate from that same
    start ("" when ``cfg`` has no aligned start, a path when it already names one).

    Why: the alignment records are drawn from the held-out pools, which hold what the clients did not
    get, so a clean variant of a federation (its would-be malicious clients given benign data) draws
    other records and would align a *different* start; a clean-vs-attacked comparison would then mix the
    attack with the difference between two starts. The server deploys one model: every scenario of a demo
    or sweep starts from the attacked configuration's start."""
    if cfg.init.adapter != "align":
        return cfg.init.adapter
    out = Path(out_dir).resolve()  # the scenarios' config.yaml name it: a resume from elsewhere must find it
    if not (out / "adapter_model.safetensors").exists():
        fed = build_federation(cfg.data, seed=cfg.seed)  # what build_engine aligns on, without an engine
        records = reserve(cfg, fed)
        rt = get_runtime(cfg.model, cfg.lora)
        rt.set_base_delta(None)
        rt.handle.save_adapter(out, initial_vec(cfg, fed, rt, records, progress=progress))
    return str(out)


def build_engine(cfg: RunConfig, run_dir: Path, *, progress: bool = True, **kw: Any) -> Engine:
    """The engine for ``cfg`` with every server-side hook the config asks for: the server's safety
    alignment of the starting adapter (``init``), probe-set monitoring (``monitor``), FLTrust root
    updates, safety-probe scores, and the in-training defense (``defense.every_rounds``).

    ``kw`` goes to :class:`~fedsafe.fl.engine.Engine` (``update_hook``, ``round_callback``).
    """
    fed = build_federation(cfg.data, seed=cfg.seed)
    align_records = reserve(cfg, fed)
    apply_benign_mix(cfg.attack.benign_mix, cfg.seed, fed)
    rt = get_runtime(cfg.model, cfg.lora)
    if "round_callback" not in kw:
        kw["round_callback"] = make_monitor(cfg, fed, rt)
    eng = Engine(cfg, run_dir, fed, rt, progress=progress, **kw)
    rt.set_base_delta(None)  # the server aligns the base as loaded, whatever an earlier run in this process folded in
    eng.start_vec = initial_vec(cfg, fed, rt, align_records, progress=progress)
    if cfg.init.merged:  # the start becomes part of the base model; the federation trains a fresh LoRA on it
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        rt.handle.save_adapter(Path(run_dir) / START_ADAPTER, eng.start_vec)  # readers of the run need it
        rt.set_base_delta(eng.start_vec)
        eng.global_vec = rt.init_vec(cfg.seed)
    else:
        eng.global_vec = eng.start_vec.clone()
    eng.init_vec = eng.global_vec.clone()
    needs = rule_needs(eng.rule)
    if cfg.fl.aggregator == "fltrust" or "root_update" in needs:
        eng.root_fn = make_root_fn(eng)
    if "probe_scores" in needs:
        eng.probe_fn = make_probe_fn(rt, fed)
    if "labelled_updates" in needs:
        eng.classifier_fn = make_classifier_fn(eng)
    if cfg.defense.projection:
        eng.post_aggregate.append(projection_hook(cfg, eng))
    if cfg.defense.every_rounds > 0:
        eng.post_aggregate.append(inline_defense_hook(cfg, fed, rt))
    return eng


def start_run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    **kw: Any,
) -> Path:
    """Train a new federation into ``run_dir`` (default ``OUTPUT_DIR/NAME-TIMESTAMP``), then
    :func:`finish_run`. Returns the run directory."""
    return run(cfg, run_dir, overwrite=overwrite, progress=progress, evaluate=evaluate, **kw).run_dir


def run_or_resume(
    cfg: RunConfig, run_dir: str | Path, *, progress: bool = True, say: Callable[[str], None] = print
) -> Path:
    """The scenario step of demos and sweeps: train and evaluate ``cfg`` into ``run_dir`` unless it has
    finished (``results.json``), resuming an interrupted run (``config.yaml`` but no results)."""
    d = Path(run_dir)
    if (d / RESULTS).exists():
        say(f"finished already: {d}")
    elif (d / CONFIG).exists():
        resume_run(d, progress=progress)
    else:
        start_run(cfg, d, progress=progress)
    return d


def resume_run(run_dir: str | Path, *, progress: bool = True, evaluate: bool = True, **kw: Any) -> Path:
    """Continue an interrupted run from its last complete checkpoint, then :func:`finish_run`.
    Returns the run directory."""
    return resume(run_dir, progress=progress, evaluate=evaluate, **kw).run_dir


def resume(run_dir: str | Path, *, progress: bool = True, evaluate: bool = True, **kw: Any) -> Finished:
    """Like :func:`resume_run`, but returns everything the run produced (:class:`Finished`)."""
    d = Path(run_dir)
    cfg = load_run_config(d)
    eng = build_engine(cfg, d, progress=progress, **kw)
    if not (d / "clients.json").exists():
        write_run_header(cfg, d, eng.fed)
    nxt = eng.try_resume()
    if progress:
        print(f"resuming {d} at round {nxt + 1}/{cfg.fl.rounds}")
    return _train_and_finish(eng, evaluate)


def run(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    **kw: Any,
) -> Finished:
    """Like :func:`start_run`, but returns everything the run produced (:class:`Finished`)."""
    with set_up_run_dir(cfg, run_dir, overwrite) as d:  # refused while set up: leaves no directory behind
        eng = build_engine(cfg, d, progress=progress, **kw)
        write_run_header(cfg, d, eng.fed)
    return _train_and_finish(eng, evaluate)


def _train_and_finish(eng: Engine, evaluate: bool) -> Finished:
    t0 = time.time()
    final = eng.run()
    save_final(eng, final, t0)
    return finish_run(eng.run_dir, eng.cfg, eng.fed, eng.rt, evaluate=evaluate, progress=eng.progress)


def save_final(eng: Engine, final: torch.Tensor, t0: float, **summary: Any) -> None:
    """Write ``final_adapter/`` and ``train_summary.json`` (``summary``: extra keys, e.g. the engine)."""
    cfg = eng.cfg
    eng.rt.handle.save_adapter(eng.run_dir / FINAL_ADAPTER, final)
    atomic_write_json(
        eng.run_dir / TRAIN_SUMMARY,
        {
            "rounds": cfg.fl.rounds,
            "seconds_this_session": time.time() - t0,
            "adapter_numel": int(final.numel()),
            **summary,
        },
    )


def finish_run(
    run_dir: Path,
    cfg: RunConfig,
    fed: Federation,
    rt: Runtime,
    *,
    evaluate: bool = True,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> Finished:
    """Everything after the last round, the same for every engine: the final evaluation (``results.json``,
    ``eval/``) and, with ``defense.enabled``, the paper's post-hoc defense (Ye et al., ICLR 2025, §5) into
    a sibling run directory (:func:`fedsafe.defense.finetune.defend_run`), evaluated too when
    ``evaluate``. ``say`` receives one line before each step (the Flower server logs them)."""
    out = Finished(Path(run_dir))
    if evaluate:
        if say is not None:
            say("evaluating the final adapter")
        out.results = evaluate_run(out.run_dir, cfg=cfg, fed=fed, rt=rt, progress=progress)
    if cfg.defense.enabled:
        if say is not None:
            say(f"post-hoc defense (level {cfg.defense.level}, {cfg.defense.steps} steps)")
        out.defense_dir = defend_run(out.run_dir, progress=progress, evaluate=evaluate)
        if evaluate:
            out.defense_results = load_run(out.defense_dir)["results"]
    return out


def evaluate(run_dir: str | Path, *, progress: bool = True, vec: torch.Tensor | None = None, tag: str = "") -> dict:
    """Evaluate a run directory's final adapter (or ``vec``) on its held-out sets; writes
    ``{tag}results.json`` and returns it."""
    return evaluate_run(Path(run_dir), progress=progress, vec=vec, tag=tag)


def defend(
    run_dir: str | Path,
    *,
    level: int | None = None,
    steps: int | None = None,
    n: int | None = None,
    out: str | Path | None = None,
    generator: str | None = None,
    sweep: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    cfg_overrides: dict | None = None,
) -> Path:
    """The post-hoc defense of a finished run (``fedsafe defend``); returns the defended run directory."""
    return defend_run(
        run_dir,
        level=level,
        steps=steps,
        n=n,
        out=out,
        generator=generator,
        sweep=sweep,
        progress=progress,
        evaluate=evaluate,
        cfg_overrides=cfg_overrides,
    )


def compare(run_dirs: list[str | Path]) -> list[dict]:
    """One table row per scenario (mean ± std over seeds sharing a label) for evaluated run directories,
    the rows ``fedsafe report`` renders."""
    return table_rows([load_run(d) for d in run_dirs])


def paired(run_a: str | Path, run_b: str | Path, *, judge: str | None = None, seed: int = 0) -> dict:
    """``fedsafe compare``: two evaluated runs (or comma-joined seeds of each) prompt by prompt: rates,
    A - B with a 95% CI, discordant counts and the exact McNemar p (:func:`fedsafe.eval.compare.compare_runs`)."""
    return compare_runs(run_a, run_b, judge=judge, seed=seed)
