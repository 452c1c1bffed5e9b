"""Benchmark prompts (AdvBench, HarmBench, JailbreakBench, StrongREJECT, MT-Bench, ...) from local files.

A view of :func:`fedsafe.data.files.load_file` with ``kind="prompt"``: the same reader, formats
(CSV/TSV/JSON/JSONL/Parquet), column detection and error format as client data files. The prompt column is
``column=`` or auto-detected among :data:`~fedsafe.data.files.INSTRUCTION_COLUMNS` (``goal`` for AdvBench and
JailbreakBench, ``forbidden_prompt`` for StrongREJECT, ``Behavior`` for HarmBench, ``turns`` for MT-Bench,
whose first turn is used, ...). A response column, if any, is kept as the reference answer.
"""

from __future__ import annotations

from pathlib import Path

from ..data.files import INSTRUCTION_COLUMNS, FileRecords, load_file

#: Auto-detection order (case-insensitive).
PROMPT_COLUMNS = INSTRUCTION_COLUMNS


def load_prompt_records(path: str | Path, column: str | None = None) -> FileRecords:
    """The file's prompts as ``prompt`` records in file order (``.report`` says what was read and dropped)."""
    return load_file(path, instruction_col=column, kind="prompt")


def load_prompt_file(path: str | Path, column: str | None = None) -> list[str]:
    """The prompts in ``path``, in file order."""
    return [r.instruction for r in load_prompt_records(path, column)]
