"""The in-process engine on the tiny preset: run directory, resume equality, hostile updates, FL algorithms."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedsafe.config import load_config
from fedsafe.errors import ConfigError
from fedsafe.pipeline import build_engine, resume_run, start_run

FAST = ["fl.rounds=3", "eval.max_new_tokens=4"]


def final_vec(run_dir):
    sd = load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))
    return torch.cat([sd[k].flatten() for k in sorted(sd)])


def test_tiny_run_writes_run_directory(tmp_path):
    cfg = load_config("tiny", FAST)
    d = start_run(cfg, tmp_path / "run", progress=False)
    for f in ("config.yaml", "clients.json", "data_manifest.json", "metrics.jsonl", "forensics.jsonl", "results.json",
              "final_adapter/adapter_model.safetensors", "final_adapter/adapter_config.json", "eval/harmful.jsonl"):
        assert (d / f).exists(), f
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(len(r["sampled"]) == 3 and r["train_loss"] > 0 for r in rows)
    clients = json.loads((d / "clients.json").read_text())
    assert clients["malicious_ids"] == [3]
    res = json.loads((d / "results.json").read_text())
    assert res["refusal"]["n"] == 8 and 0 <= res["refusal"]["rate"] <= 1


def test_final_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel

    from fedsafe.models import load_base

    d = start_run(load_config("tiny", FAST), tmp_path / "run", progress=False, evaluate=False)
    base, _ = load_base("tiny")
    pm = PeftModel.from_pretrained(base, str(d / "final_adapter"))
    got = {n: p for n, p in pm.named_parameters() if "lora_" in n}
    assert got and all(torch.isfinite(p).all() for p in got.values())


def test_new_run_never_overwrites(tmp_path):
    cfg = load_config("tiny", FAST)
    d = start_run(cfg, tmp_path / "run", progress=False, evaluate=False)
    from fedsafe.errors import FedsafeError

    with pytest.raises(FedsafeError, match="already exists"):
        start_run(cfg, d, progress=False, evaluate=False)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = load_config("tiny", ["fl.rounds=4"])
    full = start_run(cfg, tmp_path / "full", progress=False, evaluate=False)
    part = tmp_path / "part"
    eng = build_engine(cfg, part, progress=False)
    from fedsafe.rundir import write_run_header

    write_run_header(cfg, part, eng.fed)
    eng.run_round(0)
    eng.run_round(1)  # "killed" after round 2 of 4
    resume_run(part, progress=False, evaluate=False)
    assert torch.equal(final_vec(full), final_vec(part))
    rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]


@pytest.mark.parametrize("alg", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold"])
def test_fl_algorithms_run_and_change_the_adapter(tmp_path, alg):
    extra = ["fl.server_lr=0.01"] if alg in ("fedadam", "fedyogi", "fedadagrad") else []
    cfg = load_config("tiny", ["fl.rounds=2", f"fl.fed_alg={alg}"] + extra)
    eng = build_engine(cfg, tmp_path, progress=False)
    v0 = eng.global_vec.clone()
    eng.run_round(0)
    eng.run_round(1)
    assert torch.isfinite(eng.global_vec).all() and not torch.equal(v0, eng.global_vec)
    if alg == "scaffold":
        assert eng.scaffold.c.abs().sum() > 0 and eng.scaffold.ci


def test_fedavg_round_is_weighted_mean_of_client_updates(tmp_path):
    cfg = load_config("tiny", ["fl.rounds=1"])
    eng = build_engine(cfg, tmp_path, progress=False)
    g0 = eng.global_vec.clone()
    from fedsafe.fl.engine import sample_clients
    from fedsafe.lm import cosine_lr

    ids = sample_clients(cfg.seed, 0, eng.K, cfg.fl.sample_clients, eng.malicious, cfg.fl.sampling)
    lr = cosine_lr(0, 1, cfg.fl.lr, cfg.fl.lr_min)
    vecs = []
    for c in ids:
        sd, _ = eng.client_update(c, 0, lr)
        vecs.append(eng.rt.handle.flat_from_state_dict(sd))
        eng.global_vec = g0.clone()
    w = torch.tensor([eng.sizes[c] for c in ids], dtype=torch.float32)
    expect = g0 + ((torch.stack(vecs) - g0) * (w / w.sum())[:, None]).sum(0)
    eng.run_round(0)
    assert torch.allclose(eng.global_vec, expect, atol=1e-6)


@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "missing", "extra", "dtype", "norm"])
def test_hostile_update_is_rejected_and_round_continues(tmp_path, kind):
    def hook(cid, rnd, sd):
        if cid != 3:  # the malicious client sends garbage
            return sd
        k = next(iter(sd))
        sd = dict(sd)
        if kind == "nan":
            sd[k] = sd[k].clone().fill_(float("nan"))
        elif kind == "inf":
            sd[k] = sd[k].clone().fill_(float("inf"))
        elif kind == "shape":
            sd[k] = torch.zeros(3, 3)
        elif kind == "missing":
            del sd[k]
        elif kind == "extra":
            sd["evil.weight"] = torch.zeros(2)
        elif kind == "dtype":
            sd[k] = sd[k].to(torch.int64)
        elif kind == "norm":
            sd[k] = sd[k] * 1e9 + 1e9
        return sd

    cfg = load_config("tiny", ["fl.rounds=3", "fl.sampling=stratified", "fl.sample_clients=3"])
    eng = build_engine(cfg, tmp_path, progress=False, update_hook=hook)
    row = eng.run_round(0)
    assert "3" in row["rejected"]
    assert row["train_loss"] is not None and "3" not in row["client_weights"]
    assert torch.isfinite(eng.global_vec).all()


def test_round_skipped_when_too_few_valid_updates(tmp_path):
    cfg = load_config("tiny", ["fl.rounds=2", "fl.min_clients=3", "fl.sampling=stratified", "fl.sample_clients=3"])
    eng = build_engine(cfg, tmp_path, progress=False, update_hook=lambda c, r, sd: {} if c == 3 else sd)
    g0 = eng.global_vec.clone()
    row = eng.run_round(0)
    assert "skipped" in row and torch.equal(g0, eng.global_vec)


@pytest.mark.parametrize("override,msg", [
    (["fl.sample_clients=50"], "exceeds the number of clients"),
    (["fl.local_steps=0"], "must be positive"),
    (["fl.aggregatr=krum"], "did you mean 'aggregator'"),
    (["fl.fed_alg=fedsgd"], "choose one of"),
    (["fl.rounds=abc"], "expected an integer"),
    (["lora.r=-1"], "must be positive"),
])
def test_config_errors_are_clear(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config("tiny", override)


def test_openfedllm_aliases():
    cfg = load_config("tiny", ["num_rounds=7", "sample_clients=1", "max_steps=3", "peft_lora_r=2"])
    assert (cfg.fl.rounds, cfg.fl.sample_clients, cfg.fl.local_steps, cfg.lora.r) == (7, 1, 3, 2)


def test_cli_user_error_has_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", "run", "tiny", "fl.rounds=zero"], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2
    assert "expected an integer" in p.stderr and "Traceback" not in p.stderr


def test_cli_run_tiny_prints_run_dir(tmp_path):
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", "run", "tiny", "fl.rounds=1", "--quiet", "--no-eval"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    d = tmp_path / p.stdout.strip().splitlines()[-1]
    assert (d / "final_adapter" / "adapter_model.safetensors").exists()
