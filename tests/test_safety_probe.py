"""The behavioural rule: rejects updates that raise the NLL of safe answers; engine wiring on tiny."""

import json

import pytest
import torch

from fedsafe.aggregators import REGISTRY, check_params
from fedsafe.errors import ConfigError


def test_rejects_safety_eroding_update():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.2], [-5.0, 9.0]])
    scores = torch.tensor([[0.01, 0.0], [0.00, 0.0], [0.40, 0.0]])
    r = REGISTRY["safety_probe"](x, None, probe_scores=scores)
    assert r.client_weights.tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert torch.allclose(r.aggregate, torch.tensor([1.0, 0.1]))


def test_soft_mode_down_weights():
    x = torch.tensor([[1.0], [3.0]])
    soft = REGISTRY["safety_probe"](x, None, probe_scores=torch.tensor([[0.0, 0.0], [0.2, 0.0]]), mode="soft")
    assert soft.client_weights[0] > 0.9 and soft.client_weights.sum() == pytest.approx(1.0)
    # the threshold is relative to the median, so at least half of the clients are always kept
    same = REGISTRY["safety_probe"](x, None, probe_scores=torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert same.client_weights.tolist() == pytest.approx([0.5, 0.5])


def test_rank_mode_drops_the_top_f_only_if_they_erode_safety():
    x = torch.tensor([[1.0], [2.0], [9.0]])
    # small differences that the robust z-score would keep: rank drops the worst one
    s = torch.tensor([[0.01, 0.0], [0.02, 0.0], [0.05, 0.0]])
    assert REGISTRY["safety_probe"](x, None, probe_scores=s).client_weights.tolist() == pytest.approx([1 / 3] * 3)
    r = REGISTRY["safety_probe"](x, None, probe_scores=s, mode="rank", f=1)
    assert r.client_weights.tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert torch.allclose(r.aggregate, torch.tensor([1.5]))
    # a top score that does not raise the safe NLL is kept; f=0 keeps everyone
    ok = torch.tensor([[-0.03, 0.0], [-0.02, 0.0], [-0.01, 0.0]])
    assert REGISTRY["safety_probe"](x, None, probe_scores=ok, mode="rank", f=1).client_weights.tolist() == \
        pytest.approx([1 / 3] * 3)
    assert REGISTRY["safety_probe"](x, None, probe_scores=s, mode="rank", f=0).client_weights.tolist() == \
        pytest.approx([1 / 3] * 3)
    with pytest.raises(ConfigError, match="f=3"):
        REGISTRY["safety_probe"](x, None, probe_scores=s, mode="rank", f=3)


def test_needs_probe_scores_and_validates_params():
    with pytest.raises(ConfigError, match="probe"):
        REGISTRY["safety_probe"](torch.ones(2, 3), None)
    with pytest.raises(ConfigError):
        check_params("safety_probe", 3, {"mode": "maybe"})


def test_engine_passes_probe_scores(tmp_path):
    from fedsafe.config import load_config
    from fedsafe.pipeline import start_run

    d = start_run(load_config("tiny", ["fl.rounds=1", "fl.aggregator=safety_probe"]), tmp_path / "r", progress=False,
                  evaluate=False)
    f = json.loads((d / "forensics.jsonl").read_text().splitlines()[0])
    assert len(f["info"]["safe_nll_change"]) == len(f["clients"])
