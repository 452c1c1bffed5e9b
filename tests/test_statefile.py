"""No code execution from run files: checkpoints are safetensors + JSON (fedsafe.statefile), never pickle.

A planted pickle payload (one that creates a file when unpickled) as a checkpoint of a shared run
directory, with a matching sha256 sidecar, must be refused by ``fedsafe run --resume``, ``fedsafe
defend`` and ``fedsafe report`` with one clear line and exit 2, and the file must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedsafe import statefile
from fedsafe.config import dump_yaml, load_config
from fedsafe.errors import DataError, FedsafeError
from fedsafe.fl import checkpoint
from fedsafe.pipeline import build_engine, resume_run, start_run
from fedsafe.rundir import write_run_header
from fedsafe.io import sha256_bytes


class _Payload:
    """Unpickling this runs ``open(path, "w")``: it creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_bomb(marker) -> bytes:
    """What an attacker would plant: a real ``torch.save`` file whose unpickling creates ``marker``."""
    buf = io.BytesIO()
    torch.save({"round": 9, "global": torch.zeros(3), "x": _Payload(marker)}, buf)
    return buf.getvalue()


def plant(run_dir, name, data: bytes) -> None:
    d = run_dir / "checkpoints"
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    (d / (name + ".sha256")).write_text(sha256_bytes(data) + "\n")  # the sidecar matches: it proves nothing


def test_roundtrip_is_exact_for_every_kind_of_state():
    p = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.pow(2).sum().backward()
    opt.step()
    state = {
        "round": 4, "global": torch.randn(11), "opt": opt.state_dict(),
        "ci": {0: torch.randn(3), 7: torch.zeros(0)},  # int keys (SCAFFOLD, FoolsGold history)
        "rng": torch.get_rng_state(), "f64": torch.tensor(1 / 3, dtype=torch.float64),
        "mask": torch.tensor([True, False]), "half": torch.randn(4).to(torch.bfloat16)[::2],  # a strided view
        "nums": (0.1, float("inf"), -0.0, 2**80, None, False), "__dunder": "kept", "nested": [[{"a": 1}]],
    }
    back = statefile.loads(statefile.dumps(state))
    assert set(back) == set(state)
    for k in ("global", "rng", "f64", "mask", "half"):
        assert back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]), k
    assert back["nums"] == state["nums"] and str(back["nums"][2]) == "-0.0"
    assert back["nested"] == [[{"a": 1}]] and back["__dunder"] == "kept"
    assert list(back["ci"]) == [0, 7] and torch.equal(back["ci"][0], state["ci"][0])
    assert back["opt"]["param_groups"] == state["opt"]["param_groups"]  # betas stay a tuple
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    opt2.load_state_dict(back["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg_sq"], state["opt"]["state"][0]["exp_avg_sq"])
    torch.set_rng_state(back["rng"])  # a torch RNG state is a uint8 tensor like any other


def test_non_data_values_are_refused_on_save():
    with pytest.raises(TypeError, match="cannot store"):
        statefile.dumps({"f": lambda: 0})


@pytest.mark.parametrize("data", [b"", b"\x00" * 8, b"junk" * 10, pickle.dumps({"a": 1})])
def test_garbage_is_a_data_error(data):
    with pytest.raises(DataError, match="not a fedsafe state file"):
        statefile.loads(data, "x")


def test_checkpoint_round_trip_and_names(tmp_path):
    p = checkpoint.save(tmp_path, 3, {"round": 3, "global": torch.arange(5.0), "opt": None})
    assert p.name == "round_0003.safetensors" and checkpoint.sidecar(p).name == "round_0003.safetensors.sha256"
    assert checkpoint.latest_complete(tmp_path) == (3, p)
    assert torch.equal(checkpoint.load(p)["global"], torch.arange(5.0))
    assert set(load_file(str(p))) == {"t0"}  # any safetensors reader opens it


def test_planted_payloads_are_refused_in_process(tmp_path):
    marker = tmp_path / "PWNED"
    bomb = pickle_bomb(marker)
    # under the old name: refused without being opened
    old = tmp_path / "old"
    plant(old, "round_0009.pt", bomb)
    with pytest.raises(FedsafeError, match="old-format checkpoint"):
        checkpoint.latest_complete(old)
    with pytest.raises(FedsafeError, match="old-format checkpoint"):
        checkpoint.load(old / "checkpoints" / "round_0009.pt")
    # under the new name, checksum matching: the safetensors reader finds no header
    new = tmp_path / "new"
    plant(new, "round_0009.safetensors", bomb)
    rnd, p = checkpoint.latest_complete(new)
    with pytest.raises(DataError, match="not a fedsafe state file"):
        checkpoint.load(p)
    assert not marker.exists()


def test_resume_with_rich_state_is_bit_identical(tmp_path):
    """Client AdamW states kept across rounds, SCAFFOLD control variates and FoolsGold histories (int
    keys) all go through the checkpoint; a resumed run must still end bit-identical."""
    cfg = load_config("tiny", ["fl.rounds=3", "fl.reset_optimizer=false", "fl.fed_alg=scaffold",
                               "fl.aggregator=foolsgold"])
    full = start_run(cfg, tmp_path / "full", progress=False, evaluate=False)
    part = tmp_path / "part"
    eng = build_engine(cfg, part, progress=False)
    write_run_header(cfg, part, eng.fed)
    eng.run_round(0)
    sd = checkpoint.load(checkpoint.ckpt_path(part, 0))
    assert sd["client_opt"] and sd["scaffold"]["ci"] and sd["agg_state"]["history"]
    assert all(isinstance(k, int) for k in sd["agg_state"]["history"])
    resume_run(part, progress=False, evaluate=False)
    a = load_file(str(full / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "final_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- the CLI


def shared_run_dir(tmp_path, name="shared"):
    """A run directory as a collaborator would send it: config, results, a final adapter file."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.yaml").write_text(dump_yaml(load_config("tiny", ["fl.rounds=2"])))
    (d / "results.json").write_text(json.dumps({"refusal": {"rate": 0.5, "n": 8}}))
    (d / "final_adapter").mkdir()
    (d / "final_adapter" / "adapter_model.safetensors").write_bytes(b"")
    return d


def cli(args, cwd):
    env = dict(os.environ)
    env.pop("FEDSAFE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "fedsafe.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def flat(text: str) -> str:
    """Without whitespace: rich wraps long error lines at the terminal width."""
    return "".join(text.split())


@pytest.mark.parametrize("command", ["resume", "defend", "report", "eval"])
def test_cli_refuses_planted_pickle_checkpoint(tmp_path, command):
    d = shared_run_dir(tmp_path)
    marker = tmp_path / "PWNED"
    plant(d, "round_0009.pt", pickle_bomb(marker))
    args = {"resume": ["run", "--resume", d, "--quiet", "--no-eval"],
            "defend": ["defend", d, "--steps", "2", "--quiet", "--out", tmp_path / "def"],
            "report": ["report", d, "--out", tmp_path / "rep"],
            "eval": ["eval", d, "--limit", "1", "--quiet"]}[command]
    r = cli(args, tmp_path)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    msg = flat(r.stdout + r.stderr)
    assert flat("old-format checkpoint") in msg and "round_0009.pt" in msg and "Traceback" not in msg
    assert not marker.exists()
    assert not (tmp_path / "rep").exists() and not (tmp_path / "def").exists()


def test_cli_resume_refuses_payload_under_the_new_name(tmp_path):
    d = tmp_path / "run"
    start_run(load_config("tiny", ["fl.rounds=2"]), d, progress=False, evaluate=False)
    marker = tmp_path / "PWNED"
    plant(d, "round_0009.safetensors", pickle_bomb(marker))
    r = cli(["run", "--resume", d, "--quiet", "--no-eval"], tmp_path)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    msg = flat(r.stdout + r.stderr)
    assert "round_0009.safetensors" in msg and flat("not a fedsafe state file") in msg and "Traceback" not in msg
    assert not marker.exists()
