"""Adaptive (colluding) attacks on the LoRA deltas: ALIE, IPM, min-max / min-sum, and a stealthy safety attack.

All are ``round``-scope behaviours (:mod:`fedsafe.attack.base`): the coalition sees its own trained
deltas (``ctx.own``: SFT on the malicious clients' unaligned data, i.e. the data-only attack) and the
benign deltas its knowledge gives (``ctx.benign``: this round's benign updates when ``omniscient``, or
benign-looking updates it trained itself when ``estimate``). Each function returns the ``(n_mal, d)``
deltas the malicious clients send, and a JSON-able ``info`` dict logged in ``metrics.jsonl``.

Beyond the papers (they attack image classifiers with no target behaviour): where an attack has a free
direction, ``direction=harmful`` points it from the benign mean towards the coalition's own harmful
update, so that the attack carries the unaligned data's effect instead of only degrading training.
The papers' directions remain the defaults where the brief's formulas name them (ALIE, IPM).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

from .base import Param, RoundContext, fail, register


def alie_z(n: int, m: int) -> float:
    """Baruch et al.'s z_max: ``s = floor(n/2 + 1) - m`` supporters needed, ``z = Phi^-1((n - s) / n)``.

    ``(n - s)/n`` is clipped to [0.5, 0.999] so that a malicious majority (s <= 0) gives a large but
    finite z and a tiny round a shift of at least 0.
    """
    s = math.floor(n / 2 + 1) - m
    p = min(max((n - s) / n, 0.5), 0.999)
    return NormalDist().inv_cdf(p)


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    return v / n if n > 0 else v


def _harmful_direction(ctx: RoundContext) -> torch.Tensor:
    """Unit vector from the benign mean towards the coalition's mean trained (harmful) delta."""
    return _unit(ctx.own.mean(0) - ctx.benign.mean(0))


def _same_for_all(v: torch.Tensor, n_mal: int) -> torch.Tensor:
    return v.unsqueeze(0).expand(n_mal, -1).clone()


@register("alie", scope="round", knowledge=("omniscient", "estimate"), min_benign=2,
          params={"z": Param(None, float), "direction": Param("paper", str, ("paper", "harmful"))})
def alie(ctx: RoundContext, *, z: float | None, direction: str) -> tuple[torch.Tensor, dict]:
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019).

    Every colluder sends ``mean - z * std`` (coordinate-wise over the benign updates, unbiased std),
    with ``z`` = :func:`alie_z` ``(n, n_mal)`` unless ``attack.params.z`` is given. The shift stays
    within the benign spread, so it passes median/trimmed-mean/Krum-style rules. ``direction=harmful``:
    ``mean + z * std * sign(own_mean - mean)`` (each coordinate shifted towards the harmful update).

    Knows: the benign updates' coordinate-wise mean and std (``omniscient``) or its estimate from
    benign-looking updates of its own (``estimate``), and the number of clients per round.
    """
    mu, sd = ctx.benign.mean(0), ctx.benign.std(0)
    zz = alie_z(ctx.n, ctx.own.shape[0]) if z is None else z
    if direction == "paper":
        mal = mu - zz * sd
    else:
        mal = mu + zz * sd * torch.sign(ctx.own.mean(0) - mu)
    return _same_for_all(mal, ctx.own.shape[0]), {"z": zz}


def _ipm_bounds(p: dict) -> None:
    if not p["eps"] > 0:
        fail("ipm", f"parameter 'eps' must be > 0, got {p['eps']}")


@register("ipm", scope="round", knowledge=("omniscient", "estimate"), min_benign=1,
          params={"eps": Param(0.1, float)}, bounds=_ipm_bounds)
def ipm(ctx: RoundContext, *, eps: float) -> tuple[torch.Tensor, dict]:
    """Inner Product Manipulation (Xie, Koyejo & Gupta, UAI 2020): every colluder sends ``-eps * mean(benign)``.

    Small ``eps`` (0.1, the paper's choice against Krum) keeps the update close to the benign ones while
    making the inner product of the aggregate with the true gradient negative once enough colluders
    are averaged in; large ``eps`` (e.g. 10) targets mean/median.

    Knows: the benign mean (``omniscient``) or its estimate (``estimate``).
    """
    return _same_for_all(-eps * ctx.benign.mean(0), ctx.own.shape[0]), {"eps": eps}


def _perturbation(ctx: RoundContext, direction: str) -> torch.Tensor:
    mu = ctx.benign.mean(0)
    if direction == "harmful":
        return _harmful_direction(ctx)
    if direction == "inverse_unit":
        return -_unit(mu)
    if direction == "inverse_std":
        return -ctx.benign.std(0) if ctx.benign.shape[0] > 1 else torch.zeros_like(mu)
    return -torch.sign(mu)  # inverse_sign


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of ``a`` and ``b`` (float64, exact enough for a search)."""
    return torch.cdist(a.double(), b.double()).pow(2)


def _gamma_search(ok, gamma_init: float, tol: float) -> float:
    """Shejwalkar & Houmansadr's search (their released code): the largest gamma with ``ok(gamma)``,
    halving the step each time; returns 0 when no gamma in (0, 2 * gamma_init) passes."""
    gamma, step, succ = gamma_init, gamma_init / 2, 0.0
    while abs(succ - gamma) > tol:
        if ok(gamma):
            succ = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return succ


def _min_dist_attack(ctx: RoundContext, *, rule: str, gamma_init: float, tol: float, direction: str,
                     target: str) -> tuple[torch.Tensor, dict]:
    B = ctx.benign
    mu = B.mean(0)
    p = _perturbation(ctx, direction)
    n_mal = ctx.own.shape[0]
    D = _sq_dists(B, B)  # (n_b, n_b) pairwise squared distances between benign updates
    if target == "aggregator":
        if ctx.aggregate is None:
            raise ValueError(f"{rule}: target=aggregator needs the server's rule in the context")
        best = {"dev": -1.0}

        def ok(gamma: float) -> bool:  # AGR-tailored: keep gamma while the aggregate moves further away
            mal = _same_for_all(mu + gamma * p, n_mal)
            dev = float((ctx.aggregate(torch.cat([B, mal])) - mu).norm())
            if dev > best["dev"]:
                best["dev"] = dev
                return True
            return False
    else:
        bound = float(D.max()) if rule == "min_max" else float(D.sum(1).max())
        # ||mu + gamma p - b_i||^2 = a_i + 2 gamma c_i + gamma^2 pp: one pass over the data, then O(n) per step
        diff = (mu - B).double()
        a, c, pp = diff.pow(2).sum(1), diff @ p.double(), float(p.double().dot(p.double()))

        def ok(gamma: float) -> bool:  # AGR-agnostic: stay within the benign updates' own spread
            d = a + 2 * gamma * c + gamma * gamma * pp
            return float(d.max() if rule == "min_max" else d.sum()) <= bound

    if gamma_init is None:  # scale-aware: the search covers gamma * ||p|| in (0, 2 * max benign distance)
        spread = float(D.max().sqrt())
        gamma_init = spread / max(float(p.norm()), 1e-30) if spread > 0 else 1.0
    tol = tol if tol is not None else gamma_init * 1e-6
    gamma = _gamma_search(ok, gamma_init, tol)
    return _same_for_all(mu + gamma * p, n_mal), {"gamma": gamma, "direction": direction, "target": target}


MIN_DIST_PARAMS = {
    # the released code starts at lamda = 10 with threshold_diff = 1e-5 for unit perturbations of image
    # models; LoRA deltas are far smaller, so by default both scale with the benign spread
    "gamma_init": Param(None, float),
    "tol": Param(None, float),
    "direction": Param("harmful", str, ("harmful", "inverse_unit", "inverse_std", "inverse_sign")),
    "target": Param("agnostic", str, ("agnostic", "aggregator")),
}


def _min_dist_bounds(name: str):
    def bounds(p: dict) -> None:
        if any(p[k] is not None and not p[k] > 0 for k in ("gamma_init", "tol")):
            fail(name, f"gamma_init and tol must be > 0, got {p['gamma_init']} and {p['tol']}")
    return bounds


@register("min_max", scope="round", knowledge=("omniscient", "estimate"), min_benign=2, params=MIN_DIST_PARAMS,
          bounds=_min_dist_bounds("min_max"), targets_aggregator=True)
def min_max(ctx: RoundContext, *, gamma_init: float, tol: float, direction: str, target: str):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021): ``mean + gamma * p`` with the largest ``gamma`` such that
    the malicious update's maximum distance to any benign update is at most the largest distance between
    two benign updates.

    ``p``: ``harmful`` (default here, beyond the paper: unit vector towards the coalition's harmful update),
    or the paper's ``inverse_unit`` / ``inverse_std`` / ``inverse_sign``. ``target=aggregator``: the
    AGR-tailored variant, which simulates the server's rule and keeps ``gamma`` while the aggregate moves
    further from the benign mean (needs a rule without server state or server-private inputs).

    Knows: the benign updates (``omniscient``) or benign-looking ones it trained (``estimate``); with
    ``target=aggregator`` also the server's rule and its parameters.
    """
    return _min_dist_attack(ctx, rule="min_max", gamma_init=gamma_init, tol=tol, direction=direction, target=target)


@register("min_sum", scope="round", knowledge=("omniscient", "estimate"), min_benign=2, params=MIN_DIST_PARAMS,
          bounds=_min_dist_bounds("min_sum"), targets_aggregator=True)
def min_sum(ctx: RoundContext, *, gamma_init: float, tol: float, direction: str, target: str):
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021): as :func:`min_max`, but the sum of squared distances from
    the malicious update to the benign ones must stay at most the largest such sum of a benign update.

    Knows: as :func:`min_max`.
    """
    return _min_dist_attack(ctx, rule="min_sum", gamma_init=gamma_init, tol=tol, direction=direction, target=target)


def benign_statistics(B: torch.Tensor) -> tuple[float, float]:
    """(median norm, median cosine of each update to the mean of the others) of benign updates ``B``."""
    norms = B.norm(dim=1)
    n = B.shape[0]
    total = B.sum(0)
    cos = []
    for i in range(n):
        rest = (total - B[i]) / (n - 1)
        cos.append(float(torch.dot(B[i], rest) / (norms[i] * rest.norm()).clamp_min(1e-30)))
    return float(norms.median()), float(torch.tensor(cos).median())


@register("stealthy", scope="round", knowledge=("estimate", "omniscient"), min_benign=2, params={})
def stealthy(ctx: RoundContext) -> tuple[torch.Tensor, dict]:
    """Stealthy safety attack (fedsafe, beyond the paper): the data-only attack, disguised.

    From the benign(-looking) updates the coalition estimates a typical norm ``N`` (median) and a typical
    cosine ``c`` of an update to the mean of the others (median). Each malicious client then sends
    ``N * (c * m + sqrt(1 - c^2) * h_perp)``, where ``m`` is the unit benign mean and ``h_perp`` the unit
    part of its own harmful delta orthogonal to ``m``: an update with a benign norm and a benign cosine to
    the mean, carrying as much of the harmful direction as those two statistics allow.

    Knows (default ``estimate``): benign-looking updates it trains itself on public normal instruction
    data; nothing about the other clients. ``omniscient`` uses the round's benign updates instead.
    """
    B = ctx.benign
    N, c = benign_statistics(B)
    c = min(max(c, -1.0), 1.0)
    m = _unit(B.mean(0))
    out = []
    for h in ctx.own:
        perp = h - torch.dot(h, m) * m
        perp = _unit(perp)
        out.append(N * (c * m + math.sqrt(max(0.0, 1 - c * c)) * perp))
    return torch.stack(out), {"norm": N, "cos": c}
