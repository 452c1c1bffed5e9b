"""The fedsafe ``ServerApp`` (Flower Message API, flwr >= 1.20).

Reads the fedsafe configuration from the run config (``fedsafe-config``, ``overrides``; see
``[tool.flwr.app.config]`` in ``flower-app/pyproject.toml``), creates the run directory, and runs the
federation with :class:`fedsafe.flower.strategy.FedsafeStrategy` on a server-side
:class:`fedsafe.fl.engine.Engine`. The run directory has the layout of ``fedsafe run``
(:mod:`fedsafe.rundir`): ``config.yaml``, ``clients.json``, ``data_manifest.json``, ``metrics.jsonl``,
``forensics.jsonl``, ``checkpoints/``, ``final_adapter/``, ``train_summary.json`` and, after the final
evaluation, ``eval/`` and ``results.json``; plus ``flower.json`` (which node held which client, nodes
with a bad node config, rejected replies per round, the Flower version and federation). With
``defense.enabled`` the paper's post-hoc defense (Ye et al., ICLR 2025, §5) runs after the last round
into a sibling directory named in ``flower.json``: both steps are :func:`fedsafe.pipeline.finish_run`,
as for ``fedsafe run``.

With ``resume=true`` in the run config the ServerApp continues ``run-dir`` from its last complete round
checkpoint (:mod:`fedsafe.flower.resume` says what must match); a resumed run ends with the adapter of
an uninterrupted one.
"""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig
from ..errors import FedsafeError
from ..io import atomic_write_json
from ..pipeline import build_engine, finish_run, save_final
from ..rundir import set_up_run_dir, write_run_header
from . import as_bool, check_supported, load_run_cfg, run_config_value
from .resume import check_resume, identity
from .strategy import FedsafeStrategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = load_run_cfg(rc)
    run_dir = str(run_config_value(rc, "run-dir") or "").strip() or None
    run_server(grid, cfg, run_dir, evaluate=as_bool(run_config_value(rc, "evaluate")),
               node_wait_s=float(run_config_value(rc, "node-wait-s")),
               round_timeout_s=float(run_config_value(rc, "round-timeout-s")),
               resume=as_bool(run_config_value(rc, "resume")), ident=identity(rc))


def run_server(grid: Grid, cfg: RunConfig, run_dir: str | Path | None = None, *, evaluate: bool = True,
               node_wait_s: float = 120.0, round_timeout_s: float = 3600.0, resume: bool = False,
               ident: dict | None = None) -> Path:
    """Run the federation described by ``cfg`` over ``grid``; returns the run directory. With ``resume``
    ``run_dir`` is an interrupted Flower run of the same config, federation and Flower version
    (:func:`fedsafe.flower.resume.check_resume`), continued from its last complete round."""
    check_supported(cfg)
    ident = dict(ident or identity({}))
    if resume:
        if not run_dir:
            raise FedsafeError("resume=true needs run-dir: the run directory to continue")
        d = Path(run_dir).resolve()
        prev = check_resume(d, cfg, ident)
        eng = build_engine(cfg, d, progress=False)
        start = eng.try_resume()  # newest verified checkpoint; later metrics lines are dropped
        log(INFO, "fedsafe: resuming %s at round %d/%d", d, start + 1, cfg.fl.rounds)
    else:
        # an existing empty directory is fine, a non-empty one is refused; a refused set-up leaves nothing
        with set_up_run_dir(cfg, run_dir) as d:
            d = d.resolve()
            log(INFO, "fedsafe: run directory %s", d)
            eng = build_engine(cfg, d, progress=False)
            write_run_header(cfg, d, eng.fed)
        prev = {}
    strategy = FedsafeStrategy(eng, node_wait_s=node_wait_s)
    strategy.rounds = [r for r in prev.get("rounds", []) if int(r.get("round", -1)) < eng.start_round]
    info = {"engine": "flower", "run_id": _run_id(grid), "status": "running", **ident,
            "resumed_at_round": [*prev.get("resumed_at_round", []), eng.start_round] if resume else []}

    def write_info(**kw) -> None:
        info.update(kw)
        atomic_write_json(d / "flower.json", {**info, **strategy.report()})

    write_info()
    strategy.on_round = write_info
    t0 = time.time()
    try:
        if eng.start_round == 0:  # the start adapter's probe row (round -1), as Engine.run writes it
            eng.record_start()
        if eng.start_round < cfg.fl.rounds:  # a run interrupted after its last round only needs the rest
            strategy.start(grid=grid, initial_arrays=ArrayRecord(eng.rt.handle.state_dict(eng.global_vec)),
                           num_rounds=cfg.fl.rounds - eng.start_round, timeout=round_timeout_s)
    except BaseException as e:
        write_info(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    save_final(eng, eng.global_vec, t0, engine="flower")
    write_info(status="trained")
    done = finish_run(d, cfg, eng.fed, eng.rt, evaluate=evaluate, progress=False,
                      say=lambda line: log(INFO, "fedsafe: %s", line))
    if done.defense_dir is not None:
        write_info(defense_run=str(done.defense_dir))
    write_info(status="finished")
    log(INFO, "fedsafe: finished %s", d)
    return d


def _run_id(grid: Grid) -> int | None:
    try:
        return int(grid.run.run_id)
    except Exception:  # noqa: BLE001 - a test grid without a run
        return None
