"""Round checkpoints: atomic, checksummed, resumable.

``checkpoints/round_0007.pt`` holds everything the next round depends on (global adapter vector, server
optimiser and SCAFFOLD state, stateful aggregator state, kept client optimiser states). Each file is
written to a temp name, fsynced and renamed; its sha256 goes to a sidecar written *after* it, so a
checkpoint counts as complete only when both exist and agree.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from ..errors import FedsafeError
from ..io import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file

_PAT = re.compile(r"round_(\d{4,})\.pt$")


def ckpt_path(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{rnd:04d}.pt"


def save(run_dir: Path, rnd: int, state: dict) -> Path:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    p = ckpt_path(run_dir, rnd)
    atomic_write_bytes(p, data)
    atomic_write_text(p.with_suffix(".pt.sha256"), sha256_bytes(data) + "\n")
    return p


def is_complete(p: Path) -> bool:
    side = p.with_suffix(".pt.sha256")
    if not p.exists() or not side.exists():
        return False
    return side.read_text().strip() == sha256_file(p)


def load(p: Path) -> dict:
    if not is_complete(p):
        raise FedsafeError(f"checkpoint {p} is incomplete or corrupt (checksum mismatch)")
    return torch.load(p, map_location="cpu", weights_only=False)


def latest_complete(run_dir: Path) -> tuple[int, Path] | None:
    """The newest round whose checkpoint verifies; corrupt newer ones are ignored."""
    d = Path(run_dir) / "checkpoints"
    if not d.exists():
        return None
    found = []
    for p in d.iterdir():
        m = _PAT.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    for rnd, p in sorted(found, reverse=True):
        if is_complete(p):
            return rnd, p
    return None


def saved_rounds(run_dir: Path) -> list[int]:
    """Rounds that have a checkpoint file (complete or not), ascending."""
    d = Path(run_dir) / "checkpoints"
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _PAT.search(p.name))) if d.exists() else []


def prune(run_dir: Path, keep: int, protect: set[int] = frozenset()) -> None:
    """Keep only the newest ``keep`` round checkpoints (0 keeps all)."""
    if keep <= 0:
        return
    d = Path(run_dir) / "checkpoints"
    found = sorted((int(m.group(1)), p) for p in d.iterdir() if (m := _PAT.search(p.name)))
    for rnd, p in found[:-keep]:
        if rnd in protect:
            continue
        p.unlink(missing_ok=True)
        p.with_suffix(".pt.sha256").unlink(missing_ok=True)
