"""Tests for fedsafe.aggregators: definitions on hand-built cases, invariants, parameter checks."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import numpy as np
import pytest
import torch

from fedsafe.aggregators import REGISTRY, AggResult, _ops, check_params, coordinatewise
from fedsafe.aggregators import forensics, residual, rule_needs
from fedsafe.aggregators.foolsgold import foolsgold_scores
from fedsafe.errors import ConfigError, FedsafeError

# The rules of this module (other modules may register more, e.g. safety_probe).
ALL_RULES = [
    "mean", "median", "median_paper", "trimmed_mean", "trimmed_mean_paper", "krum",
    "multi_krum", "krum_paper", "bulyan", "geometric_median", "norm_bound", "foolsgold",
    "foolsgold_paper", "residual", "dnc", "fltrust", "centered_clipping",
]  # fmt: skip

# Rules for which rule(U + t) == rule(U) + t (documented in the package docstring).
EQUIVARIANT = [
    "mean", "median", "median_paper", "trimmed_mean", "trimmed_mean_paper", "krum",
    "multi_krum", "krum_paper", "bulyan", "geometric_median", "residual", "dnc",
]  # fmt: skip


def rand(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def call(name: str, x: torch.Tensor, weights=None, **params) -> AggResult:
    """Call a rule the way the engine does (engine keys always present)."""
    if name == "fltrust" and "root_update" not in params:
        params["root_update"] = x.mean(dim=0)
    params.setdefault("client_ids", list(range(x.shape[0])))
    params.setdefault("round", 0)
    return REGISTRY[name](x, weights, state={}, **params)


# --------------------------------------------------------------------------- registry / invariants


def test_registry_has_all_rules():
    assert set(ALL_RULES) <= set(REGISTRY)


def test_rule_needs_and_engine_keys_of_other_rules_are_ignored():
    assert rule_needs("fltrust") == {"root_update"} and rule_needs(REGISTRY["mean"]) == set()
    assert "client_ids" in rule_needs("foolsgold") and "round" in rule_needs("dnc")
    check_params("mean", 3, {"client_ids": [1, 2, 3], "round": 0, "root_update": None})


@pytest.mark.parametrize("name", ALL_RULES)
def test_output_shape_dtype_device_and_json_info(name):
    x = rand(9, 50)
    res = call(name, x, torch.arange(1.0, 10.0))
    assert isinstance(res, AggResult)
    assert res.aggregate.shape == (50,) and res.aggregate.dtype == x.dtype
    assert res.client_weights.shape == (9,) and res.client_weights.device == x.device
    assert torch.isfinite(res.aggregate).all() and (res.client_weights >= 0).all()
    json.dumps(res.info)


@pytest.mark.parametrize("name", ALL_RULES)
def test_permutation_invariance(name):
    x, counts = rand(9, 40, seed=1), torch.arange(1.0, 10.0)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    ids = list(range(100, 109))
    a = call(name, x, counts, client_ids=ids)
    b = call(name, x[perm], counts[perm], client_ids=[ids[i] for i in perm])
    torch.testing.assert_close(a.aggregate, b.aggregate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.client_weights[perm], b.client_weights, rtol=1e-5, atol=1e-5)


# Params that make each rule a fixed point on n identical updates (see the rules' docs).
IDENTITY_PARAMS = {"centered_clipping": {"init": "mean"}}


@pytest.mark.parametrize("name", [r for r in ALL_RULES if not r.startswith("foolsgold")])
def test_identical_updates_give_that_update(name):
    u = torch.linspace(-1, 2, 30)
    x = u.repeat(9, 1)
    res = call(name, x, root_update=u, **IDENTITY_PARAMS.get(name, {}))
    torch.testing.assert_close(res.aggregate, u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["foolsgold", "foolsgold_paper"])
def test_foolsgold_identical_updates_are_all_sybils(name):
    res = call(name, torch.ones(5, 10))
    assert torch.count_nonzero(res.client_weights) == 0
    assert torch.count_nonzero(res.aggregate) == 0


@pytest.mark.parametrize("name", EQUIVARIANT)
def test_translation_equivariance(name):
    x, t = rand(9, 40, seed=3), 5 * rand(1, 40, seed=4)[0]
    a, b = call(name, x), call(name, x + t)
    torch.testing.assert_close(b.aggregate, a.aggregate + t, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ALL_RULES)
def test_chunking_does_not_change_the_result(name):
    x = rand(9, 101, seed=5)
    a, b = call(name, x), call(name, x, chunk=7)
    torch.testing.assert_close(a.aggregate, b.aggregate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.client_weights, b.client_weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "geometric_median"])
def test_float64_input_keeps_dtype(name):
    res = call(name, rand(7, 20).double())
    assert res.aggregate.dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ALL_RULES)
def test_cuda_matches_cpu(name):
    x = rand(9, 64, seed=6)
    cpu, gpu = call(name, x), call(name, x.cuda(), root_update=x.mean(0).cuda())
    assert gpu.aggregate.device.type == "cuda"
    torch.testing.assert_close(gpu.aggregate.cpu(), cpu.aggregate, rtol=1e-4, atol=1e-5)


def test_rules_ignore_engine_keys_they_do_not_need():
    x = rand(5, 8)
    res = REGISTRY["mean"](x, None, state={}, client_ids=[1, 2, 3, 4, 5], round=7, root_update=x[0])
    torch.testing.assert_close(res.aggregate, x.mean(0))


def test_bad_updates_and_weights_raise():
    with pytest.raises(ValueError):
        REGISTRY["mean"](torch.ones(5))
    with pytest.raises(ValueError):
        REGISTRY["mean"](torch.ones(3, 2), torch.ones(4))
    with pytest.raises(ValueError):
        REGISTRY["mean"](torch.ones(3, 2), torch.zeros(3))


# --------------------------------------------------------------------------- definitions


def test_mean_is_weighted_by_sample_counts():
    x = torch.tensor([[0.0, 0.0], [4.0, 8.0]])
    res = call("mean", x, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(res.aggregate, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(res.client_weights, torch.tensor([0.75, 0.25]))


@pytest.mark.parametrize("n", [3, 4, 7, 8])
def test_median_is_coordinatewise(n):
    x = rand(n, 33, seed=n)
    res = call("median", x)
    np.testing.assert_allclose(res.aggregate.numpy(), np.median(x.numpy(), axis=0), rtol=1e-6)
    paper = call("median_paper", x)
    torch.testing.assert_close(paper.aggregate, x.median(dim=0).values)


@pytest.mark.parametrize("name", ["median", "median_paper", "trimmed_mean", "trimmed_mean_paper"])
def test_coordinatewise_rules_treat_coordinates_independently(name):
    x = rand(6, 20, seed=26)
    y = x.clone()
    y[2, 7] = 1e3  # change one value of one client
    changed = (call(name, x).aggregate != call(name, y).aggregate).nonzero().flatten().tolist()
    assert changed in ([], [7])


def test_median_reports_which_clients_supplied_the_middle_value():
    x = torch.tensor([[0.0, 5.0], [1.0, 1.0], [9.0, 3.0]])
    res = call("median", x)
    torch.testing.assert_close(res.aggregate, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(res.client_weights, torch.tensor([0.0, 0.5, 0.5]))


def test_median_even_n_mean_of_middle_vs_paper_lower():
    x = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    assert call("median", x).aggregate.item() == 6.0
    assert call("median_paper", x).aggregate.item() == 2.0


def test_trimmed_mean_matches_sorted_definition_and_rejects_extremes():
    x = rand(10, 25, seed=7)
    x[0] = 1e6  # an attacker sending huge values everywhere
    x[1] = -1e6
    res = call("trimmed_mean", x, k=2)
    ref = x.sort(dim=0).values[2:8].mean(dim=0)
    torch.testing.assert_close(res.aggregate, ref)
    assert res.aggregate.abs().max() < 10
    assert res.client_weights[0] == 0 and res.client_weights[1] == 0
    assert res.info["k"] == 2


@pytest.mark.parametrize(
    ("beta", "n", "k"), [(0.1, 3, 1), (0.0, 5, 0), (0.2, 10, 2), (0.25, 10, 2)]
)
def test_trimmed_mean_beta_to_k(beta, n, k):
    assert call("trimmed_mean", rand(n, 4), beta=beta).info["k"] == k


def test_trimmed_mean_with_ties_stays_exact():
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 2.0]])
    torch.testing.assert_close(call("trimmed_mean", x, k=2).aggregate, torch.tensor([1.0, 1.0]))


def test_trimmed_mean_paper_equals_median_for_three_clients():
    x = rand(3, 64, seed=8)
    torch.testing.assert_close(call("trimmed_mean_paper", x).aggregate, call("median", x).aggregate)


def awkward(n: int, d: int = 300, seed: int = 0) -> torch.Tensor:
    """Updates with many ties (at window ends too), signed zeros, NaN, infinities, huge values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    x[:, :100] = torch.randint(-2, 3, (n, 100), generator=gen).float()
    x[:, 100:110] = 0.0
    x[::2, 100:110] = -0.0
    x[1, 110], x[2, 111], x[3, 112], x[:, 113] = math.nan, math.inf, -math.inf, math.inf
    x[0, 120:] *= 1e30
    return x


def torch_only(monkeypatch) -> None:
    """Make CPU float tensors take the torch code (the GPU one) instead of the numpy kernels."""
    for module in (_ops, coordinatewise, residual):
        monkeypatch.setattr(module, "numpy_kernels", lambda t: False)


@pytest.mark.parametrize("name", ["median", "median_paper", "trimmed_mean", "trimmed_mean_paper",
                                  "bulyan"])  # fmt: skip
@pytest.mark.parametrize("n", [7, 8, 11])
def test_cpu_sort_kernel_matches_torch_version(name, n, monkeypatch):
    x = awkward(n, seed=n)
    fast = call(name, x, chunk=64)
    torch_only(monkeypatch)
    ref = call(name, x, chunk=64)
    # Sums may be ordered differently (trimmed means), so values agree to rounding only.
    torch.testing.assert_close(fast.aggregate, ref.aggregate, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(fast.client_weights, ref.client_weights, rtol=0, atol=0)
    assert fast.info == ref.info


@pytest.mark.parametrize("name", ALL_RULES)
def test_numpy_kernels_match_torch_code(name, monkeypatch):
    x, counts = 3 + rand(9, 300, seed=9), torch.arange(1.0, 10.0)
    fast = call(name, x, counts, chunk=64)
    torch_only(monkeypatch)
    ref = call(name, x, counts, chunk=64)
    torch.testing.assert_close(fast.aggregate, ref.aggregate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.client_weights, ref.client_weights, rtol=1e-5, atol=1e-6)


def brute_krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(d2[i], i))[: n - f - 2].sum() for i in range(n)])


def test_krum_picks_the_most_central_point():
    centre = torch.zeros(6)
    x = torch.stack([centre + 0.1 * rand(1, 6, seed=i)[0] for i in range(5)])
    x = torch.cat([x, torch.full((2, 6), 50.0)])  # two colluding outliers
    x[3] = centre  # exactly at the cluster centre
    res = call("krum", x, f=2)
    assert res.info["selected"] == [3]
    torch.testing.assert_close(res.aggregate, x[3])
    # fp32 Gram: distances are exact up to ~1e-7 of the largest (centred) squared norm
    scores = brute_krum_scores(x.numpy(), 2)
    np.testing.assert_allclose(res.info["scores"], scores, rtol=1e-5, atol=1e-7 * scores.max())


def test_multi_krum_averages_the_m_best_weighted():
    x, counts = rand(8, 12, seed=9), torch.arange(1.0, 9.0)
    x[5] += 30
    res = call("multi_krum", x, counts, f=1, m=4)
    best = np.argsort(brute_krum_scores(x.numpy(), 1))[:4]
    ref = (counts[best, None] * x[best]).sum(0) / counts[best].sum()
    torch.testing.assert_close(res.aggregate, ref)
    assert sorted(res.info["selected"]) == sorted(best.tolist()) and res.client_weights[5] == 0
    default = call("multi_krum", x, f=1)  # m = n - f drops exactly the outlier
    assert default.client_weights[5] == 0 and torch.count_nonzero(default.client_weights) == 7


def test_krum_paper_averages_the_n_minus_f_nearest():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [10.0, 10.0], [0.5, 0.2]])
    f = 1
    d = torch.cdist(x.double(), x.double())
    k = len(x) - f - 1
    scores = d.sort(dim=1).values[:, : k + 1].sum(1)
    star = int(scores.argmin())
    nearest = d[star].argsort()[: k + 1]
    res = call("krum_paper", x, f=f)
    torch.testing.assert_close(res.aggregate, x[nearest].mean(0))
    assert res.info["center"] == star and sorted(res.info["selected"]) == sorted(nearest.tolist())
    assert res.client_weights[3] == 0  # the far point is the one left out


def test_krum_paper_with_the_papers_three_clients():
    x = torch.tensor([[0.0], [1.0], [5.0]])
    res = call("krum_paper", x, f=1)  # k = 1: mean of the winner and its nearest neighbour
    assert res.aggregate.item() == pytest.approx(0.5)


def brute_bulyan(x: np.ndarray, f: int) -> np.ndarray:
    remaining, chosen = list(range(len(x))), []
    while len(chosen) < len(x) - 2 * f:
        sub = x[remaining]
        d2 = ((sub[:, None] - sub[None]) ** 2).sum(-1)
        k = min(max(1, len(sub) - f - 2), len(sub) - 1)
        scores = [np.sort(np.delete(d2[i], i))[:k].sum() for i in range(len(sub))]
        # exact ties (mutual nearest neighbours when k = 1) go to the smaller total distance
        best = min(range(len(sub)), key=lambda i: (scores[i], d2[i].sum()))
        chosen.append(remaining.pop(best))
    sel = x[chosen]
    med = np.median(sel, axis=0)
    beta = len(sel) - 2 * f
    idx = np.argsort(np.abs(sel - med), axis=0, kind="stable")[:beta]
    return np.take_along_axis(sel, idx, axis=0).mean(0)


def test_bulyan_matches_definition_and_rejects_extremes():
    x = rand(11, 20, seed=10)
    x[0] += 100
    x[1] -= 100
    res = call("bulyan", x, f=2)
    expected = brute_bulyan(x.numpy(), 2)
    np.testing.assert_allclose(res.aggregate.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert 0 not in res.info["selected"] and 1 not in res.info["selected"]
    assert res.client_weights[0] == 0 and res.client_weights[1] == 0
    assert res.aggregate.abs().max() < 5


def test_geometric_median_on_a_line_and_optimality():
    e = torch.randn(8, generator=torch.Generator().manual_seed(11))
    x = torch.tensor([0.0, 1.0, 10.0])[:, None] * e  # collinear: geometric median = median
    res = call("geometric_median", x)
    torch.testing.assert_close(res.aggregate, e, rtol=1e-4, atol=1e-4)
    x = rand(9, 5, seed=12).double()
    w = torch.arange(1.0, 10.0, dtype=torch.float64)
    v = call("geometric_median", x, w, ftol=1e-12, maxiter=1000).aggregate
    grad = (w[:, None] * (v - x) / (v - x).norm(dim=1, keepdim=True)).sum(0)
    assert grad.norm() < 1e-5 * w.sum()


def test_geometric_median_resists_one_outlier():
    x = torch.cat([0.01 * rand(6, 4, seed=13), torch.full((1, 4), 1e4)])
    assert call("geometric_median", x).aggregate.norm() < 1.0


def test_norm_bound_clips_each_update():
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
    res = call("norm_bound", x, M=1.0)
    torch.testing.assert_close(res.aggregate, torch.tensor([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]))
    torch.testing.assert_close(res.client_weights, torch.tensor([0.1, 0.5]))


def test_norm_bound_default_bound_is_median_norm_and_noise_is_seeded():
    x = rand(5, 100, seed=14) * torch.arange(1.0, 6.0)[:, None]
    res = call("norm_bound", x)
    assert res.info["M"] == pytest.approx(sorted(res.info["norms"])[2])
    a = call("norm_bound", x, M=1.0, sigma=0.1, round=3).aggregate
    b = call("norm_bound", x, M=1.0, sigma=0.1, round=3).aggregate
    c = call("norm_bound", x, M=1.0, sigma=0.1, round=4).aggregate
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_centered_clipping_bounds_an_outlier_and_keeps_momentum():
    x = torch.cat([torch.ones(4, 3), torch.full((1, 3), 1000.0)])
    state: dict = {}
    res = REGISTRY["centered_clipping"](x, state=state, tau=2.0, iters=50)
    # Fixed point: 4 honest pulls balance one pull of length tau, so |v - 1| <= tau / 4.
    assert (res.aggregate - 1).norm() <= 0.5 + 1e-3
    assert torch.equal(state["momentum"], res.aggregate)
    assert res.client_weights[4] < res.client_weights[0]
    big = call("centered_clipping", x[:4] * torch.arange(1.0, 5.0)[:, None], tau=1e9, init="zero")
    torch.testing.assert_close(big.aggregate, torch.full((3,), 2.5))


def test_centered_clipping_starts_from_previous_round():
    x = rand(5, 6, seed=15)
    state = {"momentum": x.mean(0)}
    res = REGISTRY["centered_clipping"](x, state=state, tau=1e9)
    torch.testing.assert_close(res.aggregate, x.mean(0))


def brute_foolsgold(vectors: np.ndarray) -> np.ndarray:
    """Loop transcription of the FoolsGold weighting described in paper.md section 3."""
    n = len(vectors)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cs = unit @ unit.T - np.eye(n)
    maxcs = cs.max(axis=1)
    for i, j in itertools.product(range(n), range(n)):
        if i != j and maxcs[i] < maxcs[j]:
            cs[i, j] *= maxcs[i] / maxcs[j]
    wv = np.clip(1 - cs.max(axis=1), 0, 1)
    wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1 - wv)) + 0.5
    return np.clip(wv, 0, 1)


def test_foolsgold_scores_match_loop_definition():
    x = rand(7, 10, seed=16)
    x[4] = x[3] + 0.05 * x[0]  # a near-duplicate pair
    x[5] = x[1] * 0.5 + x[2] * 0.5
    cos = torch.nn.functional.cosine_similarity(x[:, None].double(), x[None].double(), dim=-1)
    expected = brute_foolsgold(x.double().numpy())
    np.testing.assert_allclose(foolsgold_scores(cos).numpy(), expected, atol=1e-9)


def sybil_round(seed: int) -> torch.Tensor:
    honest = rand(4, 30, seed=seed)
    sybil = torch.ones(30) + 0.1 * rand(1, 30, seed=seed + 100)[0]
    return torch.cat([honest, sybil.repeat(3, 1)])  # 3 identical sybil updates


@pytest.mark.parametrize("name", ["foolsgold", "foolsgold_paper"])
def test_foolsgold_downweights_identical_sybils(name):
    res = call(name, sybil_round(17))
    assert (res.client_weights[4:] == 0).all()
    assert (res.client_weights[:4] > 0).all()


def test_foolsgold_paper_output_formula():
    x = sybil_round(18)
    res = call("foolsgold_paper", x)
    wv = torch.tensor(res.info["wv"])
    kept = wv != 0
    ref = (wv[kept, None] * x[kept]).sum(0) / kept.sum()
    torch.testing.assert_close(res.aggregate, ref)


def test_foolsgold_history_accumulates_per_client():
    state: dict = {}
    rule = REGISTRY["foolsgold"]
    r1, r2 = sybil_round(19), sybil_round(20)
    rule(r1, state=state, client_ids=list(range(7)))
    # round 2 sees clients in a different order; histories must follow the ids
    order = [6, 5, 4, 3, 2, 1, 0]
    res = rule(r2[order], state=state, client_ids=order)
    for pos, cid in enumerate(order):
        torch.testing.assert_close(state["history"][cid], r1[cid] + r2[cid])
    assert res.info["history"] is True
    assert (res.client_weights[:3] == 0).all()  # sybils 6, 5, 4 come first now
    torch.testing.assert_close(res.client_weights.sum(), torch.tensor(1.0))


def brute_residual(x: np.ndarray, lam: float = 2.0, thresh: float = 0.05) -> np.ndarray:
    """Per-coordinate loop transcription of the IRLS reweighting in paper.md section 3."""
    n, d = x.shape
    conf = np.zeros(n)
    restricted = x.astype(np.float64).copy()
    centre, ss = (n - 1) / 2, n * (n * n - 1) / 12
    for j in range(d):
        y = x[:, j].astype(np.float64)
        order = np.argsort(y, kind="stable")
        s = y[order]
        rank = np.empty(n)
        rank[order] = np.arange(n)
        slopes = [
            statistics.median((s[i] - s[k]) / (i - k) for k in range(n) if k != i)
            for i in range(n)
        ]
        slope = statistics.median(slopes)
        intercept = statistics.median(s) - slope * centre
        line = intercept + slope * rank
        res = y - line
        mad = statistics.median(sorted(np.abs(res))[1:])
        tau = 1.4826 * (1 + 5 / (n - 1)) * mad + 1e-7
        h = np.sqrt(1 - (1 / n + (rank - centre) ** 2 / ss))
        e = res / tau / h
        k = lam * math.sqrt(2 / n)
        with np.errstate(divide="ignore"):
            rw = np.minimum(1.0, k / np.abs(e))
        conf += rw * rw.std(ddof=1)
        restricted[:, j] = np.where(rw >= thresh, y, line)
    # all-zero confidence: the original divides 0 by 0; fedsafe falls back to equal weights
    conf = (conf / conf.max()) ** 2 if conf.max() > 0 else np.ones(n)
    return (conf[:, None] * restricted).sum(0) / conf.sum()


@pytest.mark.parametrize("n", [3, 4, 6])
def test_residual_matches_loop_definition(n):
    x = rand(n, 40, seed=21 + n)
    x[0, :10] += 1000  # far enough (reweight < thresh) to be replaced by the line when n > 3
    res = call("residual", x)
    expected = brute_residual(x.numpy())
    np.testing.assert_allclose(res.aggregate.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert (res.info["replaced_fraction"][0] > 0) == (n > 3)


def test_residual_with_three_clients_is_the_plain_mean():
    # With n = 3, |e / h| <= 0.94 < K = 1.63 always, so every reweight is 1, every confidence 0
    # (the paper's code would divide 0 by 0) and fedsafe falls back to equal weights.
    x = rand(3, 50, seed=25)
    x[0] += 100
    res = call("residual", x)
    torch.testing.assert_close(res.aggregate, x.mean(0))
    assert res.info["confidence"] == [0.0, 0.0, 0.0]


def test_residual_trusts_an_outlier_least():
    x = rand(6, 200, seed=22)
    x[2] += 20
    res = call("residual", x)
    assert int(res.client_weights.argmin()) == 2


def test_dnc_is_seeded_and_removes_the_outlier():
    x = rand(10, 5000, seed=23)
    x[7] += 10
    a = call("dnc", x, b=500, seed=1, round=2)
    b = call("dnc", x, b=500, seed=1, round=2)
    torch.testing.assert_close(a.aggregate, b.aggregate)
    assert a.info["scores"] == b.info["scores"]
    assert a.info["kept"] == [i for i in range(10) if i != 7]
    c = call("dnc", x, b=500, seed=1, round=3)
    assert c.info["scores"] != a.info["scores"]  # a different round samples other coordinates


def test_dnc_uses_all_coordinates_when_b_exceeds_d():
    x = rand(6, 30, seed=24)
    a, b = call("dnc", x, b=1000, round=1), call("dnc", x, b=1000, round=9)
    torch.testing.assert_close(a.aggregate, b.aggregate)


def test_fltrust_zero_weight_for_opposite_direction_and_rescales():
    g0 = torch.tensor([1.0, 0.0])
    x = torch.tensor([[2.0, 0.0], [-5.0, 0.1], [0.0, 3.0], [1.0, 1.0]])
    res = call("fltrust", x, root_update=g0)
    assert res.client_weights[1] == 0 and res.client_weights[2] == 0
    ts = torch.tensor([1.0, 0.0, 0.0, 2**-0.5])
    ref = (ts[:, None] * x / x.norm(dim=1, keepdim=True)).sum(0) / ts.sum()  # each rescaled to |g0|
    torch.testing.assert_close(res.aggregate, ref)


def test_fltrust_without_root_update_is_a_config_error():
    with pytest.raises(ConfigError, match="root_update"):
        REGISTRY["fltrust"](rand(3, 4))


def test_forensics_norms_and_cosine():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0]])
    out = forensics(x, chunk=1)
    assert out["norms"] == pytest.approx([5.0, 2.0, 0.0])
    assert out["cosine"][0][1] == pytest.approx(0.8)
    assert out["cosine"][0][0] == pytest.approx(1.0) and out["cosine"][2][2] == 0.0
    json.dumps(out)


# --------------------------------------------------------------------------- parameter checks


def test_config_error_is_a_fedsafe_error():
    assert issubclass(ConfigError, FedsafeError)


def test_unknown_rule_lists_known_and_hints():
    with pytest.raises(ConfigError, match=r"krumm.*Did you mean 'krum'.*Known: .*bulyan"):
        check_params("krumm", 10, {})


def test_unknown_param_hints():
    with pytest.raises(ConfigError, match=r"krum.*unknown parameter 'F'.*'f'"):
        check_params("krum", 10, {"F": 1})


@pytest.mark.parametrize(
    ("name", "n", "params", "pattern"),
    [
        ("krum", 4, {"f": 1}, r"krum.*n > 2f \+ 2.*n=4, f=1"),
        ("krum", 3, {}, r"krum.*2f \+ 2 = 4"),
        ("multi_krum", 6, {"f": 2}, r"multi_krum.*n > 2f \+ 2"),
        ("multi_krum", 10, {"f": 1, "m": 11}, r"multi_krum.*1 <= m <= n"),
        ("bulyan", 6, {"f": 1}, r"bulyan.*n >= 4f \+ 3.*4f \+ 3 = 7"),
        ("trimmed_mean", 10, {"beta": 0.5}, r"trimmed_mean.*beta < 0.5"),
        ("trimmed_mean", 4, {"k": 2}, r"trimmed_mean.*2k < n"),
        ("trimmed_mean", 10, {"k": 1, "beta": 0.1}, r"either 'beta' or 'k'"),
        ("trimmed_mean_paper", 2, {}, r"trimmed_mean_paper.*n >= 3"),
        ("krum_paper", 3, {"f": 2}, r"krum_paper.*f <= n - 2"),
        ("dnc", 3, {"f": 3}, r"dnc.*c\*f < n"),
        ("dnc", 5, {"c": 2.5, "f": 2}, r"dnc.*int\(c\*f\) = 5"),
        ("residual", 2, {}, r"residual.*n >= 3"),
        ("geometric_median", 5, {"eps": 0.0}, r"geometric_median.*eps > 0"),
        ("norm_bound", 5, {"M": -1.0}, r"norm_bound.*M > 0"),
        ("centered_clipping", 5, {"tau": 0}, r"centered_clipping.*tau > 0"),
        ("bulyan", 7, {"selection": "random"}, r"bulyan.*one of"),
        ("krum", 10, {"f": "1"}, r"krum.*'f' must be int"),
        ("krum", 10, {"f": True}, r"krum.*'f' must be int"),
        ("mean", 5, {"chunk": 0}, r"mean.*chunk"),
    ],
)
def test_impossible_params_raise_naming_rule_and_bound(name, n, params, pattern):
    with pytest.raises(ConfigError, match=pattern):
        check_params(name, n, params)


@pytest.mark.parametrize(
    ("name", "n", "params"),
    [
        ("krum", 5, {"f": 1}),
        ("bulyan", 7, {"f": 1}),
        ("krum_paper", 3, {"f": 1}),  # the paper's setting
        ("trimmed_mean", 3, {}),
        ("dnc", 3, {"c": 1, "f": 1}),  # int accepted for a float parameter
        ("foolsgold", 3, {"history": False, "client_ids": [1, 2, 3], "round": 4}),  # engine keys
        ("fltrust", 3, {}),
    ],
)
def test_feasible_params_pass(name, n, params):
    check_params(name, n, params)


def test_call_time_validation_uses_the_actual_client_count():
    with pytest.raises(ConfigError, match=r"krum.*n=4"):
        REGISTRY["krum"](rand(4, 3), f=1)
    with pytest.raises(ConfigError, match="unknown parameter"):
        REGISTRY["median"](rand(4, 3), beta=0.1)
