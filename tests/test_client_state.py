"""Per-client state on disk (fl/client_state.py): SCAFFOLD's c_i and kept AdamW states survive resumes exactly,
are written only for the clients that trained, and superseded files are deleted when no kept checkpoint needs them."""

import pytest
import torch

from fedsafe.config import load_config
from fedsafe.fl import checkpoint
from fedsafe.fl.client_state import ClientStateStore
from fedsafe.pipeline import build_engine

VARIANTS = {"scaffold": ["fl.fed_alg=scaffold"], "keep_opt": ["fl.reset_optimizer=false"]}


def _cfg(variant, extra=()):
    groups = "data.groups=[{name: a, clients: 6, mix: {tiny: 1.0}}, {name: m, clients: 2, malicious: true, mix: {tiny-unaligned: 1.0}}]"
    return load_config("tiny", [groups, "data.samples_per_client=8", "fl.rounds=5", "fl.sample_clients=3",
                                "monitor.every=0", *VARIANTS[variant], *extra])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_resume_from_every_checkpoint_matches_uninterrupted_run(tmp_path, variant):
    full = build_engine(_cfg(variant), tmp_path / "full", progress=False)
    for r in range(5):
        full.run_round(r)
    store = full.scaffold.ci if variant == "scaffold" else full.client_opt
    assert 3 <= len(store) <= 8  # only clients that trained have a state
    for stop in (1, 3):
        part = build_engine(_cfg(variant), tmp_path / f"part{stop}", progress=False)
        for r in range(stop + 1):
            part.run_round(r)
        again = build_engine(_cfg(variant), tmp_path / f"part{stop}", progress=False)
        assert again.try_resume() == stop + 1
        for r in range(stop + 1, 5):
            again.run_round(r)
        assert torch.equal(again.global_vec, full.global_vec)


def test_checkpoints_hold_an_index_not_the_states(tmp_path):
    eng = build_engine(_cfg("keep_opt", ["fl.keep_checkpoints=2"]), tmp_path, progress=False)
    for r in range(5):
        eng.run_round(r)
    sd = checkpoint.load(checkpoint.ckpt_path(tmp_path, 4))
    assert sd["client_opt"]["client_state"] == "adamw"
    assert all(isinstance(c, int) and isinstance(r, int) for c, r in sd["client_opt"]["rounds"].items())
    files = sorted(p.name for p in (tmp_path / "client_state").iterdir())
    # one file per round at most; files no kept checkpoint (rounds 3, 4) refers to are gone
    needed = {f"adamw_r{r:04d}.safetensors" for r in sd["client_opt"]["rounds"].values()}
    needed |= {f"adamw_r{r:04d}.safetensors" for r in checkpoint.load(checkpoint.ckpt_path(tmp_path, 3))["client_opt"]["rounds"].values()}
    assert set(files) == needed


def test_store_round_trip_and_legacy_dict(tmp_path):
    st = ClientStateStore(tmp_path, "scaffold_ci", "tensor")
    st.round = 2
    st[5] = torch.arange(4.0)
    assert torch.equal(st.get(5), torch.arange(4.0))  # before the flush: from memory
    st.flush()
    assert torch.equal(st.get(5), torch.arange(4.0)) and st.get(6) is None and 5 in st and len(st) == 1
    other = ClientStateStore(tmp_path, "scaffold_ci", "tensor")
    other.load_state_dict(st.state_dict(), 2)
    assert torch.equal(other.get(5), torch.arange(4.0))
    legacy = ClientStateStore(tmp_path / "old", "scaffold_ci", "tensor")
    legacy.load_state_dict({3: torch.ones(2)}, 7)  # an older checkpoint held the tensors themselves
    assert legacy.index == {3: 7} and torch.equal(legacy.get(3), torch.ones(2))
    opt = ClientStateStore(tmp_path, "adamw", "optim")
    p = torch.nn.Parameter(torch.ones(3))
    o = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    o.step()
    opt[1] = o.state_dict()
    opt.flush()
    o2 = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1)
    o2.load_state_dict(opt.get(1))
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], o.state_dict()["state"][0]["exp_avg"])


def test_more_clients_than_records_says_how_many_are_needed(tmp_path):
    import subprocess
    import sys

    groups = "data.groups=[{name: a, clients: 500, mix: {tiny: 1.0}}]"
    p = subprocess.run([sys.executable, "-m", "fedsafe.cli", "run", "tiny", groups, "--run-dir", str(tmp_path / "r"),
                        "--no-eval", "--quiet"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "its 500 clients need at least one each (8000 in all)" in " ".join(p.stderr.split())
