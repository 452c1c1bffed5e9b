"""``fedsafe judge FILE.jsonl --judge NAME``: judge a generations file and aggregate it.

Input: JSONL rows with string ``prompt`` and ``response`` (other fields are kept). Output, next to the
input (or in ``out``):

* ``<stem>.judged.<judge>.jsonl``: every input row plus ``judge``, ``label``, ``score``, ``raw`` (and
  ``category`` when the judge names one), written atomically;
* ``results.json``: ``{"<stem>.<judge>": summary, ...}``. Entries for other files/judges already in the
  file are kept, so judging one generations file with several judges fills one results file.

The summary is :func:`fedsafe.eval.stats.rate_summary` (safe rate over decided verdicts, Wilson 95% CI,
unparsed count) plus the mean/std of ``score`` when the judge produces scores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write_json, first_unencodable, read_jsonl, write_jsonl
from .judges import Judge, get_judge
from .stats import mean_std, rate_summary


def judge_file(path: str | Path, judge_name: str, out: str | Path | None = None, **opts: Any) -> dict[str, Any]:
    """Judge every row of ``path`` with ``get_judge(judge_name, **opts)``; write outputs; return the summary.

    ``out`` is the output directory (default: the input's directory). A ``judge=`` keyword may pass a
    ready-made :class:`~fedsafe.eval.judges.Judge` instead of building one from the registry.
    """
    path = Path(path)
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{path}: no rows to judge")
    prompts, responses = [], []
    for n, row in enumerate(rows, 1):
        # A "\ud800" escape is valid JSON but decodes to a lone surrogate, which cannot be written back
        # as UTF-8: refuse it here, before the (possibly slow, paid) judging, not when writing the output.
        for key, value in row.items():
            if first_unencodable(json.dumps({key: value}, ensure_ascii=False)) is not None:
                raise DataError(f"{path}, record {n}: field {key!r} is not valid Unicode (it holds an unpaired "
                                "surrogate, e.g. from a \\ud800 escape)")
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{path}, record {n}: needs a string {key!r} field (has: {', '.join(row)})")
        prompts.append(row["prompt"])
        responses.append(row["response"])

    judge: Judge = opts.pop("judge", None) or get_judge(judge_name, **opts)
    verdicts = judge.judge(prompts, responses)

    out_dir = Path(out) if out is not None else path.parent
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", judge_name)
    judged_path = out_dir / f"{path.stem}.judged.{safe_name}.jsonl"
    judged = []
    for row, v in zip(rows, verdicts):
        extra = {"judge": judge_name, "label": v.label, "score": v.score, "raw": v.raw}
        if v.category is not None:
            extra["category"] = v.category
        judged.append({**row, **extra})
    write_jsonl(judged_path, judged)

    summary: dict[str, Any] = {"judge": judge_name, "input": str(path), "output": str(judged_path)}
    summary |= rate_summary(v.label for v in verdicts)
    scores = [v.score for v in verdicts if v.score is not None]
    if scores:
        summary["score_mean"], summary["score_std"] = mean_std(scores)
        summary["score_n"] = len(scores)
    summary["judge_info"] = judge.info()

    results_path = out_dir / "results.json"
    results = _read_results(results_path)
    results[f"{path.stem}.{safe_name}"] = summary
    atomic_write_json(results_path, results)
    return summary


def _read_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: existing results file is not valid JSON ({e}); move it away") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: existing results file is not a JSON object; move it away")
    return obj


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_summary(summary: dict[str, Any], console: Any = None) -> None:
    """Render one :func:`judge_file` summary as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"{summary.get('judge')} on {Path(str(summary.get('input', ''))).name}", show_header=False)
    t.add_column("metric", style="bold")
    t.add_column("value")
    t.add_row("n", str(summary["n"]))
    if summary.get("rate") is not None:
        t.add_row("safe rate", f"{_pct(summary['rate'])}  (95% CI {_pct(summary['ci_low'])}-{_pct(summary['ci_high'])})")
        t.add_row("safe / unsafe", f"{summary['safe']} / {summary['unsafe']}")
    t.add_row("unparsed", str(summary["unparsed"]))
    if summary.get("score_mean") is not None:
        t.add_row("score mean ± std", f"{summary['score_mean']:.4f} ± {summary['score_std']:.4f} (n={summary['score_n']})")
    t.add_row("output", str(summary.get("output", "")))
    console.print(t)
