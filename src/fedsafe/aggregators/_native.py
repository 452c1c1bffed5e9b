"""The compiled column-wise sort (``_select.c``) behind the coordinate-wise rules on CPU.

Why compiled: numpy sorts one column at a time after a transposing copy (about 3.5 ns per
value at n = 100 on this project's AVX2 machine, ~15x one pass over the data), and
``np.partition`` (13 ns) and ``torch.kthvalue`` are slower still. ``_select.c`` applies a
sorting network to 8 adjacent columns at once with SIMD min/max, on the rows in place.

For ``n <= MAX_UNROLLED`` the network of that ``n`` is written out as straight-line C (the
comparators in depth-first order, so the compiler keeps most lines in registers: 2.4x faster
than running the network from a table); larger ``n`` share one build that reads the table.

Builds are made on first use with the system C compiler (well under a second each) and kept
in the fedsafe cache under a name that hashes the source, the network, the flags and the CPU
(``-march=native`` code never meets another CPU). Without a compiler, or with
``FEDSAFE_NATIVE=0``, :func:`kernel` returns None and the rules use the numpy kernel; the
results are the same either way (tested).

``_residual.c`` (which includes ``_select.c``, for the full sorting network of n lines) runs the
whole residual rule on float32 columns; see residual.py. It is built with ``-ffp-contract=off``:
its float32 steps must round exactly as torch's do.
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
import threading
from pathlib import Path

import numpy as np

from fedsafe.assets import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_select.c")
RESIDUAL_SOURCE = Path(__file__).with_name("_residual.c")  # includes _select.c
# -fno-strict-aliasing: the kernel reads the SIMD lines it sorted as plain arrays of numbers.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-strict-aliasing", "-shared", "-fPIC")
# Above this many clients the straight-line network takes long to compile (~n log^2 n lines).
MAX_UNROLLED = 256


def _cpu_tag() -> str:
    """What the compiled code depends on: the machine and its instruction-set flags."""
    flags = ""
    with contextlib.suppress(OSError):  # no /proc: the machine name alone
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    return f"{platform.machine()} {platform.system()} {flags}"


def _build(name: str, network: str | None, defines: tuple[str, ...], main: Path = SOURCE) -> ctypes.CDLL:
    """Compile ``main`` (``_select.c`` or a file including it, with a generated network, if given)
    once; load the shared object."""
    source = SOURCE.read_bytes() + (b"" if main == SOURCE else main.read_bytes())
    tag = b"\0".join([source, (network or "").encode(), " ".join(FLAGS + defines).encode(), _cpu_tag().encode()])
    target = cache_dir() / "kernels" / f"{name}-{hashlib.sha256(tag).hexdigest()[:16]}.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler (cc/gcc) on PATH")
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build beside the target, then rename: concurrent processes never load a partial file.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out, args = Path(tmp) / target.name, list(defines)
            if network is not None:
                header = Path(tmp) / "network.h"
                header.write_text(network)
                args.append(f'-DNETWORK="{header}"')
            # The source is compiled where it lies: it includes itself by its own path.
            cmd = [compiler, *FLAGS, *args, str(main.resolve()), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(out, target)
    lib = ctypes.CDLL(str(target))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.fs_window_f32, lib.fs_window_f64):
        fn.argtypes = [p, i64, p, i64, i64, p, i64, i64, i64, i64, p, p, p]
        fn.restype = ctypes.c_int
    for fn in (lib.fs_window_f32_slopes, lib.fs_window_f64_slopes):
        fn.argtypes = [p, i64, i64, p, i64, p]
        fn.restype = ctypes.c_int
    if main == RESIDUAL_SOURCE:
        f32 = ctypes.c_float
        lib.fs_residual_f32.argtypes = [p, i64, i64, i64, p, f32, f32, f32, f32, p, p, p, p, p, p]
        lib.fs_residual_f32.restype = ctypes.c_int
        lib.fs_rm_slope_f32.argtypes = [p, i64, i64, p, p]
        lib.fs_rm_slope_f32.restype = ctypes.c_int
    return lib


def _straight_line(n: int, pairs: np.ndarray) -> str:
    """The body of ``_select.c``'s ``_sort(V *buf)`` for one network: load, compare, store."""
    lines = [" ".join(f"V r{i} = buf[{i}];" for i in range(n))]
    lines += [f"CX(&r{a}, &r{b});" for a, b in pairs]
    lines.append(" ".join(f"buf[{i}] = r{i};" for i in range(n)))
    return "\n".join(lines) + "\n"


_BUILDING = threading.Lock()  # the first calls can come from several block threads at once


def _library(n: int, keep: tuple[int, ...]) -> ctypes.CDLL | None:
    with _BUILDING:
        return _cached_library(n, keep)


@functools.cache
def _cached_library(n: int, keep: tuple[int, ...]) -> ctypes.CDLL | None:
    if os.environ.get("FEDSAFE_NATIVE", "1") == "0":
        return None
    try:
        if n <= MAX_UNROLLED:
            code = _straight_line(n, network(n, keep))
            return _build(f"select-n{n}", code, (f"-DNETWORK_N={n}", "-DLINE_BYTES=32"))
        return _build("select", None, ())
    except OSError as exc:  # no compiler, read-only cache, ...: the numpy kernel does the work
        log.warning("fedsafe: compiled coordinate-wise kernel unavailable (%s); using numpy", exc)
        return None


@functools.cache
def _cached_residual_library(n: int) -> ctypes.CDLL | None:
    if os.environ.get("FEDSAFE_NATIVE", "1") == "0":
        return None
    try:
        code = _straight_line(n, network(n, tuple(range(n))))
        # No fused multiply-adds: the rule's float32 steps must round as torch's do.
        defines = (f"-DNETWORK_N={n}", "-DLINE_BYTES=32", "-ffp-contract=off")
        return _build(f"residual-n{n}", code, defines, RESIDUAL_SOURCE)
    except OSError as exc:
        log.warning("fedsafe: compiled residual kernel unavailable (%s); using the torch code", exc)
        return None


def residual_library(n: int) -> ctypes.CDLL | None:
    """``_residual.c`` built for ``n`` clients: ``fs_residual_f32`` (the whole rule on float32
    columns) and ``fs_rm_slope_f32`` (the repeated-median slope alone, for tests), or None."""
    if not 3 <= n <= MAX_UNROLLED:
        return None
    with _BUILDING:
        return _cached_residual_library(n)


def residual_kernel(n: int):
    """The compiled whole residual rule for ``n`` float32 rows (``_residual.c``), or None."""
    lib = residual_library(n)
    return None if lib is None else lib.fs_residual_f32


def kernel(dtype: np.dtype, n: int, keep: tuple[int, ...]):
    """The compiled ``fs_window`` for ``n`` float32/float64 rows whose sorted positions ``keep``
    are read, or None (then numpy does the work)."""
    if np.dtype(dtype) not in (np.float32, np.float64):
        return None
    lib = _library(n, keep)
    if lib is None:
        return None
    return lib.fs_window_f32 if np.dtype(dtype) == np.float32 else lib.fs_window_f64


def slope_kernel(dtype: np.dtype, n: int):
    """The compiled repeated-median slopes for ``n`` sorted values per row (see residual.py),
    with the network it needs (for the ``n - 1`` other points, middle kept), or (None, None)."""
    # Above MAX_UNROLLED + 1 points the table-driven build would hold n^2 lines of 32 values
    # (128 MB at n = 1,000); numpy's blocks stay small there.
    if np.dtype(dtype) not in (np.float32, np.float64) or not 2 <= n <= MAX_UNROLLED + 1:
        return None, None
    keep = tuple(sorted({(n - 2) // 2, (n - 1) // 2}))  # the middle of n - 1 slopes
    lib = _library(n - 1, keep)
    if lib is None:
        return None, None
    fn = lib.fs_window_f32_slopes if np.dtype(dtype) == np.float32 else lib.fs_window_f64_slopes
    return fn, network(n - 1, keep)


def _batcher_pairs(p: int) -> list[tuple[int, int]]:
    """Batcher's odd-even merge sort network on ``p`` (a power of two) lines.

    Depth-first order (sort each half, then merge) rather than layer by layer: consecutive
    comparators then reuse the same few lines, which stay in registers and L1 (2.4x faster).
    """

    def merge(lo: int, hi: int, r: int):  # merge the sorted halves of lines lo..hi, stride r
        step = r * 2
        if step < hi - lo:
            yield from merge(lo, hi, step)
            yield from merge(lo + r, hi, step)
            yield from ((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            yield (lo, lo + r)

    def sort(lo: int, hi: int):  # lines lo..hi inclusive
        if hi > lo:
            mid = (lo + hi) // 2
            yield from sort(lo, mid)
            yield from sort(mid + 1, hi)
            yield from merge(lo, hi, 1)

    return list(sort(0, p - 1))


@functools.cache
def network(n: int, keep: tuple[int, ...]) -> np.ndarray:
    """A network placing the sorted positions ``keep`` of ``n`` values, as int32 pairs (min line,
    max line): Batcher's sorting network less the comparators those positions do not depend on.

    Built on the next power of two with the extra lines fixed at +inf: a comparator with a +inf
    line has a known result, so it is dropped (its lines relabelled) rather than run. Then
    comparators that cannot reach a kept position are dropped too (a median needs 911 of the 1,104
    comparators at n = 100; a trimmed mean's four run ends 900).
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
    live = {slot_of_pos[k] for k in keep}
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
