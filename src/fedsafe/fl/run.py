"""Run directories: create, resume, finish.

A run directory holds: ``config.yaml`` (resolved), ``clients.json`` (composition and the malicious
ground truth, for forensics only: no defense reads it unless ``fl.oracle``), ``data_manifest.json``
(record ids per client and held-out set), ``metrics.jsonl``, ``forensics.jsonl``, ``checkpoints/``,
``final_adapter/`` (a peft adapter directory), and, after evaluation, ``eval/`` and ``results.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from ..config import RunConfig, dump_yaml, from_dict
from ..errors import FedsafeError
from ..io import atomic_write_json, atomic_write_text
from ..attack.data import apply_benign_mix
from ..runtime import get_runtime
from .checkpoint import refuse_pickled
from .engine import Engine


def new_run_dir(cfg: RunConfig, run_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """A fresh directory; never reuses an existing one unless ``overwrite``."""
    if run_dir is not None:
        d = Path(run_dir)
        if d.exists() and not d.is_dir():  # even with --overwrite: never delete a file we did not create
            raise FedsafeError(f"run directory {d} exists and is not a directory; choose another --run-dir")
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FedsafeError(f"{d} already exists and is not empty; pass --overwrite or --resume {d}")
            import shutil

            shutil.rmtree(d)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a parent is a file, no permission, ...
            raise FedsafeError(f"cannot create run directory {d}: {e.strerror or e}") from None
        return d
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    d, i = base, 2
    while d.exists():
        d = base.with_name(f"{base.name}-{i}")
        i += 1
    try:
        d.mkdir(parents=True)
    except OSError as e:  # output_dir is a file, no permission, ...
        raise FedsafeError(f"cannot create run directory {d}: {e.strerror or e}") from None
    return d


def load_run_config(run_dir: str | Path) -> RunConfig:
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise FedsafeError(f"{run_dir} is not a run directory (no config.yaml)")
    refuse_pickled(run_dir)  # a shared run directory must not smuggle in a pickle checkpoint
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or a bad YAML scalar
        raise FedsafeError(f"{p}: unreadable run config ({e}); repair it or start a new run") from None
    except OSError as e:
        raise FedsafeError(f"{p}: cannot read ({e.strerror or e})") from None
    return from_dict(RunConfig, raw, "config.yaml").validate()


def build_engine(cfg: RunConfig, run_dir: Path, *, progress: bool = True, **kw) -> Engine:
    from ..data.partition import build_federation

    fed = build_federation(cfg.data, seed=cfg.seed)
    from ..defense.align import initial_vec, reserve

    align_records = reserve(cfg, fed)
    apply_benign_mix(cfg.attack.benign_mix, cfg.seed, fed)
    rt = get_runtime(cfg.model, cfg.lora)
    if "round_callback" not in kw:
        from ..eval.runner import make_monitor

        kw["round_callback"] = make_monitor(cfg, fed, rt)
    eng = Engine(cfg, run_dir, fed, rt, progress=progress, **kw)
    eng.global_vec = initial_vec(cfg, fed, rt, align_records, progress=progress)
    eng.init_vec = eng.global_vec.clone()
    from .engine import rule_needs

    needs = rule_needs(eng.rule)
    if cfg.fl.aggregator == "fltrust" or "root_update" in needs:
        from ..defense.root import make_root_fn

        eng.root_fn = make_root_fn(eng)
    if "probe_scores" in needs:
        from ..defense.probe import make_probe_fn

        eng.probe_fn = make_probe_fn(rt, fed)
    if "labelled_updates" in needs:
        from ..defense.classifier import make_classifier_fn

        eng.classifier_fn = make_classifier_fn(eng)
    if cfg.defense.projection:
        from ..defense.projection import projection_hook

        eng.post_aggregate.append(projection_hook(cfg, eng))
    if cfg.defense.every_rounds > 0:
        from ..defense.finetune import inline_defense_hook

        eng.post_aggregate.append(inline_defense_hook(cfg, fed, rt))
    return eng


def write_run_header(cfg: RunConfig, run_dir: Path, fed) -> None:
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    summ = fed.summary()
    atomic_write_json(run_dir / "clients.json", {
        "num_clients": len(fed.clients),
        "malicious_ids": list(fed.malicious_ids),
        "note": "ground truth for forensics; never passed to an aggregator unless fl.oracle is true",
        "clients": summ,
    })
    atomic_write_json(run_dir / "data_manifest.json", fed.to_manifest())


def start_run(cfg: RunConfig, run_dir: str | Path | None = None, *, overwrite: bool = False,
              progress: bool = True, evaluate: bool = True, **kw) -> Path:
    d = new_run_dir(cfg, run_dir, overwrite)
    eng = build_engine(cfg, d, progress=progress, **kw)
    write_run_header(cfg, d, eng.fed)
    return _train_and_finish(eng, evaluate)


def resume_run(run_dir: str | Path, *, progress: bool = True, evaluate: bool = True, **kw) -> Path:
    d = Path(run_dir)
    cfg = load_run_config(d)
    eng = build_engine(cfg, d, progress=progress, **kw)
    if not (d / "clients.json").exists():
        write_run_header(cfg, d, eng.fed)
    nxt = eng.try_resume()
    if progress:
        print(f"resuming {d} at round {nxt + 1}/{cfg.fl.rounds}")
    return _train_and_finish(eng, evaluate)


def _train_and_finish(eng: Engine, evaluate: bool) -> Path:
    d = eng.run_dir
    cfg = eng.cfg
    t0 = time.time()
    final = eng.run()
    eng.rt.handle.save_adapter(d / "final_adapter", final)
    atomic_write_json(d / "train_summary.json", {"rounds": cfg.fl.rounds, "seconds_this_session": time.time() - t0,
                                                  "adapter_numel": int(final.numel())})
    if evaluate:
        from ..eval.runner import evaluate_run

        evaluate_run(d, cfg=cfg, fed=eng.fed, rt=eng.rt, progress=eng.progress)
    return d
