"""The probe-aware attack: a regulariser on held-out safe answers, through the benign training path."""

from __future__ import annotations

import pytest
import torch

from fedsafe import attack
from fedsafe.config import load_config
from fedsafe.errors import ConfigError, FedsafeError


def engine(tmp_path, behaviour, *extra):
    from fedsafe.pipeline import build_engine

    cfg = load_config("tiny", [f"attack.behaviour={behaviour}", "fl.local_steps=6", *extra])
    return build_engine(cfg, tmp_path, progress=False)


def malicious_delta(eng) -> torch.Tensor:
    cid = eng.malicious[0]
    eng.client_update(cid, 0, eng.cfg.fl.lr)
    return eng.rt.handle.get_flat() - eng.global_vec


def test_registered_with_its_knowledge_and_bounds():
    spec = attack.get_spec("probe_evade")
    assert spec.scope == "client" and spec.regulariser and "Knows" in attack.REGISTRY["probe_evade"].__doc__
    assert attack.resolve_params(spec, {}) == {"weight": 1.0, "safe_n": 32}
    for bad, match in (({"weight": -0.5}, "weight"), ({"weight": 1e4}, "weight"), ({"weight": float("nan")}, "weight"),
                       ({"safe_n": 0}, "safe_n"), ({"lam": 1.0}, "unknown parameter")):
        with pytest.raises(ConfigError, match=match):
            load_config("tiny", ["attack.behaviour=probe_evade", f"attack.params={bad}"])


def test_refused_before_training_without_enough_safe_answers(tmp_path):
    with pytest.raises(FedsafeError, match="held-out harmful prompts with safe answers"):
        engine(tmp_path, "probe_evade", "attack.params={safe_n: 1000}")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_weight_zero_is_the_data_only_attack_bit_for_bit(tmp_path):
    plain = malicious_delta(engine(tmp_path / "a", "data"))
    zero = malicious_delta(engine(tmp_path / "b", "probe_evade", "attack.params={weight: 0.0}"))
    assert torch.equal(plain, zero)


def test_regulariser_lowers_the_probe_score_against_the_data_only_attack(tmp_path):
    """The safety_probe score (change in safe-answer NLL on the server's probe prompts, which the attacker
    never sees) of the malicious update is lower with the regulariser than without, same seed and data."""
    from fedsafe.defense.probe import make_probe_fn

    scores = {}
    for name, behaviour, extra in (("data", "data", ()), ("evade", "probe_evade", ("attack.params={weight: 3.0}",))):
        eng = engine(tmp_path / name, behaviour, *extra)
        delta = malicious_delta(eng)
        probe_prompts = {r.instruction for r in eng.fed.probe_harmful}
        if eng.attack_aux is not None:  # the attacker's safe answers are not the server's probe prompts
            assert probe_prompts.isdisjoint(r.instruction for r in eng.attack_aux[0])
        scores[name] = float(make_probe_fn(eng.rt, eng.fed)(eng.global_vec, delta[None])[0, 0])
    assert scores["evade"] < scores["data"] - 1e-3, scores


def test_batched_clients_train_a_regularised_attacker_alone(tmp_path):
    """fl.batch_clients > 1 keeps the extra term: the malicious client goes through client_update."""
    eng = engine(tmp_path, "probe_evade", "fl.batch_clients=3", "fl.sampling=stratified", "fl.malicious_per_round=1")
    seen = []
    orig = eng.client_update

    def spy(cid, rnd, lr):
        seen.append(cid)
        return orig(cid, rnd, lr)

    eng.client_update = spy
    row = eng.run_round(0)
    assert row["malicious"] and set(row["malicious"]) <= set(seen)
