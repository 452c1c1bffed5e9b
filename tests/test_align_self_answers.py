"""init.normal_responses=self: the server's alignment trains on the model's own answers to its normal
prompts (self-distillation), and on the reference refusals for its aligned prompts."""

import pytest
import torch

from fedsafe.config import load_config
from fedsafe.errors import ConfigError

ALIGN = ["init.adapter=align", "init.steps=2", "init.n=20", "fl.rounds=1"]


def test_own_answers_replace_normal_answers_only(monkeypatch, tmp_path):
    from fedsafe.data.partition import build_federation
    from fedsafe.defense.align import own_answers
    from fedsafe.defense.data import reserve
    from fedsafe.eval.runner import generate_cached
    from fedsafe.runtime import get_runtime

    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", ALIGN + ["init.normal_responses=self"])
    rt = get_runtime(cfg.model, cfg.lora)
    recs = reserve(cfg, build_federation(cfg.data, seed=cfg.seed))
    assert {r.kind for r in recs} == {"aligned", "normal"}
    out = own_answers(cfg, rt, recs)
    normal = [r for r in recs if r.kind == "normal"]
    want = generate_cached(rt, None, [r.instruction for r in normal], use_cache=False,
                           max_new_tokens=cfg.model.seq_length - cfg.model.max_prompt_length)
    got = {r.instruction: r.response for r in out if r.kind == "normal"}
    assert [got[r.instruction] for r in normal] == [w[0].strip() or r.response for r, w in zip(normal, want)]
    assert [r for r in out if r.kind == "aligned"] == [r for r in recs if r.kind == "aligned"]  # refusals kept
    assert len(out) == len(recs)


def test_self_answers_are_a_start_of_their_own(monkeypatch, tmp_path):
    from fedsafe.pipeline import build_engine

    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    a = build_engine(load_config("tiny", ALIGN), tmp_path / "a", progress=False)
    b = build_engine(load_config("tiny", ALIGN + ["init.normal_responses=self"]), tmp_path / "b", progress=False)
    assert len(list((tmp_path / "cache" / "aligned_init").glob("*.safetensors"))) == 2  # never served each other's
    # (the tiny model's own answers happen to be its data's answers, so the two starts coincide here)
    assert torch.isfinite(b.start_vec).all() and b.start_vec.abs().sum() > 0
    assert torch.equal(a.start_vec, b.start_vec)


def test_unknown_normal_responses_is_refused():
    with pytest.raises(ConfigError, match="init.normal_responses"):
        load_config("tiny", ["init.normal_responses=teacher"])
