"""Run directories: their layout, creating one, reading its config back, and "is it finished?".

A run directory holds: ``config.yaml`` (resolved), ``clients.json`` (composition and the malicious
ground truth, for forensics only: no defense reads it unless ``fl.oracle``), ``data_manifest.json``
(record ids per client and held-out set), ``metrics.jsonl``, ``forensics.jsonl``, ``checkpoints/``,
``final_adapter/`` (a peft adapter directory), with ``init.merge`` ``start_adapter/`` (the adapter folded
into the base model that ``final_adapter/`` was trained on: merge it first), ``train_summary.json`` and, after evaluation, ``eval/``
and ``results.json``. A post-hoc defense writes a sibling run directory of the same layout plus
``defense.json`` (its source run) and ``defense_data.jsonl``.

This module sits just above ``config`` and ``data``: every room that reads or writes a run directory
(the engine's resume, evaluation, the defense, the pipeline, the Flower apps) takes the names from here.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

from .config import RunConfig, dump_yaml, from_dict
from .data.partition import Federation
from .errors import FedsafeError
from .io import atomic_write_json, atomic_write_text

CONFIG = "config.yaml"
CLIENTS = "clients.json"
DATA_MANIFEST = "data_manifest.json"
METRICS = "metrics.jsonl"
FORENSICS = "forensics.jsonl"
FINAL_ADAPTER = "final_adapter"
START_ADAPTER = "start_adapter"  # with init.merge: the start folded into the base (final_adapter sits on top of it)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft writes into an adapter directory
TRAIN_SUMMARY = "train_summary.json"
RESULTS = "results.json"
EVAL_DIR = "eval"


def new_run_dir(cfg: RunConfig, run_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """A fresh directory; never reuses an existing one unless ``overwrite``."""
    if run_dir is not None:
        d = Path(run_dir)
        if d.exists() and not d.is_dir():  # even with --overwrite: never delete a file we did not create
            raise FedsafeError(f"run directory {d} exists and is not a directory; choose another --run-dir")
        if d.exists() and any(d.iterdir()):
            if not overwrite:
                raise FedsafeError(f"{d} already exists and is not empty; pass --overwrite or --resume {d}")
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


@contextmanager
def set_up_run_dir(cfg: RunConfig, run_dir: str | Path | None = None, overwrite: bool = False) -> Iterator[Path]:
    """:func:`new_run_dir` for the set-up of a run that may still be refused (e.g. a config the engine
    cannot build): if the ``with`` body raises, the directories this call created are removed again, and
    a directory that existed (empty) before is emptied, so a refused start leaves nothing behind; a run
    that ``overwrite`` would replace is restored as it was (it is deleted only once the body succeeds)."""
    target = Path(run_dir) if run_dir is not None else Path(cfg.output_dir)
    created = _first_missing(target)
    # --overwrite replaces the old run only once the new one has started: until then it waits beside it
    old = move_aside(target) if overwrite and run_dir is not None else None
    try:
        d = new_run_dir(cfg, run_dir, overwrite)
    except BaseException:
        put_back(old, target)
        raise
    if created is None and run_dir is None:  # output_dir existed: the stamped directory is new
        created = d
    try:
        yield d
    except BaseException:
        if old is not None:
            put_back(old, d)
        elif created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for p in d.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def move_aside(d: Path) -> Path | None:
    """Rename a non-empty directory ``d`` to a hidden sibling (same file system: an atomic rename) and
    return the new name; None when there is nothing to keep (missing, empty, or not a directory)."""
    if d.is_symlink() or not d.is_dir() or not any(d.iterdir()):
        return None
    aside = d.with_name(f".{d.name}.replaced-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)  # left by a process that died with this pid
    d.rename(aside)
    return aside


def put_back(aside: Path | None, d: Path) -> None:
    """Undo :func:`move_aside`: drop what the refused start wrote in ``d`` and restore the old run."""
    if aside is None:
        return
    shutil.rmtree(d, ignore_errors=True)
    aside.rename(d)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory that ``mkdir(parents=True)`` of ``path`` would create (None: it exists)."""
    path, missing = path.absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    return missing


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a run directory (it has a ``config.yaml``)."""
    return (Path(path) / CONFIG).exists()


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration a run directory was started with (validated)."""
    p = Path(run_dir) / CONFIG
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


def has_final_adapter(run_dir: str | Path) -> bool:
    """Whether the run finished training (its ``final_adapter/`` holds the adapter weights)."""
    return (Path(run_dir) / FINAL_ADAPTER / ADAPTER_WEIGHTS).exists()


def require_final_adapter(run_dir: str | Path) -> Path:
    """The run's ``final_adapter/`` directory, or a :class:`FedsafeError` telling how to get one."""
    if not has_final_adapter(run_dir):
        raise FedsafeError(
            f"{run_dir} has no final adapter ({FINAL_ADAPTER}/{ADAPTER_WEIGHTS}); finish or resume that run first"
        )
    return Path(run_dir) / FINAL_ADAPTER


def write_run_header(cfg: RunConfig, run_dir: Path, fed: Federation) -> None:
    """``config.yaml``, ``clients.json`` and ``data_manifest.json``: what a run is, before it trains."""
    atomic_write_text(run_dir / CONFIG, dump_yaml(cfg))
    summ = fed.summary()
    atomic_write_json(
        run_dir / CLIENTS,
        {
            "num_clients": len(fed.clients),
            "malicious_ids": list(fed.malicious_ids),
            "note": "ground truth for forensics; never passed to an aggregator unless fl.oracle is true",
            "clients": summ,
        },
    )
    atomic_write_json(run_dir / DATA_MANIFEST, fed.to_manifest())


# Old-format (pickle) round checkpoints: refused by name, never opened.
_OLD_PAT = re.compile(r"round_(\d{4,})\.pt$")


def refuse_pickled(run_dir: Path) -> None:
    """Raise if ``run_dir/checkpoints`` holds an old-format (pickle) checkpoint; it is never opened."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return
    old = sorted(p.name for p in d.iterdir() if _OLD_PAT.search(p.name))
    if old:
        raise FedsafeError(
            f"{d / old[-1]} is an old-format checkpoint (pickle: opening it could run code), which this fedsafe "
            f"version never reads; delete {d}/round_*.pt and their .sha256 files to use this run directory "
            "(a resume then restarts from the newest safetensors checkpoint, or round 0), or start a new run"
        )
