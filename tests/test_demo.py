"""`fedsafe demo --quick` on the tiny model: every report file and the table's schema; sweep; report."""

import json
import subprocess
import sys

import pytest

from fedsafe.demo import run_demo

EXPECTED_ROWS = ["Model as shipped (no adapter)", "FedAvg (no attack)", "FedAvg (attack)", "median (attack)", "krum_paper (attack)",
                 "foolsgold (attack)", "FedAvg (attack) + post-hoc defense L1", "FedAvg (attack) + post-hoc defense L2"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo") / "demo"
    run_demo("tiny", ["fl.rounds=2", "monitor.every=1", "eval.max_new_tokens=4", "monitor.max_new_tokens=4"], d,
             quick=True, progress=False)
    return d


def test_demo_report_files_and_schema(demo_dir):
    rep = demo_dir / "report"
    for f in ("table.md", "table.csv", "table.json", "index.html", "methods.png", "refusal_by_round.png",
              "cosine_heatmap.png", "client_weights.png"):
        assert (rep / f).exists() and (rep / f).stat().st_size > 0, f
    rows = json.loads((rep / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == EXPECTED_ROWS
    for r in rows:
        assert {"refusal", "refusal_ci", "refusal_n", "false_refusal", "false_refusal_ci", "ref_nll", "judge"} <= set(r)
        assert 0 <= r["refusal"] <= 100 and r["refusal_ci"][0] <= r["refusal"] <= r["refusal_ci"][1]
    md = (rep / "table.md").read_text()
    assert md.count("\n|") >= len(EXPECTED_ROWS) + 1 and "Wilson" in md
    html = (rep / "index.html").read_text()
    assert '<table id="results">' in html and html.count("data:image/png;base64,") == 4
    timings = json.loads((demo_dir / "timings.json").read_text())
    assert "total" in timings and "attack_fedavg" in timings


def test_demo_resumes_without_recomputing(demo_dir):
    res = demo_dir / "runs" / "attack_fedavg" / "results.json"
    before = res.stat().st_mtime_ns
    run_demo("tiny", ["fl.rounds=2", "monitor.every=1", "eval.max_new_tokens=4", "monitor.max_new_tokens=4"], demo_dir,
             quick=True, progress=False)
    assert res.stat().st_mtime_ns == before


def test_report_rerenders_from_run_dirs(demo_dir, tmp_path):
    runs = [str(p) for p in sorted((demo_dir / "runs").iterdir())]
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", "report", *runs, "--out", str(tmp_path / "rep")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rep" / "index.html").exists() and "| Method |" in p.stdout


def test_sweep_matrix_with_seeds(tmp_path):
    from fedsafe.sweep import run_sweep

    root = run_sweep("tiny", ["fl.aggregator=mean,median"], seeds=2, overrides=["fl.rounds=1", "eval.max_new_tokens=2"],
                     out_dir=tmp_path / "s", progress=False)
    rows = json.loads((root / "report" / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["fl.aggregator=mean", "fl.aggregator=median"]
    assert all(r["seeds"] == 2 and "refusal_std" in r for r in rows)
    assert len(list((root / "cells").iterdir())) == 4


def test_sweep_failed_cell_does_not_stop_the_rest(tmp_path):
    from fedsafe.sweep import run_sweep

    root = run_sweep("tiny", ["data.eval_harmful_n=4,100000"], seeds=1, overrides=["fl.rounds=1", "eval.max_new_tokens=2"],
                     out_dir=tmp_path / "s", progress=False)
    failures = json.loads((root / "failures.json").read_text())
    assert len(failures) == 1 and "100000" in next(iter(failures))
    rows = json.loads((root / "report" / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["data.eval_harmful_n=4"]


@pytest.mark.skipif(not __import__("shutil").which("chromium"), reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(demo_dir, tmp_path):
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
    p = subprocess.run(["bash", str(script), str(demo_dir / "report"), str(tmp_path / "shot.png")],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr + p.stdout
    assert (tmp_path / "shot.png").stat().st_size > 10_000
    assert "images: 4" in p.stdout


def test_ci_runs_the_readme_test_command_with_chromium():
    """CI (.ci/run) runs exactly the README's quick-start (b) test command, after installing Debian's
    chromium when it is missing, so the browser test above runs there instead of being skipped."""
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    block = readme.split("# (b) install and run the tests", 1)[1].splitlines()[1].strip()
    ci = (repo / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1].strip() == block and block.endswith("python -m pytest -q")
    assert any("apt-get install -y" in line and "chromium" in line for line in ci)
    assert any("command -v chromium" in line for line in ci)


def test_full_tier_adds_seeds_and_dose_response(tmp_path, monkeypatch):
    """The full tier's structure on the tiny model (its sizes shrunk): seed rows pooled, a dose run with
    exactly k malicious clients per round, and the dose-response figure."""
    import yaml

    from fedsafe import demo

    monkeypatch.setitem(demo.TIERS, "full", demo.Tier("demo", seeds=(0, 1), rules=(), doses=(2,), levels=()))
    groups = ("data.groups=[{name: benign, clients: 3, mix: {tiny: 0.75, 'aligned:tiny-harmful': 0.25}}, "
              "{name: malicious, clients: 2, malicious: true, mix: {tiny-unaligned: 1.0}}]")
    d = run_demo("tiny", [groups, "fl.sampling=stratified", "fl.rounds=1", "eval.max_new_tokens=2"], tmp_path / "demo",
                 full=True, progress=False)
    rows = json.loads((d / "report" / "table.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["Model as shipped (no adapter)", "FedAvg (no attack)", "FedAvg (attack)",
                                           "FedAvg (attack, 2 malicious per round)"]
    assert [r["seeds"] for r in rows[1:]] == [2, 2, 1]
    # a one-seed row against the two-seed clean pair is paired with seed 0's clean run (McNemar), not put
    # through a one-seed t-test; the two-seed attacked row gets the test on its per-seed differences
    assert "p_mcnemar" in rows[3]["vs_clean"]["refusal"] and "k" not in rows[3]["vs_clean"]["refusal"]
    assert rows[2]["vs_clean"]["refusal"]["k"] == 2
    assert (d / "runs" / "attack_fedavg_seed1" / "config.yaml").exists()
    assert yaml.safe_load((d / "runs" / "attack_fedavg_seed1" / "config.yaml").read_text())["seed"] == 1
    dose = d / "runs" / "attack_fedavg_dose2"
    assert yaml.safe_load((dose / "config.yaml").read_text())["fl"]["malicious_per_round"] == 2
    rounds = [json.loads(x) for x in (dose / "metrics.jsonl").read_text().splitlines()]
    assert all(len(m["malicious"]) == 2 for m in rounds if m.get("round", 0) >= 0)
    assert (d / "report" / "dose_response.png").stat().st_size > 0


def test_quick_and_full_exclude_each_other():
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", "demo", "--quick", "--full"], capture_output=True, text=True)
    assert p.returncode == 2 and "exclude each other" in p.stderr and "Traceback" not in p.stderr
