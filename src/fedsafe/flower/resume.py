"""Resuming a Flower run: what must match, and the check that refuses a resume that would not continue
the same federation.

A Flower run directory has the checkpoints of the in-process engine (``checkpoints/``, atomic,
checksummed, pickle-free) plus ``flower.json``, which records the Flower version and the federation
the run was started on (:func:`identity`). ``--resume`` (``fedsafe flower sim``) or ``resume=true``
(the run config of a deployment) continues from the last complete round only when the resolved fedsafe
configuration, the federation and the Flower version are those of the interrupted run: otherwise the
remaining rounds would silently come from a different experiment. Every difference is named.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from ..errors import FedsafeError


def identity(run_config: Mapping[str, Any]) -> dict:
    """What a resume must find unchanged besides the fedsafe config: Flower's version and the federation
    (the run config's ``federation`` label: ``fedsafe flower sim`` sets it to its simulated federation;
    in a deployment the operator may name one)."""
    import flwr

    from . import run_config_value

    return {"flwr_version": str(flwr.__version__),
            "federation": str(run_config_value(run_config, "federation") or "deployment")}


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def config_differences(old, new) -> list[str]:
    """``key: run X, now Y`` for every config key that differs (run directory name excluded)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: run {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k != "output_dir"]


def read_flower_json(run_dir: Path) -> dict:
    p = Path(run_dir) / "flower.json"
    if not p.is_file():
        raise FedsafeError(f"{run_dir} has no flower.json: it is not a Flower run directory (resume runs of "
                           "`fedsafe run` with `fedsafe run --resume`)")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise FedsafeError(f"{p}: unreadable ({e}); the run cannot be resumed") from None
    if not isinstance(info, dict) or info.get("engine") != "flower":
        raise FedsafeError(f"{p}: not written by fedsafe's Flower engine; the run cannot be resumed")
    return info


def check_resume(run_dir: Path, cfg, ident: Mapping[str, Any]) -> dict:
    """Raise :class:`FedsafeError` naming every difference between the interrupted run and this one;
    returns the run's ``flower.json``. Also refuses old-format (pickle) checkpoints, unopened."""
    from ..rundir import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedsafeError(f"cannot resume {run_dir}: no such run directory")
    old_cfg = load_run_config(run_dir)
    info = read_flower_json(run_dir)
    diffs = config_differences(old_cfg, cfg)
    for key, what in (("flwr_version", "Flower version"), ("federation", "federation")):
        if info.get(key) != ident.get(key):
            diffs.append(f"{what}: run {info.get(key)!r}, now {ident.get(key)!r}")
    if diffs:
        more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
        raise FedsafeError(f"cannot resume {run_dir}: it differs from the interrupted run: " + "; ".join(diffs[:6])
                           + more)
    return info
