"""Defenses beyond the paper: the safety-subspace projection and FLAME, on synthetic updates and on tiny."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from fedsafe.config import load_config
from fedsafe.defense.projection import module_groups, project, unsafe_direction
from fedsafe.errors import ConfigError

KEYS = ["m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_B.weight",
        "m.layers.0.v_proj.lora_A.weight", "m.layers.0.v_proj.lora_B.weight"]
SHAPES = [(2, 5), (5, 2), (2, 5), (5, 2)]


def test_unsafe_direction_points_from_the_aligned_start_to_the_base_model():
    aligned = torch.randn(40, generator=torch.Generator().manual_seed(0))
    u = unsafe_direction(aligned, KEYS, SHAPES)
    # lora_B entries (10:20 and 30:40) go to zero, lora_A entries stay: B = 0 is exactly the base model
    assert torch.equal(u[10:20], -aligned[10:20]) and torch.equal(u[30:40], -aligned[30:40])
    assert not u[0:10].any() and not u[20:30].any()
    assert [m for m, _, _ in module_groups(KEYS, SHAPES)] == ["m.layers.0.q_proj", "m.layers.0.v_proj"]


def test_projection_removes_exactly_the_component_along_the_unsafe_direction():
    g = torch.Generator().manual_seed(1)
    groups = module_groups(KEYS, SHAPES)
    u = unsafe_direction(torch.randn(40, generator=g, dtype=torch.float64), KEYS, SHAPES)
    other = torch.randn(40, generator=g, dtype=torch.float64)
    delta = other.clone()
    for _, idx, _ in groups:  # build delta_l = 0.7 u_l + (part of `other` orthogonal to u_l)
        v, o = u[idx], other[idx]
        delta[idx] = 0.7 * v + (o - o.dot(v) / v.dot(v) * v)
    out, changed, info = project(delta, u, groups, threshold=0.0)
    assert info["modules"] == 2 and changed.all()
    for _, idx, _ in groups:
        v = u[idx]
        assert float(out[idx].dot(v)) == pytest.approx(0.0, abs=1e-12)  # nothing left along u
        assert torch.allclose(delta[idx] - out[idx], 0.7 * v)  # and exactly that component removed
    # a module moving away from the unsafe direction (cosine <= threshold) is left alone
    away = -delta
    out2, changed2, info2 = project(away, u, groups, threshold=0.0)
    assert info2["modules"] == 0 and not changed2.any() and torch.equal(out2, away)
    # a high threshold only projects modules that point strongly at the unsafe direction
    _, _, info3 = project(delta, u, groups, threshold=0.999)
    assert info3["modules"] == 0


def test_projection_needs_an_aligned_start():
    with pytest.raises(ConfigError, match="init.adapter=align"):
        load_config("tiny", ["defense.projection=true"])
    with pytest.raises(ConfigError, match="projection_threshold"):
        load_config("tiny", ["defense.projection=true", "init.adapter=align", "defense.projection_threshold=1.5"])


def test_projection_on_tiny_leaves_no_unsafe_component(tmp_path):
    from fedsafe.pipeline import build_engine

    cfg = load_config("tiny", ["fl.rounds=2", "init.adapter=align", "init.steps=3", "init.n=20",
                               "defense.projection=true"])
    eng = build_engine(cfg, tmp_path, progress=False)
    u = unsafe_direction(eng.init_vec, eng.keys, eng.shapes)
    start = eng.global_vec.clone()
    row = eng.run_round(0)
    assert row["projection"]["of"] == len(module_groups(eng.keys, eng.shapes))
    delta = eng.global_vec - start
    for _, idx, _ in module_groups(eng.keys, eng.shapes):
        v = u[idx].double()
        cos = float(delta[idx].double().dot(v) / (delta[idx].double().norm() * v.norm()).clamp_min(1e-30))
        assert cos <= 1e-5
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert "projection" in line and line["projection"]["seconds"] >= 0


# ---------------------------------------------------------------- FLAME
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="FLAME needs scikit-learn (pip install 'fedsafe[flame]')")


def test_flame_without_scikit_learn_is_refused_before_training(monkeypatch):
    from fedsafe.aggregators import flame

    monkeypatch.setattr(flame, "_hdbscan", lambda: None)
    with pytest.raises(ConfigError, match="needs scikit-learn"):
        load_config("tiny", ["fl.aggregator=flame"])


def planted(seed=0, n_benign=7, n_bad=2, d=60):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g, dtype=torch.float64)
    benign = base + 0.2 * torch.randn(n_benign, d, generator=g, dtype=torch.float64)
    benign = benign * (1 + torch.rand(n_benign, 1, generator=g, dtype=torch.float64))  # varied norms
    bad = -3 * base + 0.1 * torch.randn(n_bad, d, generator=g, dtype=torch.float64)
    return torch.cat([benign, bad])


@needs_sklearn
def test_flame_rejects_the_planted_cluster_and_clips_to_the_median_norm():
    from fedsafe.aggregators import REGISTRY

    for seed in range(3):
        x = planted(seed)
        res = REGISTRY["flame"](x, None, lam=0.0)
        adm = torch.tensor(res.info["admitted"])
        # the planted pair is never admitted; HDBSCAN may also call a benign straggler noise (as in FLAME)
        assert not adm[7:].any() and int(adm.sum()) >= 5
        norms = x.norm(dim=1)
        S = res.info["S"]
        assert S == pytest.approx(float(np.median(norms.numpy())))  # FLAME's bound: the median norm of all
        clipped = x[adm] * torch.clamp(S / norms[adm], max=1.0)[:, None]
        assert torch.allclose(res.aggregate, clipped.mean(0))
        assert (res.client_weights[~adm] == 0).all()
        assert float((x[adm] * res.client_weights[adm, None]).sum(0).norm()) <= S * (1 + 1e-9)


@needs_sklearn
def test_flame_noise_is_lambda_times_the_bound_and_seeded():
    from fedsafe.aggregators import REGISTRY

    x = planted(seed=2)
    a = REGISTRY["flame"](x, None, lam=0.5, round=3)
    b = REGISTRY["flame"](x, None, lam=0.5, round=3)
    c = REGISTRY["flame"](x, None, lam=0.0, round=3)
    assert torch.equal(a.aggregate, b.aggregate) and a.info["sigma"] == pytest.approx(0.5 * a.info["S"])
    noise = a.aggregate - c.aggregate
    assert float(noise.std()) == pytest.approx(a.info["sigma"], rel=0.3)


@needs_sklearn
def test_flame_runs_in_the_engine(tmp_path):
    from fedsafe.pipeline import build_engine

    cfg = load_config("tiny", ["fl.rounds=1", "fl.aggregator=flame"])
    eng = build_engine(cfg, tmp_path, progress=False)
    eng.run_round(0)
    fx = json.loads((tmp_path / "forensics.jsonl").read_text().splitlines()[0])
    assert fx["aggregator"] == "flame" and len(fx["info"]["admitted"]) == 3


# ---------------------------------------------------------------- update classifier
def test_update_classifier_separates_a_planted_malicious_update():
    from fedsafe.aggregators import REGISTRY

    g = torch.Generator().manual_seed(7)
    d = 80
    benign_dir, harm_dir = torch.randn(d, generator=g), torch.randn(d, generator=g)
    sim_b = benign_dir + 0.3 * torch.randn(2, d, generator=g)
    sim_m = benign_dir + 2 * harm_dir + 0.3 * torch.randn(2, d, generator=g)
    clients = torch.cat([benign_dir + 0.3 * torch.randn(4, d, generator=g),
                         (benign_dir + 2 * harm_dir + 0.3 * torch.randn(d, generator=g))[None]])
    res = REGISTRY["update_classifier"](clients, None, labelled_updates=(sim_b, sim_m))
    p = torch.tensor(res.info["p_malicious"])
    assert (p[:4] < 0.5).all() and p[4] > 0.5
    assert res.client_weights.tolist()[4] == 0 and torch.allclose(res.aggregate, clients[:4].mean(0))


def test_update_classifier_is_refused_as_a_target_and_needs_its_inputs():
    from fedsafe.aggregators import REGISTRY

    with pytest.raises(ValueError, match="labelled_updates"):
        REGISTRY["update_classifier"](torch.ones(3, 4), None)
    with pytest.raises(ConfigError, match="labelled_updates"):
        load_config("tiny", ["fl.aggregator=update_classifier", "attack.behaviour=min_max",
                             "attack.params={target: aggregator}"])


def test_update_classifier_runs_in_the_engine(tmp_path):
    from fedsafe.pipeline import build_engine

    cfg = load_config("tiny", ["fl.rounds=1", "fl.aggregator=update_classifier", "fl.aggregator_params={sims: 1}"])
    eng = build_engine(cfg, tmp_path, progress=False)
    eng.run_round(0)
    fx = json.loads((tmp_path / "forensics.jsonl").read_text().splitlines()[0])
    assert fx["aggregator"] == "update_classifier" and len(fx["info"]["p_malicious"]) == 3
