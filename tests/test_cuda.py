"""The CUDA paths on a GPU: bf16 autocast, batched clients, the prefix cache and resume (``pytest -m cuda``).

They skip without CUDA; ``benchmarks/gpu_check.py`` runs them first whenever a GPU machine is available.
"""

import pytest
import torch

from fedsafe.config import load_config
from fedsafe.pipeline import build_engine

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _engine(tmp_path, name, extra):
    cfg = load_config("tiny", ["model.device=cuda", "fl.rounds=2", "lora.dropout=0.0", *extra])
    return build_engine(cfg, tmp_path / name, progress=False)


def test_bf16_autocast_round_trains_on_the_gpu(tmp_path):
    eng = _engine(tmp_path, "bf16", ["model.autocast=bf16"])
    assert eng.rt.device.type == "cuda" and next(eng.rt.model.parameters()).is_cuda
    start = eng.global_vec.clone()
    row = eng.run_round(0)
    assert row["train_loss"] is not None and torch.isfinite(torch.tensor(row["train_loss"]))
    assert not torch.equal(eng.global_vec, start) and eng.global_vec.device.type == "cpu"


@pytest.mark.parametrize("extra", [[], ["lora.layers=1"]], ids=["full_forward", "prefix_cache"])
def test_batched_clients_match_one_by_one_on_the_gpu(tmp_path, extra):
    vecs = []
    for g in (1, 3):
        eng = _engine(tmp_path, f"g{g}{len(extra)}", [f"fl.batch_clients={g}", *extra])
        eng.run_round(0)
        eng.run_round(1)
        vecs.append(eng.global_vec)
    torch.testing.assert_close(vecs[0], vecs[1], atol=1e-4, rtol=1e-3)


def test_prefix_cache_matches_full_forward_on_the_gpu(tmp_path):
    vecs = []
    for flag in ("true", "false"):
        eng = _engine(tmp_path, flag, ["lora.layers=1", f"fl.prefix_cache={flag}"])
        eng.run_round(0)
        eng.run_round(1)
        vecs.append(eng.global_vec)
    torch.testing.assert_close(vecs[0], vecs[1], atol=1e-4, rtol=1e-3)
