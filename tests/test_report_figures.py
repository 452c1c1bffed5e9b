"""Report figures that make their point: round-0 probe row, integer rounds, coinciding curves, forensic pass."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedsafe.config import load_config
from fedsafe.pipeline import build_engine, resume_run, start_run
from fedsafe.rundir import write_run_header
from fedsafe.report import plots

MONITOR = ["fl.rounds=3", "monitor.every=1", "monitor.max_new_tokens=4", "eval.max_new_tokens=4"]


def final_vec(run_dir):
    sd = load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))
    return torch.cat([sd[k].flatten() for k in sorted(sd)])


def rows(p):
    return [json.loads(x) for x in p.read_text().splitlines()]


def test_round0_probe_row_and_resume_stays_bit_identical(tmp_path):
    cfg = load_config("tiny", MONITOR)
    full = start_run(cfg, tmp_path / "full", progress=False, evaluate=False)
    got = rows(full / "metrics.jsonl")
    assert [r["round"] for r in got] == [-1, 0, 1, 2]
    start = got[0]
    assert start["start"] is True and 0 <= start["probe_refusal"] <= 1 and "probe_false_refusal" in start
    # interrupted after round 1 of 3, then resumed: same adapter, the start row kept exactly once
    part = tmp_path / "part"
    eng = build_engine(cfg, part, progress=False)
    write_run_header(cfg, part, eng.fed)
    eng.record_start()
    eng.run_round(0)
    resume_run(part, progress=False, evaluate=False)
    assert torch.equal(final_vec(full), final_vec(part))
    prow = rows(part / "metrics.jsonl")
    assert [r["round"] for r in prow] == [-1, 0, 1, 2]
    assert prow[0] == start and [r["probe_refusal"] for r in prow] == [r["probe_refusal"] for r in got]
    # interrupted before any checkpoint: a fresh start records round 0 again, once
    early = tmp_path / "early"
    eng = build_engine(cfg, early, progress=False)
    write_run_header(cfg, early, eng.fed)
    eng.record_start()
    resume_run(early, progress=False, evaluate=False)
    assert [r["round"] for r in rows(early / "metrics.jsonl")] == [-1, 0, 1, 2]
    assert torch.equal(final_vec(full), final_vec(early))


def _run(label, ys, start=True):
    ms = [{"round": i, "probe_refusal": y} for i, y in enumerate(ys)]
    if start:
        ms = [{"round": -1, "start": True, "probe_refusal": 0.7}] + ms
    return {"label": label, "metrics": ms, "dir": "unused"}


def test_refusal_by_round_starts_at_zero_integer_ticks_and_shows_coinciding_lines():
    runs = [_run("FedAvg (no attack)", [0.6, 0.55, 0.5, 0.5, 0.45]), _run("FedAvg (attack)", [0.5, 0.4, 0.3, 0.3, 0.3]),
            _run("median (attack)", [0.5, 0.45, 0.35, 0.3, 0.3]), _run("foolsgold (attack)", [0.5, 0.4, 0.3, 0.3, 0.3])]
    fig = plots.refusal_by_round_figure(runs)
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [list(ln.get_xdata())[0] for ln in lines] == [0, 0, 0, 0]  # round 0: the start adapter
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    styles = {(ln.get_marker(), ln.get_linestyle(), ln.get_linewidth()) for ln in lines}
    assert len(styles) == len(lines)  # every line distinguishable
    # FoolsGold's curve equals FedAvg (attack)'s: drawn narrower on top and named in the legend
    att, fg = lines[1], lines[3]
    assert np.array_equal(att.get_ydata(), fg.get_ydata()) and fg.get_linewidth() < att.get_linewidth()
    assert fg.get_zorder() > att.get_zorder()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "foolsgold (attack) (= FedAvg (attack))" in legend and "FedAvg (attack)" in legend
    # old runs without the start row still plot (from round 1)
    fig = plots.refusal_by_round_figure([_run("old", [0.5, 0.4], start=False)])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [1, 2]
    assert plots.refusal_by_round([{"label": "x", "metrics": [], "dir": "-"}]) is None


def test_forensic_pass_full_matrix_and_heatmap(tmp_path, monkeypatch):
    from fedsafe.forensic_pass import forensic_pass
    from fedsafe.report.collect import load_run

    d = start_run(load_config("tiny", ["fl.rounds=1", "eval.max_new_tokens=2"]), tmp_path / "run", progress=False)
    (d / "label.txt").write_text("FedAvg (attack)\n")
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    res = forensic_pass(d)
    K = json.loads((d / "clients.json").read_text())["num_clients"]
    C = np.array(res["cosine"])
    assert res["clients"] == list(range(K)) and C.shape == (K, K)
    assert np.allclose(C, C.T) and np.allclose(np.diag(C), 1.0, atol=1e-5) and np.isfinite(C).all()
    assert [i for i, m in enumerate(res["malicious"]) if m] == json.loads((d / "clients.json").read_text())["malicious_ids"]
    assert all(n > 0 for n in res["norms"])
    # the pass only adds its file
    after = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    assert set(after) - set(before) == {"forensics_full.json"}
    assert all(after[k] == v for k, v in before.items())
    # the heat-map draws the full matrix (no blank pairs), malicious ticks marked
    figs = []
    monkeypatch.setattr(plots, "_png", lambda fig: figs.append(fig) or b"png")
    assert plots.cosine_heatmap([load_run(d)]) == b"png"
    ax = figs[0].axes[0]
    arr = ax.get_images()[0].get_array()
    assert arr.shape == (K, K) and np.isfinite(np.asarray(arr)).all()
    assert "every client trained once" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()][3] == "3*"
    # without the pass: the per-round mean, with the pairs that never met left blank
    (d / "forensics_full.json").unlink()
    plots.cosine_heatmap([load_run(d)])
    assert "blank: never met" in figs[1].axes[0].get_title()
    assert np.isnan(np.asarray(figs[1].axes[0].get_images()[0].get_array(), dtype=float)).any()


def test_forensic_pass_needs_a_finished_run(tmp_path):
    from fedsafe.errors import FedsafeError
    from fedsafe.forensic_pass import forensic_pass

    d = tmp_path / "r"
    cfg = load_config("tiny", ["fl.rounds=1"])
    eng = build_engine(cfg, d, progress=False)
    write_run_header(cfg, d, eng.fed)
    with pytest.raises(FedsafeError, match="no final_adapter"):
        forensic_pass(d)
    with pytest.raises(FedsafeError, match="use final or start"):
        forensic_pass(d, at="middle")
