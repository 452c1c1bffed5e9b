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
    # results.md is exactly what results.json renders to, notes included: a hand edit of the page would be lost
    # on the next run_all.py (edit the section's "note" in results.json, then `run_all.py --render`)
    assert md == (BENCH / "results.md").read_text()


def test_batched_clients_bench_runs_on_tiny(tmp_path):
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, str(BENCH / "bench_batched.py"), "--model", "tiny", "--repeats", "1",
                    "--threads", "1", "--json", str(out)], check=True, capture_output=True, text=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["clients"], r["prefix_cache"]) for r in rows] == [(3, True), (3, False)]
    assert all(r["max_abs_diff"] < 1e-4 and r["sequential_s"] > 0 and r["batched_s"] > 0 for r in rows)


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out, md = tmp_path / "g.json", tmp_path / "g.md"
    p = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--json", str(out), "--md", str(md)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    secs = res["sections"]
    assert res["dry_run"] and set(secs) == {"tests", "engine", "batched", "aggregators"}
    assert not any("error" in s or "skipped" in s for s in secs.values())
    assert secs["tests"]["ok"] and "collected" in secs["tests"]["summary"]  # the -m cuda selection exists
    assert [r["shape"] for r in secs["engine"]["rows"]] == ["smollm2-135m", "llama-2-7b"]
    assert all(r["s_per_step"] > 0 and r["lora"]["target_modules"] == ["q_proj", "v_proj"] for r in secs["engine"]["rows"])
    assert secs["batched"]["max_abs_diff"] < 1e-4 and len(secs["batched"]["rows"]) == 2
    assert len(secs["aggregators"]["rows"]) >= 15
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    page = run_all.render({"machine": res["machine"] | {"platform": "x", "peft": "x"},
                           "benchmarks": {"gpu": {"ok": True, "result": res, "command": "gpu_check.py"}}})
    assert "**Dry run**" in page and "| llama-2-7b |" in page and "| median |" in page
    assert md.read_text().startswith("**Dry run**")


def test_gpu_check_without_cuda_says_so_and_exits_2():
    import torch

    if torch.cuda.is_available():
        return  # the real check runs here instead (gpu_check.py without --dry-run)
    p = subprocess.run([sys.executable, str(BENCH / "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "CUDA is not available" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_results_page_marks_the_gpu_section_not_measured_without_a_result():
    sys.path.insert(0, str(BENCH))
    try:
        import run_all
    finally:
        sys.path.pop(0)
    res = json.loads((BENCH / "results.json").read_text())
    res["benchmarks"].pop("gpu", None)
    assert "## GPU check (CUDA)\n\n`python benchmarks/gpu_check.py`\n\nNot measured: no GPU available." in run_all.render(res)


def test_coordinatewise_bench_runs_small(tmp_path):
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, str(BENCH / "bench_coordinatewise.py"), "--n", "9", "--d", "5000",
                        "--residual-d", "700", "--repeat", "1", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    if p.returncode == 2 and "no compiled kernel" in p.stderr:
        import pytest

        pytest.skip("no C compiler here: the bench compares the compiled kernel with numpy")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["rule"] for r in res["rows"]] == ["median", "median_paper", "trimmed_mean", "trimmed_mean_paper",
                                                 "bulyan_stage", "residual"]
    assert all(r["compiled"] > 0 and r["numpy"] > 0 for r in res["rows"]) and res["pass_seconds"] > 0
    assert res["rows"][-1]["timed_d"] == 700
    sys.path.insert(0, str(BENCH))
    try:
        import bench_coordinatewise
    finally:
        sys.path.pop(0)
    assert any(line.startswith("| residual (timed on d = 700, scaled) |") for line in bench_coordinatewise.render(res))


def test_flower_sim_bench_renders_ratios_to_the_smallest_k():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_flower_sim
    finally:
        sys.path.pop(0)
    row = {"rounds": 3, "wall_s": 40.0, "first_round_s": 9.0, "server_s_median": 0.01, "peak_processes": 16, "load_after": 1.0}
    res = {"meta": {"rounds": 3, "cpus": 2}, "rows": [{**row, "clients": 10, "round_s_median": 0.25, "peak_pss_mb": 2000},
                                                     {**row, "clients": 100, "round_s_median": 0.5, "peak_pss_mb": 2200}]}
    md = "\n".join(bench_flower_sim.render(res))
    assert "| 100 | 40.0 | 0.50 | 2.00 | 9.00 | 0.010 | 2,200 | 1.10 | 16 | 1.0 |" in md


def test_clients_bench_runs_small(tmp_path):
    out = tmp_path / "k.json"
    p = subprocess.run([sys.executable, str(BENCH / "bench_clients.py"), "--clients", "10,12", "--rounds", "3",
                        "--variants", "fedavg,scaffold", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["k"], r["variant"]) for r in rows} == {(10, "fedavg"), (10, "scaffold"), (12, "fedavg"), (12, "scaffold")}
    assert all(r["checkpoint_bytes"] > 0 and r["maxrss_mb"] > 0 for r in rows)  # the newest checkpoint was found
