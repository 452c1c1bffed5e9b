"""Attack registry: formulas on synthetic updates, knowledge refusals, and the engine hooks on tiny."""

import json
import math
from statistics import NormalDist

import pytest
import torch

from fedsafe import attack
from fedsafe.attack.adaptive import alie_z, benign_statistics
from fedsafe.attack.base import RoundContext
from fedsafe.config import load_config
from fedsafe.errors import ConfigError


def ctx(seed=0, n_b=5, n_mal=2, d=40, aggregate=None):
    g = torch.Generator().manual_seed(seed)
    benign = torch.randn(n_b, d, generator=g, dtype=torch.float64) * 0.1 + 0.3
    own = torch.randn(n_mal, d, generator=g, dtype=torch.float64) + 1.0
    return RoundContext(own=own, benign=benign, n=n_b + n_mal, gen=g, aggregate=aggregate)


def run(name, c, **params):
    spec = attack.get_spec(name)
    return attack.REGISTRY[name](c, **attack.resolve_params(spec, params))


def test_registry_lists_every_behaviour_with_a_cited_docstring():
    assert {"data", "none", "sign_flip", "scale", "gaussian", "alie", "ipm", "min_max", "min_sum",
            "stealthy"} <= set(attack.REGISTRY)
    for name, fn in attack.REGISTRY.items():
        assert "Knows" in fn.__doc__, name  # every behaviour states what the attacker knows


def test_client_behaviours_keep_the_engine_arithmetic():
    g = torch.Generator().manual_seed(1)
    glob, y = torch.randn(30, generator=g), torch.randn(30, generator=g)
    cfg = load_config("tiny").attack
    assert attack.apply_client("data", y, glob, g, cfg) is y
    assert torch.equal(attack.apply_client("sign_flip", y, glob, g, cfg), glob + -(y - glob))
    assert torch.equal(attack.apply_client("scale", y, glob, g, cfg), glob + (y - glob) * cfg.scale)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = glob + torch.randn(30, generator=g2) * cfg.noise_std
    assert torch.equal(attack.apply_client("gaussian", y, glob, g1, cfg), want)


def test_alie_shift_equals_mean_minus_z_std():
    c = ctx()
    out, info = run("alie", c)
    z = NormalDist().inv_cdf((7 - (math.floor(7 / 2 + 1) - 2)) / 7)
    assert info["z"] == pytest.approx(z)
    want = c.benign.mean(0) - z * c.benign.std(0)
    assert out.shape == (2, 40) and torch.allclose(out[0], want) and torch.equal(out[0], out[1])
    out2, _ = run("alie", c, z=1.5)
    assert torch.allclose(out2[0], c.benign.mean(0) - 1.5 * c.benign.std(0))
    harm, _ = run("alie", c, z=1.0, direction="harmful")  # shifted towards the harmful update, coordinate-wise
    assert torch.allclose(harm[0], c.benign.mean(0) + c.benign.std(0) * torch.sign(c.own.mean(0) - c.benign.mean(0)))


def test_alie_z_grows_with_the_coalition():
    assert alie_z(10, 1) < alie_z(10, 3) < alie_z(10, 6) and alie_z(10, 6) == pytest.approx(NormalDist().inv_cdf(0.999))


def test_ipm_is_minus_eps_times_benign_mean():
    c = ctx()
    out, _ = run("ipm", c, eps=0.5)
    assert torch.allclose(out, (-0.5 * c.benign.mean(0)).expand(2, -1))
    cos = torch.nn.functional.cosine_similarity(out[0], c.benign.mean(0), dim=0)
    assert cos == pytest.approx(-1.0)


@pytest.mark.parametrize("direction", ["harmful", "inverse_unit", "inverse_std", "inverse_sign"])
def test_min_max_stays_within_the_benign_maximum_distance(direction):
    c = ctx(seed=3)
    out, info = run("min_max", c, direction=direction)
    bound = torch.cdist(c.benign, c.benign).max()
    dist = torch.cdist(out[:1], c.benign).max()
    assert info["gamma"] > 0 and dist <= bound * (1 + 1e-9)
    # and it is the largest such step: twice as far breaks the bound
    mu = c.benign.mean(0)
    further = mu + 1.01 * (out[0] - mu)
    assert torch.cdist(further[None], c.benign).max() > bound


def test_min_sum_stays_within_the_benign_maximum_sum():
    c = ctx(seed=4)
    out, info = run("min_sum", c)
    D = torch.cdist(c.benign, c.benign).pow(2)
    assert torch.cdist(out[:1], c.benign).pow(2).sum() <= D.sum(1).max() * (1 + 1e-9)
    # harmful direction by default: the update moved from the benign mean towards the coalition's update
    mu = c.benign.mean(0)
    assert torch.dot(out[0] - mu, c.own.mean(0) - mu) > 0


def test_min_max_tailored_uses_the_server_rule():
    seen = []

    def median(U):
        seen.append(U.shape)
        return U.median(0).values

    c = ctx(seed=5, aggregate=median)
    out, info = run("min_max", c, target="aggregator")
    assert seen and seen[0] == (7, 40) and info["target"] == "aggregator" and info["gamma"] > 0


def test_stealthy_matches_benign_norm_and_cosine():
    c = ctx(seed=6)
    out, info = run("stealthy", c)
    N, cos = benign_statistics(c.benign)
    m = c.benign.mean(0)
    for u, h in zip(out, c.own):
        assert u.norm() == pytest.approx(N)
        assert torch.nn.functional.cosine_similarity(u, m, dim=0) == pytest.approx(cos)
        # it keeps the harmful part orthogonal to the benign mean, not an arbitrary direction
        mh = m / m.norm()
        hp, up = h - h.dot(mh) * mh, u - u.dot(mh) * mh
        assert torch.nn.functional.cosine_similarity(hp, up, dim=0) == pytest.approx(1.0)


@pytest.mark.parametrize("overrides, match", [
    (["attack.behaviour=alie", "fl.sample_clients=1"], "fl.sample_clients=1"),
    (["attack.behaviour=min_max", "attack.knowledge=estimate", "attack.ref_updates=1"], "ref_updates >= 2"),
    (["attack.behaviour=min_max", "attack.params={target: aggregator}", "fl.aggregator=fltrust"], "root_update"),
    (["attack.behaviour=min_sum", "attack.params={target: aggregator}", "fl.aggregator=centered_clipping"],
     "server state"),
    (["attack.behaviour=ipm", "attack.params={eps: 0}"], "eps"),
    (["attack.behaviour=ipm", "attack.params={epz: 1}"], "did you mean 'eps'"),
    (["attack.behaviour=scale", "attack.knowledge=omniscient"], "leave it empty"),
    (["attack.behaviour=alie", "attack.knowledge=psychic"], "not supported"),
    (["attack.behaviour=alei"], "did you mean 'alie'"),
    (["attack.behaviour=ipm", "fl.sampling=stratified", "fl.sample_clients=1", "fl.malicious_per_round=1"],
     "fills every sampled slot"),
])
def test_unmeetable_knowledge_is_refused_before_training(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("tiny", overrides)


def test_omniscient_needs_benign_clients():
    groups = ("data.groups=[{name: m, clients: 4, malicious: true, mix: {tiny-unaligned: 1.0}}]")
    with pytest.raises(ConfigError, match="every client is malicious"):
        load_config("tiny", [groups, "attack.behaviour=alie"])


def test_cli_refuses_with_one_line_and_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, COLUMNS="300")  # rich wraps long lines at the terminal width
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", "run", "tiny", "attack.behaviour=min_max",
                        "attack.params={target: aggregator}", "fl.aggregator=fltrust", "--run-dir", str(tmp_path / "r")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "cannot target" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_refused_while_the_engine_is_built_leaves_no_run_directory(tmp_path, capsys):
    """The 'estimate' coalition's data check runs when the engine is built, after the run directory was
    made: the refusal removes what it created (also missing parents) and empties nothing that existed."""
    from fedsafe.cli import main

    args = ["run", "tiny", "attack.behaviour=alie", "attack.knowledge=estimate", "attack.ref_updates=100000",
            "fl.rounds=1", "--no-eval", "-q", "--run-dir"]
    assert main([*args, str(tmp_path / "new" / "parent" / "run")]) == 2
    assert "benign-looking reference sets" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty").mkdir()
    assert main([*args, str(tmp_path / "empty")]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["empty"] and list((tmp_path / "empty").iterdir()) == []
    out = tmp_path / "runs"
    assert main([*args[:-1], f"output_dir={out}"]) == 2  # default OUTPUT_DIR/NAME-TIMESTAMP
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]


def test_refused_overwrite_keeps_the_old_run(tmp_path, capsys):
    """`--overwrite` with a config the engine refuses: the run it would replace is still there, whole;
    with a config that starts, the old files are gone and nothing is left beside the new run."""
    from fedsafe.cli import main

    old = tmp_path / "run"
    (old / "eval").mkdir(parents=True)
    (old / "results.json").write_text('{"old": true}')
    (old / "eval" / "responses.jsonl").write_text("{}\n")
    refused = ["run", "tiny", "attack.behaviour=alie", "attack.knowledge=estimate", "attack.ref_updates=100000",
               "fl.rounds=1", "--no-eval", "-q", "--overwrite", "--run-dir", str(old)]
    assert main(refused) == 2
    assert "benign-looking reference sets" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (old / "results.json").read_text() == '{"old": true}' and (old / "eval" / "responses.jsonl").exists()
    assert main(["run", "tiny", "fl.rounds=1", "--no-eval", "-q", "--overwrite", "--run-dir", str(old)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert not (old / "results.json").exists() and (old / "final_adapter").is_dir()


@pytest.mark.parametrize("behaviour, knowledge", [("alie", "omniscient"), ("stealthy", "estimate")])
def test_engine_crafts_the_malicious_update(tmp_path, behaviour, knowledge):
    from fedsafe.pipeline import build_engine

    cfg = load_config("tiny", ["fl.rounds=2", f"attack.behaviour={behaviour}", f"attack.knowledge={knowledge}",
                               "fl.sampling=stratified"])
    seen = {}

    def hook(cid, rnd, sd):
        seen[cid] = sd
        return sd

    eng = build_engine(cfg, tmp_path, progress=False, update_hook=hook)
    v0 = eng.global_vec.clone()
    row = eng.run_round(0)
    assert row["malicious"] == [3] and row["attack"]["behaviour"] == behaviour
    assert row["attack"]["knowledge"] == knowledge and row["attack"]["benign_seen"] >= 2
    from fedsafe.fl.updates import validate_state

    deltas = {c: validate_state(sd, eng.keys, eng.shapes, v0, 1e9) - v0 for c, sd in seen.items()}
    benign = torch.stack([deltas[c] for c in row["sampled"] if c != 3])
    if behaviour == "alie":
        z = row["attack"]["z"]
        assert torch.allclose(deltas[3], benign.mean(0) - z * benign.std(0), atol=1e-6)
    else:
        assert deltas[3].norm() == pytest.approx(row["attack"]["norm"], rel=1e-4)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["attack"]["clients"] == [3]


def test_matrix_splits_labels_and_takes_each_defense_worst_case():
    from fedsafe.report import matrix

    def run(label, refusal, fr):
        return {"label": label, "results": {"refusal": {"rate": refusal}, "false_refusal": {"rate": fr}}}

    runs = [run("fl.aggregator=mean, attack.behaviour=data", 0.5, 0.1),
            run("fl.aggregator=mean, attack.behaviour=alie", 0.2, 0.1),
            run("fl.aggregator=krum, attack.behaviour=data", 0.6, 0.3),
            run("fl.aggregator=krum, attack.behaviour=alie", 0.7, 0.2),
            run("fl.aggregator=krum, attack.behaviour=alie", 0.9, 0.2)]  # a second seed: averaged
    m = matrix.build(runs)
    assert m["defenses"] == ["mean", "krum"] and m["attacks"] == ["data", "alie"]
    assert m["refusal"]["krum"] == pytest.approx([60.0, 80.0])
    assert m["worst"] == {"mean": {"refusal": pytest.approx(20.0), "attack": "alie"},
                          "krum": {"refusal": pytest.approx(60.0), "attack": "data"}}
    md = matrix.markdown(m)
    assert "| mean | 50.0 | 20.0 | **20.0** (alie) |" in md and "False refusal" in md
    assert matrix.build(runs[:1]) is None  # no attack axis, no matrix
    assert matrix.heatmap(m)[:4] == b"\x89PNG"


def test_sweep_with_an_attack_axis_draws_the_matrix(tmp_path):
    from fedsafe.sweep import run_sweep

    root = run_sweep("tiny", ["fl.aggregator=mean,median", "attack.behaviour=data,ipm"], seeds=1,
                     overrides=["fl.rounds=1", "eval.max_new_tokens=2"], out_dir=tmp_path / "s", progress=False)
    m = json.loads((root / "report" / "matrix.json").read_text())
    assert m["defenses"] == ["mean", "median"] and m["attacks"] == ["data", "ipm"]
    assert all(v is not None for d in m["defenses"] for v in m["refusal"][d])
    # real eval outputs: median is tested against the no-defense row (mean) prompt by prompt
    assert m["reference"] == "mean" and all(t["pairs"] == 8 for t in m["tests"]["refusal"]["median"])
    assert (root / "report" / "attack_matrix.png").stat().st_size > 1000
    assert "worst case" in (root / "report" / "matrix.md").read_text()
