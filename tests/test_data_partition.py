"""Federation building: properties of the partition, decontamination, config validation; offline."""

from __future__ import annotations

import hashlib
import json
import random
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsafe.data import ClientGroup, DataConfig, Record, build_federation, check_contamination
from fedsafe.data.contamination import ContaminationIndex, assert_no_contamination, jaccard, normalize, shingles
from fedsafe.data.inspect import format_federation, inspect_federation
from fedsafe.data.partition import _dirichlet_counts, apportion
from fedsafe.errors import ConfigError, DataError

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB = [hashlib.sha256(str(i).encode()).hexdigest()[:6] for i in range(2000)]


def synth(source: str, n: int, kind: str = "normal", seed: int = 0) -> list[Record]:
    """Records whose instructions are random word salads: no accidental near-duplicates."""
    rng = random.Random(f"{source}-{seed}")
    out = []
    for i in range(n):
        text = " ".join(rng.choice(VOCAB) for _ in range(10))
        out.append(Record(f"{source} {i} {text}", "" if kind == "prompt" else f"answer {i}", kind, source))
    return out


_POOLS: dict[tuple, dict[str, list[Record]]] = {}


def pools(n_normal=400, n_aligned=200, n_bad=200, n_eval=80) -> dict[str, list[Record]]:
    key = (n_normal, n_aligned, n_bad, n_eval)
    if key not in _POOLS:  # records are immutable and build_federation copies its inputs: safe to share
        _POOLS[key] = {
            "norm": synth("norm", n_normal),
            "safe": synth("safe", n_aligned, "aligned"),
            "bad": synth("bad", n_bad, "unaligned"),
            "evalh": synth("evalh", n_eval, "prompt"),
        }
    return dict(_POOLS[key])


def config(benign=4, malicious=2, n=20, split="iid", alpha=0.5, upsample=False, **kw) -> DataConfig:
    groups = [ClientGroup(clients=benign, mix={"norm": 0.7, "safe": 0.3}, name="benign")]
    if malicious:
        groups.append(ClientGroup(clients=malicious, mix={"bad": 1.0}, malicious=True, name="malicious"))
    base = dict(groups=groups, samples_per_client=n, split=split, dirichlet_alpha=alpha, upsample=upsample,
                eval_harmful="evalh", eval_harmful_n=10, eval_benign="norm", eval_benign_n=10, probe_n=5,
                defense_aligned="safe", defense_normal="norm")
    base.update(kw)
    return DataConfig(**base)


def all_ids(fed) -> list[str]:
    ids = [r.id for c in fed.clients for r in c.records]
    ids += [r.id for r in fed.eval_harmful + fed.eval_benign + fed.probe_harmful + fed.probe_benign]
    return ids + [r.id for v in fed.heldout.values() for r in v]


# ---------------------------------------------------------------- properties


@FAST
@given(benign=st.integers(1, 6), malicious=st.integers(0, 3), n=st.integers(1, 30),
       split=st.sampled_from(["iid", "dirichlet", "by_source"]), seed=st.integers(0, 10_000))
def test_each_sample_once_and_sizes_as_asked(benign, malicious, n, split, seed):
    p = pools()
    cfg = config(benign, malicious, n, split)
    fed = build_federation(cfg, seed=seed, pools=p)
    assert [len(c.records) for c in fed.clients] == [n] * (benign + malicious)
    ids = all_ids(fed)
    assert len(ids) == len(set(ids))  # nothing assigned twice
    assert set(ids) == {r.id for s in cfg.all_specs() for r in p[s]}  # and nothing lost
    assert not fed.upsampled


@FAST
@given(seed=st.integers(0, 10_000), split=st.sampled_from(["iid", "dirichlet", "by_source"]))
def test_seed_reproducible(seed, split):
    cfg = config(split=split)
    a = build_federation(cfg, seed=seed, pools=pools()).to_manifest()
    b = build_federation(cfg, seed=seed, pools=pools()).to_manifest()
    assert a == b
    c = build_federation(cfg, seed=seed + 1, pools=pools()).to_manifest()
    assert c != a


def test_shuffle_seed_is_the_default_seed():
    cfg = config(shuffle_seed=7)
    assert build_federation(cfg, pools=pools()).to_manifest() == build_federation(cfg, seed=7, pools=pools()).to_manifest()


@FAST
@given(order=st.permutations(["b1", "m1", "b2", "m2"]), seed=st.integers(0, 100))
def test_malicious_ids_last(order, seed):
    spec = {"b1": (2, False), "b2": (1, False), "m1": (1, True), "m2": (2, True)}
    groups = [ClientGroup(clients=spec[g][0], mix={"bad" if spec[g][1] else "norm": 1.0}, malicious=spec[g][1], name=g) for g in order]
    fed = build_federation(config(groups=groups), seed=seed, pools=pools())
    assert fed.malicious_ids == [3, 4, 5]
    assert [c.malicious for c in fed.clients] == [False] * 3 + [True] * 3
    benign_order = [g for g in order if g.startswith("b")]
    assert [c.group for c in fed.clients[:3]] == [benign_order[0]] * spec[benign_order[0]][0] + [benign_order[1]] * spec[benign_order[1]][0]


def test_paper_default_layout_ids_7_8_9():
    cfg = DataConfig(eval_harmful="tiny-harmful", eval_harmful_n=10, eval_benign="tiny", eval_benign_n=10, probe_n=5,
                     defense_aligned="aligned:tiny-harmful", defense_normal="tiny", samples_per_client=10,
                     groups=[ClientGroup(7, {"tiny": 0.7, "aligned:tiny-harmful": 0.3}), ClientGroup(3, {"tiny-unaligned": 1.0}, malicious=True)])
    fed = build_federation(cfg)
    assert fed.malicious_ids == [7, 8, 9] and [c.group for c in fed.clients] == ["benign"] * 7 + ["malicious"] * 3


@FAST
@given(seed=st.integers(0, 10_000), split=st.sampled_from(["iid", "dirichlet", "by_source"]))
def test_eval_disjoint_from_training(seed, split):
    fed = build_federation(config(split=split), seed=seed, pools=pools())
    evals = fed.eval_prompts()
    train_ids = {r.id for c in fed.clients for r in c.records} | {r.id for v in fed.heldout.values() for r in v}
    assert not train_ids & {r.id for r in evals}
    assert not check_contamination(evals, {c.id: c.records for c in fed.clients})
    assert not {r.id for r in fed.probe_harmful} & {r.id for r in fed.eval_harmful}


def test_kinds_interleaved_within_clients():
    fed = build_federation(config(n=40), pools=pools())
    kinds = [r.kind for r in fed.clients[0].records]
    assert kinds.count("aligned") == 12
    # the miniature run's bug: all aligned first, then all normal. A shuffled client has many runs.
    runs = 1 + sum(a != b for a, b in zip(kinds, kinds[1:]))
    assert runs > 6


def test_iid_mix_fractions():
    fed = build_federation(config(n=20), pools=pools())
    for c in fed.clients[:4]:
        assert sum(r.source == "safe" for r in c.records) == 6


def test_by_source_one_source_per_client():
    fed = build_federation(config(benign=10, split="by_source"), pools=pools())
    per = [{r.source for r in c.records} for c in fed.clients[:10]]
    assert all(len(s) == 1 for s in per)
    assert sum(s == {"safe"} for s in per) == 3


def _skew(fed, n_benign) -> float:
    """Mean total-variation distance between each benign client's composition and the group mix."""
    tv = []
    for c in fed.clients[:n_benign]:
        share = sum(r.source == "safe" for r in c.records) / len(c.records)
        tv.append(abs(share - 0.3))
    return float(np.mean(tv))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = {}
    for alpha in (0.05, 1.0, 100.0):
        skews[alpha] = np.mean([_skew(build_federation(config(benign=8, n=30, split="dirichlet", alpha=alpha), seed=s, pools=pools()), 8)
                                for s in range(8)])
    assert skews[0.05] > skews[1.0] > skews[100.0]
    assert skews[100.0] < 0.05 and skews[0.05] > 0.2


@FAST
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8),
       fracs=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=4),
       alpha=st.floats(0.01, 50.0), seed=st.integers(0, 1000))
def test_dirichlet_counts_keep_both_margins(sizes, fracs, alpha, seed):
    M = _dirichlet_counts(sizes, fracs, alpha, np.random.default_rng(seed))
    assert (M >= 0).all() and M.sum(axis=1).tolist() == sizes
    assert M.sum(axis=0).tolist() == apportion(sum(sizes), fracs)


@FAST
@given(total=st.integers(0, 1000), weights=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=10))
def test_apportion(total, weights):
    out = apportion(total, weights)
    if sum(weights) > 0:
        assert sum(out) == total
        exact = [w / sum(weights) * total for w in weights]
        assert all(abs(o - e) < 1 for o, e in zip(out, exact))


# ---------------------------------------------------------------- upsampling and errors


def test_too_few_records_errors_or_upsamples_disjointly():
    small = pools(n_bad=30)
    with pytest.raises(DataError, match="bad: clients need 60 records but only 30 unique"):
        build_federation(config(malicious=3), pools=small)
    fed = build_federation(config(malicious=3, upsample=True), pools=small)
    bad_clients = fed.clients[4:]
    assert [len(c.records) for c in bad_clients] == [20, 20, 20]
    owned = [{r.id for r in c.records} for c in bad_clients]
    assert all(not (a & b) for i, a in enumerate(owned) for b in owned[i + 1:])  # disjoint between clients
    assert sum(len(o) for o in owned) == 30
    assert fed.upsampled == {"bad": {"unique": 30, "needed": 60}}
    assert any("upsampled 30" in n for n in fed.notes)


def test_eval_too_large_is_an_error():
    with pytest.raises(DataError, match="eval_harmful: evalh has only 80 usable record"):
        build_federation(config(eval_harmful_n=81), pools=pools())
    with pytest.raises(DataError, match="probe_harmful"):
        build_federation(config(eval_harmful_n=78, probe_n=5), pools=pools())
    with pytest.raises(DataError, match="harmful evaluation needs prompts"):
        build_federation(config(eval_harmful="norm"), pools=pools())


# ---------------------------------------------------------------- decontamination


def test_contaminated_training_records_are_removed_before_assignment():
    p = pools()
    evalh = p["evalh"]
    # plant an exact copy (different case/punctuation) and a near copy of every eval prompt in the pools
    planted_exact = [Record(r.instruction.upper() + "!!", "x", "unaligned", "bad") for r in evalh]
    planted_near = [Record(r.instruction + " please", "y", "aligned", "safe") for r in evalh]
    p["bad"] = p["bad"] + planted_exact
    p["safe"] = p["safe"] + planted_near
    fed = build_federation(config(), pools=p)
    held = {r.id for r in fed.eval_harmful + fed.probe_harmful}
    planted_ids = {r.id for r, e in zip(planted_exact + planted_near, evalh + evalh) if e.id in held}
    everything = {r.id for c in fed.clients for r in c.records} | {r.id for v in fed.heldout.values() for r in v}
    assert not planted_ids & everything
    assert fed.contamination_removed == {"bad": 15, "safe": 15}


def test_allow_contamination_keeps_duplicates():
    p = pools()
    p["norm"] = p["norm"] + [Record(r.instruction, "ans", "normal", "norm") for r in p["evalh"]]
    fed = build_federation(config(allow_contamination=True), pools=p)
    assert not fed.contamination_removed and any("allow_contamination" in n for n in fed.notes)


def test_assert_no_contamination_for_defense_data():
    fed = build_federation(config(), pools=pools())
    leak = [Record(fed.eval_harmful[0].instruction.lower(), "no", "aligned", "def")]
    with pytest.raises(DataError, match=r"1 evaluation prompt overlap\(s\) with defense data"):
        assert_no_contamination(fed.eval_prompts(), {"defense": leak}, what="defense data")
    assert_no_contamination(fed.eval_prompts(), {"defense": fed.heldout["safe"]}, what="defense data")


def test_normalize_and_matching():
    assert normalize("  How do I -- make   a BOMB?! ") == "how do i make a bomb"
    idx = ContaminationIndex([Record("Explain how to make a fake passport at home in ten easy steps", "", "prompt", "e")])
    assert idx.matches("explain how to make a FAKE passport at home, in ten easy steps!") == [(0, "exact", 1.0)]
    (m,) = idx.matches("Explain how to make a fake passport at home in ten easy steps quickly")
    assert m[1] == "near" and m[2] >= 0.8
    assert idx.matches("Explain how to bake bread at home in ten easy steps") == []


@FAST
@given(texts=st.lists(st.lists(st.sampled_from("a b c d e f".split()), min_size=1, max_size=9), min_size=1, max_size=12),
       probes=st.lists(st.lists(st.sampled_from("a b c d e f".split()), min_size=1, max_size=9), min_size=1, max_size=12),
       threshold=st.sampled_from([0.5, 0.8, 1.0]))
def test_prefix_filter_matches_brute_force(texts, probes, threshold):
    evals = [Record(" ".join(t), "", "prompt", "e") for t in texts]
    idx = ContaminationIndex(evals, threshold=threshold)
    for words in probes:
        text = " ".join(words)
        got = {i for i, _, _ in idx.matches(text)}
        want = {i for i, e in enumerate(evals)
                if normalize(e.instruction) == normalize(text) or jaccard(shingles(text), shingles(e.instruction)) >= threshold}
        assert got == want


def test_contamination_is_fast_for_20k_by_500():
    evals = synth("ev", 500, "prompt")
    train = synth("tr", 20_000)
    t = time.perf_counter()
    assert check_contamination(evals, {"all": train}) == []
    assert time.perf_counter() - t < 5.0


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(groups=[]), "at least one client group"),
        (dict(groups=[ClientGroup(0, {"tiny": 1.0})]), "clients: must be an integer >= 1"),
        (dict(groups=[ClientGroup(2, {"tiny": 0.5, "tiny-unaligned": 0.4})]), "fractions sum to 0.9"),
        (dict(groups=[ClientGroup(2, {})]), "mix: empty"),
        (dict(groups=[ClientGroup(2, {"tiny": -1.0, "tiny-harmful": 2.0})]), "fraction must be a number >= 0"),
        (dict(groups=[ClientGroup(2, {"tinyy": 1.0})]), "did you mean 'tiny'"),
        (dict(groups=[ClientGroup(1, {"tiny": 1.0}, name="a"), ClientGroup(1, {"tiny": 1.0}, name="a")]), "duplicate group name"),
        (dict(split="random"), "unknown split 'random'"),
        (dict(dirichlet_alpha=0.0), "dirichlet_alpha: must be > 0"),
        (dict(samples_per_client=0), "samples_per_client: must be an integer >= 1"),
        (dict(eval_harmful_n=-1), "eval_harmful_n"),
        (dict(eval_benign="nosuch"), "data.eval_benign: unknown data source"),
        (dict(defense_aligned="aligned:nosuch"), "data.defense_aligned"),
    ],
)
def test_config_validation(change, fragment):
    with pytest.raises(ConfigError, match=fragment):
        DataConfig(**change).validate()


def test_default_config_is_valid_and_paper_shaped():
    cfg = DataConfig().validate()
    assert cfg.client_sizes() == [500] * 10
    assert [g.malicious for g in cfg.groups] == [False, True] and cfg.shuffle_seed == 2023
    assert cfg.all_specs() == ["sharegpt", "aligned:donotanswer", "manyshot", "strongreject"]


# ---------------------------------------------------------------- tiny end-to-end, summary, manifest, inspect


def tiny_config(**kw) -> DataConfig:
    base = dict(
        groups=[ClientGroup(4, {"tiny": 0.8, "aligned:tiny-harmful": 0.2}), ClientGroup(1, {"tiny-unaligned": 1.0}, malicious=True)],
        samples_per_client=20, eval_harmful="tiny-harmful", eval_harmful_n=10, eval_benign="tiny", eval_benign_n=10,
        probe_n=5, defense_aligned="aligned:tiny-harmful", defense_normal="tiny",
    )
    base.update(kw)
    return DataConfig(**base)


def test_tiny_federation_end_to_end():
    fed = build_federation(tiny_config())
    assert fed.malicious_ids == [4]
    # eval/probe harmful prompts are also in tiny-unaligned and aligned:tiny-harmful: all 15 removed from both
    assert fed.contamination_removed == {"aligned:tiny-harmful": 15, "tiny-unaligned": 15}
    held = {r.instruction for r in fed.eval_harmful + fed.probe_harmful}
    assert not held & {r.instruction for c in fed.clients for r in c.records}
    s = fed.summary()
    assert s["clients"][0]["by_kind"] == {"aligned": 4, "normal": 16}
    assert s["clients"][4]["by_source"] == {"tiny-unaligned": 20}
    assert s["heldout"]["tiny"]["n"] == 120 - 10 - 5 - 64  # eval, probe, 4 clients x 16
    json.dumps(s), json.dumps(fed.to_manifest())
    man = fed.to_manifest()
    assert len(man["clients"]) == 5 and len(man["eval_harmful"]) == 10 and man["malicious_ids"] == [4]


def test_inspect_output():
    fed = build_federation(tiny_config())
    text = format_federation(fed)
    assert "malicious (M)" in text and "heldout tiny" in text and "eval_harmful" in text
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(inspect_federation(fed))
    assert "server-side sets" in console.export_text()
    assert inspect_federation(fed, plain=True) == text


def test_length_limits_reach_sources_that_take_them():
    seen = {}

    def loader(spec, **opts):
        seen[spec] = opts
        from fedsafe.data import load_source

        return load_source(spec, **opts)

    build_federation(tiny_config(), loader=loader)
    # aligned: passes the instruction limit on to its inner spec only where that takes it (tiny-harmful does not)
    assert seen["tiny"] == {} and seen["aligned:tiny-harmful"] == {"max_instruction_chars": 1000}


@pytest.mark.integration
def test_default_config_with_embedded_assets():
    fed = build_federation(DataConfig())
    assert fed.malicious_ids == [7, 8, 9] and [len(c.records) for c in fed.clients] == [500] * 10
    assert (len(fed.eval_harmful), len(fed.eval_benign), len(fed.probe_harmful), len(fed.probe_benign)) == (100, 50, 20, 20)
    assert {r.kind for c in fed.clients[7:] for r in c.records} == {"unaligned"}
    assert [sum(r.kind == "aligned" for r in c.records) for c in fed.clients[:7]] == [150] * 7
    assert set(fed.upsampled) == {"aligned:donotanswer", "manyshot"}
    assert not check_contamination(fed.eval_prompts(), {c.id: c.records for c in fed.clients})
    assert fed.to_manifest()["clients"][7]["malicious"] is True


def test_duplicate_records_in_a_source_are_used_once():
    p = pools()
    p["norm"] = p["norm"] + p["norm"][:50]  # the same records listed twice
    ids = all_ids(build_federation(config(), pools=p))
    assert len(ids) == len(set(ids))
