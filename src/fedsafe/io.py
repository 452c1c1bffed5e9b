"""Crash-safe file helpers: every result, checkpoint and metrics line goes through these.

Writes are atomic (temp file in the same directory + fsync + ``os.replace``) so a killed process never
leaves a half-written file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results should be readable like normal files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    atomic_write_text(path, text)


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line and fsync. A crash can at worst leave a torn *last* line, which
    :func:`read_jsonl` with ``tolerate_torn_tail=True`` drops."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> list[dict]:
    return list(iter_jsonl(path, tolerate_torn_tail=tolerate_torn_tail))


def iter_jsonl(path: str | os.PathLike, tolerate_torn_tail: bool = False) -> Iterator[dict]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a JSONL file") from None
    except OSError as e:  # permissions, name too long, ...
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        cut = raw.rfind(b"\n") + 1
        if not (tolerate_torn_tail and e.start >= cut):
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        # A kill in the middle of a multi-byte character tore the last line: drop it like any torn
        # line. Everything before it decodes (the first bad byte is past the cut).
        text = raw[:cut].decode("utf-8")
    lines = text.split("\n")
    last = len(lines)
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            # only the unterminated last line can be torn by a crash; a bad terminated line is damage
            if tolerate_torn_tail and lineno == last and not text.endswith("\n"):
                return
            raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:
            raise DataError(f"{path}, line {lineno}: {json_error_reason(e)}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield obj


def json_error_reason(e: BaseException) -> str:
    """Why ``json.loads`` failed, for a DataError. Besides JSONDecodeError (a ValueError) it raises
    RecursionError on very deep nesting and ValueError on integers longer than
    ``sys.get_int_max_str_digits()`` (4300 by default)."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON ({e.msg})"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply"
    return f"unreadable JSON ({str(e).split(';')[0]})"


def first_unencodable(text: str) -> str | None:
    """None if ``text`` encodes as UTF-8, else where it does not. JSON's ``"\\ud800"`` escape decodes to
    a lone surrogate: a Python str, but not Unicode text, so hashing (``Record`` ids) or writing it
    would fail later with UnicodeEncodeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"unpaired surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
