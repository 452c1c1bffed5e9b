"""The compiled column-wise sort (``_select.c``) behind the coordinate-wise rules on CPU.

Why compiled: numpy sorts one column at a time after a transposing copy (about 3 ns per value
on this project's AVX2 machine, ~10x one pass over the data), and ``np.partition`` /
``torch.kthvalue`` are slower still. ``_select.c`` instead applies a sorting network to 16
adjacent columns at once with SIMD min/max, reading the rows in place (about 4x fewer CPU
cycles per value).

The source is compiled on first use with the system C compiler into the fedsafe cache, under
a name that hashes the source, the flags and the CPU (``-march=native`` code never meets
another CPU). Without a compiler, or with ``FEDSAFE_NATIVE=0``, :func:`window_kernel` returns
None and the rules keep the numpy kernel; results are the same either way (tested).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from fedsafe.assets import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_select.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC"]


def _cpu_tag() -> str:
    """What the compiled code depends on: the machine and its instruction-set flags."""
    flags = ""
    with contextlib.suppress(OSError):  # no /proc: the machine name alone
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    return f"{platform.machine()} {platform.system()} {flags}"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target, then rename: concurrent processes never load a partial file.
    # The source is compiled where it lies (it includes itself by its own path).
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE.resolve()), "-o", str(out)], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(out, target)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("FEDSAFE_NATIVE", "1") == "0":
        return None
    try:
        source = SOURCE.read_bytes()
        key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_tag().encode()).hexdigest()[:16]
        target = cache_dir() / "kernels" / f"select-{key}.so"
        if not target.exists():
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except OSError as exc:  # no compiler, read-only cache, ...: the numpy kernel does the work
        log.warning("fedsafe: compiled coordinate-wise kernel unavailable (%s); using numpy", exc)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name in ("fs_window_f32", "fs_window_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [p, i64, p, i64, i64, p, i64, i64, i64, i64, p, p, p]
        fn.restype = ctypes.c_int
    return lib


def kernel(dtype: np.dtype):
    """The compiled ``fs_window`` for float32/float64 arrays, or None (then numpy does the work)."""
    lib = _library()
    if lib is None or np.dtype(dtype) not in (np.float32, np.float64):
        return None
    return lib.fs_window_f32 if np.dtype(dtype) == np.float32 else lib.fs_window_f64


def _batcher_pairs(p: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network on ``p`` (a power of two) lines, in order."""
    pairs = []
    size = 1
    while size < p:
        step = size
        while step >= 1:
            for j in range(step % size, p - step, 2 * step):
                for i in range(min(step, p - j - step)):
                    if (i + j) // (2 * size) == (i + j + step) // (2 * size):
                        pairs.append((i + j, i + j + step))
            step //= 2
        size *= 2
    return pairs


@functools.cache
def network(n: int, keep: tuple[int, int]) -> np.ndarray:
    """A sorting network for ``n`` values, as an int32 array of pairs (min line, max line).

    Built on the next power of two with the extra lines fixed at +inf: a comparator with a +inf
    line has a known result, so it is dropped (its lines relabelled) rather than run. Then
    comparators that cannot reach the sorted positions ``keep = [lo, hi]`` are dropped too.
    """
    p = 1 << max(0, (n - 1).bit_length())
    real = list(range(n)) + [-1] * (p - n)  # line -> real slot, -1 for a +inf
    pairs = []
    for a, b in _batcher_pairs(p):
        if real[a] >= 0 and real[b] >= 0:
            pairs.append((real[a], real[b]))
        elif real[a] < 0 and real[b] >= 0:  # +inf meets a value: they swap lines
            real[a], real[b] = real[b], real[a]
    # Line k < n now holds the k-th smallest, in slot real[k]; the +inf stayed on top.
    slot_of_pos = real[:n]
    live = {slot_of_pos[k] for k in range(keep[0], keep[1] + 1)}
    kept = []
    for a, b in reversed(pairs):
        if a in live or b in live:
            kept.append((a, b))
            live |= {a, b}
    kept.reverse()
    # Rename the slots so that slot k ends with the k-th smallest (the kernel reads positions).
    # This permutes the inputs too, which a sorting network does not mind; a pair's first slot
    # still receives the min, whichever number it has.
    rename = {slot: pos for pos, slot in enumerate(slot_of_pos)}
    out = [(rename[a], rename[b]) for a, b in kept]
    return np.array(out, dtype=np.int32).reshape(-1, 2)
