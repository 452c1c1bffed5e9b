"""Frozen-prefix caching gives the same loss, gradients and final adapter as the full forward."""

import torch

from fedsafe.config import load_config
from fedsafe.data.templates import collate
from fedsafe.pipeline import build_engine
from fedsafe.lm import collate_prefix, prefix_hidden, response_loss
from fedsafe.runtime import get_runtime


def test_loss_and_gradients_match_full_forward():
    cfg = load_config("tiny", ["lora.layers=1", "lora.target_modules=[all-linear]"])
    rt = get_runtime(cfg.model, cfg.lora)
    assert rt.first_adapted_layer == 1
    from fedsafe.data.sources import load_source

    recs = load_source("tiny")[:6]
    ex = rt.tokenize(recs)
    rt.handle.set_flat(rt.init_vec(3) + 0.01)  # non-zero B so the adapter matters
    full = collate(ex, rt.pad_id, rt.device)
    cached = collate_prefix(ex, prefix_hidden(rt.model, ex, 1, rt.device, batch_size=4), 1, rt.device)
    grads = []
    for b in (full, cached):
        for p in rt.handle.params:
            p.grad = None
        loss, n = response_loss(rt.model, b)
        loss.backward()
        grads.append((float(loss.detach()), torch.cat([p.grad.flatten() for p in rt.handle.params])))
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_engine_same_adapter_with_and_without_cache(tmp_path):
    vecs = []
    for flag in ("true", "false"):
        cfg = load_config("tiny", ["lora.layers=1", "fl.rounds=2", f"fl.prefix_cache={flag}"])
        eng = build_engine(cfg, tmp_path / flag, progress=False)
        assert eng.use_prefix == (flag == "true")
        eng.run_round(0)
        eng.run_round(1)
        vecs.append(eng.global_vec.clone())
    assert torch.allclose(vecs[0], vecs[1], atol=1e-5)
