"""Pickle-free state files: nested state (dicts, lists, tuples, tensors, numbers, strings, None) as one
safetensors file.

Why not ``torch.save``: it is pickle, and unpickling a file runs whatever code its author put in it.
Run directories are shared between collaborators (``--resume``, ``defend``, ``eval``, ``report``), and
a checksum sidecar does not help: whoever writes the file writes the sidecar. A safetensors file is
data only: a JSON header of tensor names, dtypes, shapes and byte offsets, then the raw bytes. Here
every tensor of the state becomes one entry (``t0``, ``t1``, ...) and everything else (numbers,
strings, optimiser hyper-parameters, integer client ids used as dict keys) is the JSON *skeleton* in
the header's metadata, with ``{"__tensor__": "t3"}`` where a tensor was. Reading it back can only
build dicts, lists, tuples, numbers, strings and CPU tensors.

Round trip is exact: tensors keep dtype, shape and bytes; Python floats go through ``repr`` (JSON)
and come back bit for bit (NaN and infinities included); ints of any size, tuples and non-string dict
keys are kept.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .errors import DataError

FORMAT = "fedsafe-state/1"
_T, _TUPLE, _PAIRS = "__tensor__", "__tuple__", "__pairs__"


def dumps(state: Any) -> bytes:
    """``state`` as safetensors bytes; raises TypeError for a value that is not plain data (a bug)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _enc(state, tensors)
    meta = {"format": FORMAT, "state": json.dumps(skeleton, separators=(",", ":"))}
    return save(tensors, metadata=meta)


def loads(data: bytes, what: str = "state file") -> Any:
    """The state ``dumps`` wrote; :class:`~fedsafe.errors.DataError` naming ``what`` for anything else."""
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or not 2 <= n <= len(data) - 8:
            raise ValueError("no safetensors header")
        meta = json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__") or {}
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"no {FORMAT} metadata")
        skeleton = json.loads(meta["state"])
        tensors = load(data)
        return _dec(skeleton, tensors)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: not a fedsafe state file ({_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError on a damaged buffer
        raise DataError(f"{what}: not a fedsafe state file ({type(e).__name__}: {str(e)[:120]})") from None


def _reason(e: BaseException) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else str(e)[:160] or type(e).__name__


def _enc(o: Any, tensors: dict) -> Any:
    if isinstance(o, torch.Tensor):
        name = f"t{len(tensors)}"
        # own contiguous CPU copy: safetensors refuses views that share storage
        tensors[name] = o.detach().to("cpu").contiguous().clone()
        return {_T: name}
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    if isinstance(o, tuple):
        return {_TUPLE: [_enc(x, tensors) for x in o]}
    if isinstance(o, list):
        return [_enc(x, tensors) for x in o]
    if isinstance(o, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in o):
            return {k: _enc(v, tensors) for k, v in o.items()}
        return {_PAIRS: [[_enc(k, tensors), _enc(v, tensors)] for k, v in o.items()]}
    raise TypeError(f"statefile: cannot store a {type(o).__name__} (only dicts, lists, tuples, tensors, "
                    "numbers, strings and None)")


def _dec(o: Any, tensors: dict) -> Any:
    if isinstance(o, list):
        return [_dec(x, tensors) for x in o]
    if not isinstance(o, dict):
        return o
    if _T in o:
        return tensors[o[_T]]
    if _TUPLE in o:
        return tuple(_dec(x, tensors) for x in o[_TUPLE])
    if _PAIRS in o:
        return {_dec(k, tensors): _dec(v, tensors) for k, v in o[_PAIRS]}
    return {k: _dec(v, tensors) for k, v in o.items()}
