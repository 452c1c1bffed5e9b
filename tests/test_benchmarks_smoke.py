"""The benchmark scripts keep working (figures are not asserted: speed lives in benchmarks/, not in tests)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_committed_results_render_every_section():
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    res = json.loads((BENCH / "results.json").read_text())
    md = run_all.render(res)
    for title in run_all.TITLES.values():
        assert f"## {title}" in md
    assert "failed:" not in md


def test_batched_clients_bench_runs_on_tiny(tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, str(BENCH / "bench_batched.py"), "--model", "tiny", "--repeats", "1",
                    "--threads", "1", "--json", str(out)], check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["prefix_cache"]) for r in rows] == [(3, True), (3, False)]
    assert all(r["max_abs_diff"] < 1e-4 and r["sequential_s"] > 0 and r["batched_s"] > 0 for r in rows)
