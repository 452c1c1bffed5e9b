"""Significance marks of the attack x defense matrix: paired exact McNemar against the no-defense row."""

from __future__ import annotations

import json

import pytest
import yaml

from fedsafe.errors import ConfigError, FedsafeError
from fedsafe.eval.paired import mcnemar_exact
from fedsafe.eval.stats import rate_summary
from fedsafe.report import matrix
from fedsafe.report.collect import load_run

S, U = "safe", "unsafe"


def cell(root, aggregator, behaviour, harmful, benign, *, seed=0, reverse=False, judge="rule"):
    """A sweep cell as the pipeline writes it: label, config.yaml, results.json, eval/{harmful,benign}.jsonl."""
    d = root / f"{aggregator}_{behaviour}_seed{seed}"
    (d / "eval").mkdir(parents=True)
    res = {"judge": judge}
    for name, key, labels in (("harmful", "refusal", harmful), ("benign", "false_refusal", benign)):
        rows = [{"id": f"{name}{i}", "sample": 0, "prompt": f"{name} prompt {i}", "response": "...", "judge": judge,
                 "label": lab} for i, lab in enumerate(labels)]
        if reverse:  # pairing must go by prompt id, not by position
            rows.reverse()
        (d / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        res[key] = rate_summary(labels)
    (d / "results.json").write_text(json.dumps(res))
    cfg = {"name": "t", "seed": seed, "fl": {"aggregator": aggregator}, "attack": {"behaviour": behaviour},
           "defense": {"enabled": False, "projection": False, "every_rounds": 0}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "label.txt").write_text(f"fl.aggregator={aggregator}, attack.behaviour={behaviour}\n")
    return load_run(d)


# 40 harmful prompts. The reference (mean) refuses the first 10 under 'data' and the first 4 under 'alie'.
REF_DATA = [S] * 10 + [U] * 30
REF_ALIE = [S] * 4 + [U] * 36
BEN = [U] * 20


def test_cells_far_from_no_defense_are_unmarked_close_ones_marked(tmp_path):
    runs = [cell(tmp_path, "mean", "data", REF_DATA, BEN), cell(tmp_path, "mean", "alie", REF_ALIE, BEN),
            # krum refuses 30 under data (20 more than mean: 20:0 discordant, p ~ 2e-6) ...
            cell(tmp_path, "krum", "data", [S] * 30 + [U] * 10, BEN, reverse=True),
            # ... and 6 under alie, refusing prompts 4,5 that mean did not: 2:0, p = 0.5
            cell(tmp_path, "krum", "alie", [S] * 6 + [U] * 34, BEN),
            # median: 11 vs 10 refusals but 6:5 discordant
            cell(tmp_path, "median", "data", [U] * 5 + [S] * 5 + [S] * 6 + [U] * 24, BEN),
            cell(tmp_path, "median", "alie", [U] * 40, BEN)]  # 0:4, p = 0.125
    m = matrix.build(runs)
    assert m["reference"] == "mean" and m["attacks"] == ["data", "alie"]
    t = m["tests"]["refusal"]
    assert t["mean"] == [None, None]
    assert (t["krum"][0]["only_cell"], t["krum"][0]["only_reference"]) == (20, 0)  # paired by id despite the order
    assert t["krum"][0]["p"] == pytest.approx(mcnemar_exact(20, 0)) and t["krum"][0]["p"] < 1e-5
    assert t["krum"][1]["p"] == pytest.approx(0.5)
    assert (t["median"][0]["only_cell"], t["median"][0]["only_reference"]) == (6, 5)
    assert t["median"][1]["p"] == pytest.approx(0.125)
    assert not matrix.not_significant(m, "refusal", "krum", 0)
    assert matrix.not_significant(m, "refusal", "krum", 1) and matrix.not_significant(m, "refusal", "median", 0)
    md = matrix.markdown(m)
    assert "| krum | 75.0 | 15.0† | **15.0**† (alie) |" in md
    assert "| mean (reference) | 25.0 | 10.0 | **10.0** (alie) |" in md
    assert "| median | 27.5† | 0.0† | **0.0**† (alie) |" in md
    assert "exact McNemar" in md
    # identical benign verdicts everywhere: no discordant pair, p = 1, every false-refusal cell marked
    assert all(x["p"] == 1.0 for d in ("krum", "median") for x in m["tests"]["false_refusal"][d])
    assert matrix.heatmap(m)[:4] == b"\x89PNG"


def test_seeds_pool_their_discordant_pairs(tmp_path):
    # per seed 3:0 (p = 0.25 each, not significant); pooled over 3 seeds 9:0 (p = 0.0039)
    runs = []
    for s in (0, 1, 2):
        runs += [cell(tmp_path, "mean", "data", REF_DATA, BEN, seed=s), cell(tmp_path, "mean", "ipm", REF_ALIE, BEN, seed=s),
                 cell(tmp_path, "krum", "data", [S] * 13 + [U] * 27, BEN, seed=s),
                 cell(tmp_path, "krum", "ipm", REF_ALIE, BEN, seed=s)]
    m = matrix.build(runs)
    t = m["tests"]["refusal"]["krum"]
    assert (t[0]["only_cell"], t[0]["only_reference"], t[0]["seeds"], t[0]["pairs"]) == (9, 0, 3, 120)
    assert t[0]["p"] == pytest.approx(2 / 2**9)
    assert not matrix.not_significant(m, "refusal", "krum", 0) and matrix.not_significant(m, "refusal", "krum", 1)


def test_reference_choice_and_refusals(tmp_path):
    runs = [cell(tmp_path, "krum", "data", REF_DATA, BEN), cell(tmp_path, "krum", "alie", REF_ALIE, BEN),
            cell(tmp_path, "median", "data", [S] * 30 + [U] * 10, BEN),
            cell(tmp_path, "median", "alie", [S] * 30 + [U] * 10, BEN)]
    m = matrix.build(runs)  # no plain-FedAvg row: the matrix is drawn, without marks, and says why
    assert m["reference"] is None and "no row is plain FedAvg" in m["no_tests"]
    assert "No significance marks" in matrix.markdown(m) and "†" not in matrix.markdown(m)
    m = matrix.build(runs, reference="krum")  # an explicit reference
    assert m["tests"]["refusal"]["median"][0]["p"] < 1e-5
    with pytest.raises(FedsafeError, match="not a defense row"):
        matrix.build(runs, reference="flame")


def test_other_judges_are_not_tested_but_reported(tmp_path):
    runs = [cell(tmp_path, "mean", "data", REF_DATA, BEN), cell(tmp_path, "mean", "alie", REF_ALIE, BEN),
            cell(tmp_path, "krum", "data", [S] * 30 + [U] * 10, BEN, judge="md-judge"),
            cell(tmp_path, "krum", "alie", REF_ALIE, BEN)]
    m = matrix.build(runs)
    bad = m["tests"]["refusal"]["krum"][0]
    assert bad["p"] is None and "different judges" in bad["why"]
    assert not matrix.not_significant(m, "refusal", "krum", 0)  # untested: no mark either way
    assert matrix.not_significant(m, "refusal", "krum", 1)


def test_sweep_refuses_an_unknown_reference_before_training(tmp_path):
    from fedsafe.sweep import run_sweep

    with pytest.raises(ConfigError, match="not a defense row"):
        run_sweep("tiny", ["fl.aggregator=mean,median", "attack.behaviour=data,ipm"], out_dir=tmp_path / "s",
                  progress=False, reference="krum")
    assert not list((tmp_path / "s" / "cells").iterdir())
