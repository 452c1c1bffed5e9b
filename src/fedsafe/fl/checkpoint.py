"""Round checkpoints: atomic, checksummed, resumable, and never unpickled.

``checkpoints/round_0007.safetensors`` holds everything the next round depends on (global adapter
vector, server optimiser and SCAFFOLD state, stateful aggregator state, kept client optimiser states)
in the pickle-free format of :mod:`fedsafe.statefile`: opening a checkpoint someone else wrote can
only give tensors and plain data, never run code. Each file is written to a temp name, fsynced and
renamed; its sha256 goes to a sidecar written *after* it, so a checkpoint counts as complete only
when both exist and agree.

Checkpoints of fedsafe versions before this format (``round_NNNN.pt``, ``torch.save`` = pickle) are
refused, never opened (:func:`refuse_pickled`).
"""

from __future__ import annotations

import re
from pathlib import Path

from .. import statefile
from ..errors import DataError, FedsafeError
from ..io import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file
from ..rundir import _OLD_PAT, refuse_pickled

SUFFIX = ".safetensors"
_PAT = re.compile(r"round_(\d{4,})\.safetensors$")


def ckpt_path(run_dir: Path, rnd: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round_{rnd:04d}{SUFFIX}"


def sidecar(p: Path) -> Path:
    """The sha256 file of checkpoint ``p``."""
    return p.with_name(p.name + ".sha256")


def save(run_dir: Path, rnd: int, state: dict) -> Path:
    data = statefile.dumps(state)
    p = ckpt_path(run_dir, rnd)
    atomic_write_bytes(p, data)
    atomic_write_text(sidecar(p), sha256_bytes(data) + "\n")
    return p


def is_complete(p: Path) -> bool:
    side = sidecar(p)
    if not p.exists() or not side.exists():
        return False
    return side.read_text().strip() == sha256_file(p)


def load(p: Path) -> dict:
    p = Path(p)
    if _OLD_PAT.search(p.name):
        refuse_pickled(p.parent.parent)
    if not _PAT.search(p.name):
        raise FedsafeError(f"{p} is not a fedsafe checkpoint (round_NNNN{SUFFIX})")
    try:
        data = p.read_bytes()  # read once: the bytes verified are the bytes decoded
        want = sidecar(p).read_text().strip()
    except OSError as e:
        raise FedsafeError(f"checkpoint {p} cannot be read ({e.strerror or e})") from None
    if want != sha256_bytes(data):
        raise FedsafeError(f"checkpoint {p} is incomplete or corrupt (checksum mismatch)")
    state = statefile.loads(data, what=f"checkpoint {p}")
    if not isinstance(state, dict) or "round" not in state or "global" not in state:
        raise DataError(f"checkpoint {p}: not a round checkpoint (no round / global adapter)")
    return state


def latest_complete(run_dir: Path) -> tuple[int, Path] | None:
    """The newest round whose checkpoint verifies; corrupt newer ones are ignored. Refuses a directory
    with old-format (pickle) checkpoints rather than silently starting over next to them."""
    refuse_pickled(run_dir)
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
        sidecar(p).unlink(missing_ok=True)
