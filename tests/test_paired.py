"""Paired statistics (fedsafe.eval.paired), `fedsafe compare`, and the report's vs clean / vs attacked columns."""

import json
import math

import numpy as np
import pytest

from fedsafe.cli import main
from fedsafe.eval.paired import (mcnemar_exact, newcombe_paired_ci, paired_bootstrap, paired_summary, seed_test,
                                 t_two_sided_p)

# ---------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("b,c,p", [
    (10, 2, 2 * (1 + 12 + 66) / 2**12),  # by hand: 2 * P[Bin(12, 1/2) <= 2] = 0.0386
    (11, 1, 2 * (1 + 12) / 2**12),  # 0.00635
    (9, 4, 2 * (1 + 13 + 78 + 286 + 715) / 2**13),  # 0.267 (the paper's Krum vs clean in issue 15)
    (39, 14, None),
])
def test_mcnemar_exact_by_hand(b, c, p):
    got = mcnemar_exact(b, c)
    if p is not None:
        assert got == pytest.approx(p, rel=1e-12)
    else:  # 39 vs 14 on 313 prompts: the p = 0.0008
        assert 0.0007 < got < 0.0009
    assert mcnemar_exact(c, b) == got


def test_mcnemar_rounded_values_and_edges():
    assert round(mcnemar_exact(10, 2), 4) == 0.0386 and round(mcnemar_exact(11, 1), 5) == 0.00635
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0  # capped at 1
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_newcombe_method10_published_example():
    # Bentur et al. (2009) airway hyper-responsiveness, paired 2x2 [[1, 1], [7, 12]]: Newcombe's interval
    # -0.507 to -0.026 (Fagerland, Lydersen & Laake 2014; R contingencytables)
    lo, hi = newcombe_paired_ci(1, 1, 7, 12)
    assert (lo, hi) == pytest.approx((-0.5069, -0.0256), abs=1e-4)
    # swapping A and B mirrors the interval
    lo2, hi2 = newcombe_paired_ci(1, 7, 1, 12)
    assert (lo2, hi2) == pytest.approx((-hi, -lo))


def test_newcombe_by_hand_with_positive_correlation():
    a, b, c, d = 60, 10, 2, 8
    n = 80
    from fedsafe.eval.stats import wilson

    pa, pb = 70 / n, 62 / n
    la, ua = wilson(70, n)
    lb, ub = wilson(62, n)
    phi = (a * d - b * c - n / 2) / math.sqrt(70 * 10 * 62 * 18)  # Newcombe's adjusted phi (ad - bc > n/2)
    lo = (pa - pb) - math.sqrt((pa - la) ** 2 - 2 * phi * (pa - la) * (ub - pb) + (ub - pb) ** 2)
    hi = (pa - pb) + math.sqrt((ua - pa) ** 2 - 2 * phi * (ua - pa) * (pb - lb) + (pb - lb) ** 2)
    assert newcombe_paired_ci(a, b, c, d) == pytest.approx((lo, hi), abs=1e-12)
    assert lo < 0.1 < hi and lo > 0  # 10 vs 2 on 80 prompts: the interval excludes 0, as McNemar p < 0.05


def test_paired_bootstrap_fixed_seed():
    x = [1] * 30 + [1] * 10 + [0] * 2 + [0] * 38
    y = [1] * 30 + [0] * 10 + [1] * 2 + [0] * 38
    lo, hi = paired_bootstrap(x, y, reps=2000, seed=0)
    # the same computation by hand, same generator
    dif = np.array(x) - np.array(y)
    idx = np.random.default_rng(0).integers(0, 80, size=(2000, 80))
    means = dif[idx].mean(axis=1)
    assert (lo, hi) == (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))
    assert lo < 0.1 < hi and lo > 0
    assert paired_bootstrap(x, y, reps=2000, seed=0) == (lo, hi)
    assert (lo, hi) == pytest.approx((0.025, 0.1875))  # fixed seed 0: 10 vs 2 discordant on 80 prompts
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)


def test_paired_summary_table():
    x = [1] * 30 + [1] * 10 + [0] * 2 + [0] * 38
    y = [1] * 30 + [0] * 10 + [1] * 2 + [0] * 38
    s = paired_summary(x, y)
    assert (s["both"], s["only_a"], s["only_b"], s["neither"]) == (30, 10, 2, 38)
    assert s["rate_a"] == 0.5 and s["rate_b"] == 0.4 and s["diff"] == pytest.approx(0.1)
    assert s["p_mcnemar"] == pytest.approx(0.0386, abs=1e-4)


@pytest.mark.parametrize("t,df", [(12.7062, 1), (4.302653, 2), (3.182446, 3), (2.776445, 4), (2.228139, 10)])
def test_t_p_values_match_tables(t, df):
    assert t_two_sided_p(t, df) == pytest.approx(0.05, abs=1e-5)


def test_seed_test_by_hand():
    s = seed_test([0.1, 0.2, 0.15])
    assert s["mean"] == pytest.approx(0.15) and s["sd"] == pytest.approx(0.05)
    assert s["t"] == pytest.approx(0.15 / (0.05 / math.sqrt(3)))
    assert 0.03 < s["p_t"] < 0.04  # t = 5.196, df = 2
    assert s["p_signflip"] == 2 / 8  # only all-+ and all-- reach |mean| = 0.15
    assert seed_test([0.1, 0.1, 0.1, 0.1, 0.1])["p_signflip"] == 2 / 32
    assert seed_test([0.1, -0.1])["p_signflip"] == 1.0
    assert seed_test([0.2])["p_t"] is None


# ---------------------------------------------------------------------------------------------- compare


def fake_run(d, harmful, benign, *, judge="rule", label=None, seed=0, prefix="p"):
    """A run directory holding what evaluate_run writes: results.json and eval/{harmful,benign}.jsonl.
    ``harmful``/``benign``: list of labels, one per prompt (ids p0, p1, ...)."""
    from fedsafe.eval.stats import rate_summary

    (d / "eval").mkdir(parents=True)
    res = {"judge": judge}
    for name, key, labels in (("harmful", "refusal", harmful), ("benign", "false_refusal", benign)):
        rows = [{"id": f"{prefix}{name}{i}", "sample": 0, "prompt": f"{name} prompt {i}", "response": "...",
                 "judge": judge, "label": lab} for i, lab in enumerate(labels)]
        (d / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        res[key] = rate_summary(labels)
    (d / "results.json").write_text(json.dumps(res))
    (d / "config.yaml").write_text(f"name: {d.name}\nseed: {seed}\n")
    if label:
        (d / "label.txt").write_text(label + "\n")
    return d


S, U = "safe", "unsafe"
CLEAN_H = [S] * 30 + [S] * 10 + [U] * 2 + [U] * 38  # refused by clean: 40 of 80
ATTACK_H = [S] * 30 + [U] * 10 + [S] * 2 + [U] * 38  # refused by attacked: 32 of 80 -> 10 vs 2 discordant
CLEAN_B = [S] * 4 + [U] * 36
ATTACK_B = [S] * 3 + [U] * 37


def test_compare_fake_runs_text_and_json(tmp_path, capsys):
    a = fake_run(tmp_path / "clean", CLEAN_H, CLEAN_B)
    b = fake_run(tmp_path / "attack", ATTACK_H, ATTACK_B)
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("refusal (harmful)"))
    assert "50.0" in line and "40.0" in line and "+10.0" in line and "10:2" in line and "0.039" in line
    assert "false refusal (benign)" in out and "bootstrap" in out
    assert main(["compare", str(a), str(b), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    m = res["metrics"]["refusal"]
    assert (m["only_a"], m["only_b"], m["n"]) == (10, 2, 80)
    assert m["p_mcnemar"] == pytest.approx(2 * 79 / 4096)
    assert m["ci_low"] < m["diff"] < m["ci_high"] and m["ci_low"] > 0
    fr = res["metrics"]["false_refusal"]
    assert (fr["only_a"], fr["only_b"], fr["p_mcnemar"]) == (1, 0, 1.0)


def test_compare_pairs_by_id_not_position(tmp_path, capsys):
    a = fake_run(tmp_path / "a", CLEAN_H, CLEAN_B)
    b = fake_run(tmp_path / "b", ATTACK_H, ATTACK_B)
    # the same verdicts in another order: pairing by id must give the same table
    p = b / "eval" / "harmful.jsonl"
    p.write_text("".join(reversed(p.read_text().splitlines(keepends=True))))
    assert main(["compare", str(a), str(b), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]["refusal"]
    assert (m["only_a"], m["only_b"]) == (10, 2)


def test_compare_across_seeds(tmp_path, capsys):
    a = [fake_run(tmp_path / f"c{s}", CLEAN_H, CLEAN_B, seed=s) for s in (1, 2, 3)]
    shifts = {1: ATTACK_H, 2: [U] * 80, 3: CLEAN_H}
    b = [fake_run(tmp_path / f"a{s}", shifts[s], ATTACK_B, seed=s) for s in (3, 1, 2)]  # any order
    assert main(["compare", ",".join(map(str, a)), ",".join(str(tmp_path / f"a{s}") for s in (3, 1, 2)), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seeds"] == [1, 2, 3] and [p["seed"] for p in res["per_seed"]] == [1, 2, 3]
    diffs = [p["metrics"]["refusal"]["diff"] for p in res["per_seed"]]
    assert diffs == pytest.approx([0.1, 0.5, 0.0])
    s = res["across_seeds"]["refusal"]
    assert s["k"] == 3 and s["mean"] == pytest.approx(0.2) and s["p_signflip"] is not None
    assert main(["compare", ",".join(map(str, a)), ",".join(map(str, b))]) == 0
    assert "across 3 seeds" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["prompts", "text", "judge", "unevaluated", "missing_file", "seeds"])
def test_compare_bad_input_one_line_exit_2(tmp_path, capsys, case):
    a = fake_run(tmp_path / "a", CLEAN_H, CLEAN_B)
    if case == "prompts":
        b = fake_run(tmp_path / "b", ATTACK_H, ATTACK_B, prefix="q")
        msg = "different harmful prompts"
    elif case == "text":
        b = fake_run(tmp_path / "b", ATTACK_H, ATTACK_B)
        p = b / "eval" / "harmful.jsonl"
        p.write_text(p.read_text().replace("harmful prompt 3", "another prompt"))
        msg = "different text"
    elif case == "judge":
        b = fake_run(tmp_path / "b", ATTACK_H, ATTACK_B, judge="md-judge")
        msg = "different judges"
    elif case == "unevaluated":
        b = tmp_path / "b"
        b.mkdir()
        (b / "config.yaml").write_text("name: b\n")
        msg = "not evaluated yet"
    elif case == "missing_file":
        b = fake_run(tmp_path / "b", ATTACK_H, ATTACK_B)
        (b / "eval" / "harmful.jsonl").unlink()
        msg = "no harmful.jsonl"
    else:
        b = fake_run(tmp_path / "b", ATTACK_H, ATTACK_B, seed=5)
        a = f"{a},{fake_run(tmp_path / 'a2', CLEAN_H, CLEAN_B, seed=1)}"
        msg = "different seeds"
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert msg in " ".join(err.split()) and "Traceback" not in err
    assert err.count("error:") == 1 and err.startswith("error:")  # one message (the console wraps long lines)


def test_compare_two_tiny_runs(tmp_path, capsys):
    """End to end on real runs: two tiny federations (1 round), one judged by another rule list; --judge
    re-judges the stored responses so the two are comparable; an unfinished run is refused."""
    d = {}
    for name, extra in (("a", []), ("b", ["fl.aggregator=median"]), ("c", ["eval.judge=rule-prefix"]),
                        ("short", ["data.eval_harmful_n=6"])):
        d[name] = tmp_path / name
        assert main(["run", "tiny", "fl.rounds=1", "eval.max_new_tokens=4", *extra, "--run-dir", str(d[name]), "-q"]) == 0
    capsys.readouterr()
    assert main(["compare", str(d["a"]), str(d["b"]), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    ha = json.loads((d["a"] / "results.json").read_text())["refusal"]
    m = res["metrics"]["refusal"]
    assert m["n"] == ha["n"] == 8 and m["rate_a"] == pytest.approx(ha["rate"])
    assert main(["compare", str(d["a"]), str(d["c"])]) == 2
    assert "different judges" in " ".join(capsys.readouterr().err.split())
    assert main(["compare", str(d["a"]), str(d["c"]), "--judge", "rule"]) == 0
    assert "refusal (harmful)" in capsys.readouterr().out
    assert main(["compare", str(d["a"]), str(d["short"])]) == 2
    assert "different harmful prompts (2 only in A, 0 only in B)" in " ".join(capsys.readouterr().err.split())
    unfinished = tmp_path / "unfinished"
    assert main(["run", "tiny", "fl.rounds=1", "--no-eval", "--run-dir", str(unfinished), "-q"]) == 0
    capsys.readouterr()
    assert main(["compare", str(d["a"]), str(unfinished)]) == 2
    assert "not evaluated yet" in " ".join(capsys.readouterr().err.split())


# ---------------------------------------------------------------------------------------------- report


def test_report_vs_clean_and_vs_attacked_columns(tmp_path):
    from fedsafe.report.render import render

    runs = [fake_run(tmp_path / "clean_fedavg", CLEAN_H, CLEAN_B, label="FedAvg (no attack)"),
            fake_run(tmp_path / "attack_fedavg", ATTACK_H, ATTACK_B, label="FedAvg (attack)"),
            fake_run(tmp_path / "defense", CLEAN_H[:79] + [S], CLEAN_B, label="FedAvg (attack) + post-hoc defense L2")]
    out = render(runs, tmp_path / "rep")
    rows = {r["method"]: r for r in json.loads((out / "table.json").read_text())["rows"]}
    att = rows["FedAvg (attack)"]["vs_clean"]["refusal"]
    assert att["diff"] == pytest.approx(-0.1) and att["p_mcnemar"] == pytest.approx(2 * 79 / 4096)
    assert (att["only_a"], att["only_b"]) == (2, 10)
    dfn = rows["FedAvg (attack) + post-hoc defense L2"]["vs_attacked"]["refusal"]
    assert dfn["diff"] == pytest.approx(0.1 + 1 / 80) and dfn["p_mcnemar"] < 0.05
    assert "vs_clean" not in rows["FedAvg (no attack)"] and "vs_attacked" not in rows["FedAvg (attack)"]
    md = (out / "table.md").read_text()
    assert "vs clean (Δ points [95% CI], p)" in md and "vs attacked" in md and "Newcombe" in md
    line = next(x for x in md.splitlines() if x.startswith("| FedAvg (attack) |"))
    assert "refusal -10.0 [" in line and "p=0.039" in line
    html = (out / "index.html").read_text()
    assert "vs clean (Δ points [95% CI], p)" in html and "p=0.039" in html
    assert "vs_clean_refusal" in (out / "table.csv").read_text()


def test_report_multi_seed_columns_and_no_columns_without_references(tmp_path):
    from fedsafe.report.render import render

    runs = []
    for s in (1, 2):
        runs.append(fake_run(tmp_path / f"clean{s}", CLEAN_H, CLEAN_B, label="FedAvg (no attack)", seed=s))
        runs.append(fake_run(tmp_path / f"att{s}", ATTACK_H if s == 1 else [U] * 80, ATTACK_B, label="FedAvg (attack)",
                             seed=s))
    out = render(runs, tmp_path / "rep")
    row = next(r for r in json.loads((out / "table.json").read_text())["rows"] if r["method"] == "FedAvg (attack)")
    s = row["vs_clean"]["refusal"]
    assert s["k"] == 2 and s["mean"] == pytest.approx(-(0.1 + 0.5) / 2)
    assert "(2 seeds)" in (out / "table.md").read_text()
    plain = render([fake_run(tmp_path / "x", CLEAN_H, CLEAN_B, label="mean"),
                    fake_run(tmp_path / "y", ATTACK_H, ATTACK_B, label="median")], tmp_path / "rep2")
    assert "vs clean" not in (plain / "table.md").read_text()
