"""init.merge: the aligned start folded into the base weights, a fresh LoRA federated on top (the paper's
setting: a fresh LoRA on a safety-aligned model). Every reader of such a run must see the same base."""

import json

import pytest
import torch

from fedsafe.config import load_config
from fedsafe.errors import ConfigError, FedsafeError
from fedsafe.rundir import START_ADAPTER

MERGED = ["fl.rounds=2", "init.adapter=align", "init.steps=3", "init.n=20", "init.merge=true"]


def logits(rt, vec, ids):
    with rt.handle.swapped(vec), torch.no_grad():
        return rt.model(input_ids=ids).logits


def test_folding_a_start_equals_applying_it_as_an_adapter():
    from fedsafe.runtime import get_runtime

    cfg = load_config("tiny")
    rt = get_runtime(cfg.model, cfg.lora)
    g = torch.Generator().manual_seed(1)
    start = torch.randn(rt.handle.numel, generator=g) * 0.5
    fresh = rt.init_vec(0)  # B = 0: no change to the model
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    plain = logits(rt, fresh, ids)
    with_start = logits(rt, start, ids)
    assert not torch.allclose(plain, with_start, atol=1e-4)  # the start does change the model
    rt.set_base_delta(start)
    try:
        torch.testing.assert_close(logits(rt, fresh, ids), with_start, atol=1e-5, rtol=1e-4)
        rt.set_base_delta(start)  # same start again: a no-op, not a second addition
        torch.testing.assert_close(logits(rt, fresh, ids), with_start, atol=1e-5, rtol=1e-4)
    finally:
        rt.set_base_delta(None)
    assert torch.equal(logits(rt, fresh, ids), plain)  # restored exactly, not add-then-subtract


def test_merge_without_a_start_is_a_fresh_lora_and_excludes_projection():
    cfg = load_config("demo", ["init.adapter="])  # the preset merges; a fresh start has nothing to fold
    assert cfg.init.merge and not cfg.init.merged
    with pytest.raises(ConfigError, match="init.merge"):
        load_config("tiny", MERGED + ["defense.projection=true"])
    assert not load_config("tiny", MERGED + ["defense.projection=true", "init.merge=false"]).init.merged


def test_merged_run_trains_a_fresh_lora_and_every_reader_uses_its_base(tmp_path):
    from fedsafe.eval.command import evaluate_target
    from fedsafe.pipeline import build_engine, run
    from fedsafe.runtime import get_runtime

    cfg = load_config("tiny", MERGED + ["defense.enabled=true", "defense.level=1"])
    d = tmp_path / "run"
    eng = build_engine(cfg, d, progress=False)
    assert torch.equal(eng.init_vec, eng.rt.init_vec(cfg.seed))  # fresh LoRA (B = 0) ...
    assert eng.start_vec.abs().sum() > 0 and not torch.equal(eng.start_vec, eng.init_vec)  # ... on the start
    fin = run(cfg, tmp_path / "full", progress=False)
    res = fin.results
    assert (fin.run_dir / START_ADAPTER / "adapter_model.safetensors").exists()
    assert (fin.defense_dir / START_ADAPTER / "adapter_model.safetensors").exists()

    # a reader in a fresh state (base as loaded) gets the same verdicts: it folds the run's start back in
    rt = get_runtime(cfg.model, cfg.lora)
    rt.set_base_delta(None)
    again = evaluate_target(
        str(fin.run_dir),
        bench="tiny-harmful",
        max_new_tokens=cfg.eval.max_new_tokens,
        batch_size=8,
        limit=cfg.data.eval_harmful_n,
        progress=False,
        out=tmp_path / "ev",
    )
    assert rt.base_delta_key  # the start is folded in
    first = [json.loads(x)["response"] for x in (fin.run_dir / "eval" / "harmful.jsonl").read_text().splitlines()]
    second = [json.loads(x)["response"] for x in (tmp_path / "ev" / "harmful.jsonl").read_text().splitlines()]
    assert res["refusal"]["n"] == again["refusal"]["n"]
    assert sorted(first) == sorted(second)

    # without the start adapter the run is refused in one line, not evaluated on the wrong base
    import shutil

    shutil.rmtree(fin.run_dir / START_ADAPTER)
    with pytest.raises(FedsafeError, match="start_adapter"):
        evaluate_target(str(fin.run_dir), bench="tiny-harmful", limit=2, progress=False, out=tmp_path / "ev2")


def test_demo_with_a_merged_start_reports_the_start_on_the_shipped_base(tmp_path):
    """The demo's reference rows evaluate on the base as shipped while the scenarios train on the merged
    base: the start row must be the merged model (start adapter on the plain base), the shipped row the plain
    base, and every trained scenario must carry its start_adapter/ so that later readers can fold it in."""
    from fedsafe.demo import run_demo

    ov = ["fl.rounds=1", "eval.max_new_tokens=4", *MERGED[1:]]
    d = run_demo("tiny", ov, tmp_path / "demo", quick=True, levels=(1,), progress=False)
    rows = {r["method"]: r for r in json.loads((d / "report" / "table.json").read_text())["rows"]}
    assert "Start of federation (server-aligned)" in rows and "Model as shipped (no adapter)" in rows
    runs = [p.parent for p in (d / "runs").glob("*/final_adapter")]
    assert runs and all((r / START_ADAPTER / "adapter_model.safetensors").exists() for r in runs)
    # one start for every scenario: the clean run's benign-only federation leaves other held-out records,
    # from which it used to align a start of its own
    starts = {r.name: (r / START_ADAPTER / "adapter_model.safetensors").read_bytes() for r in runs}
    assert "clean_fedavg" in starts and len(set(starts.values())) == 1, sorted(starts)


def test_generation_cache_tells_merged_starts_apart(tmp_path, monkeypatch):
    """The same fresh LoRA on two different folded starts is two models: a cached generation of one must
    never be served for the other (it was, when the cache was keyed by the adapter alone)."""
    from fedsafe.eval.runner import generate_cached
    from fedsafe.runtime import get_runtime

    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny")
    rt = get_runtime(cfg.model, cfg.lora)
    fresh, prompts = rt.init_vec(0), ["hello there", "how do I bake bread"]
    g = torch.Generator().manual_seed(2)
    starts = [torch.randn(rt.handle.numel, generator=g) * 2.0 for _ in range(2)]
    try:
        outs = []
        for start in starts:
            rt.set_base_delta(start)
            cached = generate_cached(rt, fresh, prompts, max_new_tokens=6)
            uncached = generate_cached(rt, fresh, prompts, max_new_tokens=6, use_cache=False)
            assert cached == uncached  # what the cache serves is what this model generates
            outs.append(cached)
        assert outs[0] != outs[1]  # the two starts really are different models
    finally:
        rt.set_base_delta(None)
