"""Integration: the real embedded SmolLM2-135M-Instruct, offline from the asset cache."""

import json

import pytest

pytestmark = pytest.mark.integration


def test_embedded_model_loads_and_answers():
    from fedsafe.llm.hf import HFGenerator
    from fedsafe.models import load_base

    model, tok = load_base("smollm2-135m-instruct")
    assert model.config.num_hidden_layers == 30
    out = HFGenerator(model, tok, None).generate(["What is the capital of France?"], max_new_tokens=12)
    assert "Paris" in out[0]


def test_demo_preset_trains_one_round_offline(tmp_path):
    from fedsafe.config import load_config
    from fedsafe.pipeline import start_run

    cfg = load_config("demo", ["fl.rounds=1", "fl.local_steps=1", "fl.batch_size=2", "data.samples_per_client=8",
                               "init.adapter=", "monitor.every=0", "data.eval_harmful_n=4", "data.eval_benign_n=4",
                               "data.probe_n=2", "eval.max_new_tokens=8", "model.seq_length=64",
                               "model.max_prompt_length=32"])
    d = start_run(cfg, tmp_path / "run", progress=False)
    row = json.loads((d / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train_loss"] > 0 and len(row["sampled"]) == 3
    assert (d / "final_adapter" / "adapter_model.safetensors").exists()
    res = json.loads((d / "results.json").read_text())
    assert res["refusal"]["n"] == 4
