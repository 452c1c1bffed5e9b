"""``fedsafe sweep CONFIG --grid key=v1,v2 ... --seeds N``: a resumable experiment matrix.

Every (grid point, seed) cell is an ordinary run directory under ``SWEEP_DIR/cells/``. Finished cells
(with ``results.json``) are skipped, interrupted ones resumed, and a failing cell is recorded in
``failures.json`` without stopping the others. The report groups cells by grid point (mean ± std over
seeds).
"""

from __future__ import annotations

import itertools
import re
import time
import traceback
from pathlib import Path

from rich.console import Console

from .config import load_config
from .errors import ConfigError, FedsafeError
from .io import atomic_write_json, atomic_write_text
from .pipeline import run_or_resume
from .report.render import render

console = Console(stderr=True)


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--grid {it!r} must look like key=v1,v2")
        k, vs = it.split("=", 1)
        vals = [v for v in vs.split(",") if v != ""]
        if not vals:
            raise ConfigError(f"--grid {it!r} has no values")
        grid.append((k, vals))
    return grid


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", s)[:120]


def run_sweep(config: str, grid_items: list[str], seeds: int = 1, overrides: list[str] | None = None,
              out_dir: str | Path | None = None, progress: bool = True, reference: str | None = None) -> Path:
    """Run every cell, then render the report. ``reference``: the defense row of the attack x defense matrix
    that the significance marks compare with (default: the row that is plain FedAvg without any defense)."""
    grid = parse_grid(grid_items)
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    base = load_config(config, overrides)
    root = Path(out_dir) if out_dir else Path(base.output_dir) / f"sweep-{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    (root / "cells").mkdir(parents=True, exist_ok=True)
    keys = [k for k, _ in grid]
    points = list(itertools.product(*[v for _, v in grid])) or [()]
    # validate every cell's config before running any
    cells = []
    for point in points:
        assign = [f"{k}={v}" for k, v in zip(keys, point)]
        label = ", ".join(assign) or base.name
        for s in range(seeds):
            cfg = load_config(config, list(overrides or []) + assign + [f"seed={base.seed + s}"])
            cells.append((label, cfg, root / "cells" / _slug(f"{'_'.join(assign) or 'base'}_seed{base.seed + s}")))
    if reference is not None:
        from .report.matrix import split_label

        rows = list(dict.fromkeys(split_label(label)[0] for label, _, _ in cells))
        if reference not in rows:
            raise ConfigError(f"--reference {reference!r} is not a defense row of this grid; rows: {', '.join(rows)}")
    failures = {}
    done = []
    for i, (label, cfg, d) in enumerate(cells, 1):
        console.rule(f"cell {i}/{len(cells)}: {label} (seed {cfg.seed})")
        try:
            run_or_resume(cfg, d, progress=progress, say=console.print)
            atomic_write_text(d / "label.txt", label + "\n")
            done.append(d)
        except (FedsafeError, RuntimeError, ValueError) as e:
            failures[d.name] = f"{type(e).__name__}: {e}"
            console.print(f"[red]cell failed[/red] {d.name}: {e}")
            (d / "error.txt").parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(d / "error.txt", traceback.format_exc())
    atomic_write_json(root / "failures.json", failures)
    if done:
        render(done, root / "report", title=f"fedsafe sweep: {base.name}",
               notes=f"grid: {'; '.join(f'{k} in {v}' for k, v in grid)}; seeds: {seeds}", matrix_reference=reference)
    if failures and not done:
        raise FedsafeError(f"every cell failed; see {root / 'failures.json'}")
    return root
