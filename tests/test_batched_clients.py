"""Batched clients (fl.batch_clients > 1) give the same losses and adapters as training clients one by one."""

import pytest
import torch

from fedsafe.config import ConfigError, load_config
from fedsafe.data.sources import load_source
from fedsafe.fl.batched import train_clients_batched
from fedsafe.pipeline import build_engine
from fedsafe.fl.train import train_local
from fedsafe.runtime import get_runtime

TOL = dict(atol=2e-5, rtol=1e-4)


def _clients(rt, sizes=(7, 5, 9)):
    recs = load_source("tiny")
    out, i = [], 0
    for n in sizes:
        out.append(rt.tokenize(recs[i : i + n]))
        i += n
    return out


@pytest.mark.parametrize("case", ["plain", "accum_clip", "prox_scaffold", "prefix"])
def test_matches_sequential_training(case):
    layers = 1 if case == "prefix" else 0
    cfg = load_config("tiny", [f"lora.layers={layers}", "lora.dropout=0.0"])
    rt = get_runtime(cfg.model, cfg.lora)
    clients = _clients(rt)
    start = rt.init_vec(1) + 0.01  # non-zero B so the adapter matters from the first step
    kw = dict(steps=3, batch_size=2, grad_accum=1, lr=1e-2, pad_id=rt.pad_id, device=rt.device, weight_decay=0.01)
    corr = prox = None
    if case == "accum_clip":
        kw.update(grad_accum=2, max_grad_norm=0.05)
    if case == "prox_scaffold":
        prox = 0.5
        corr = [torch.randn(start.shape, generator=torch.Generator().manual_seed(i)) * 1e-2 for i in range(3)]
    prefix_fns = None
    if case == "prefix":
        first = rt.first_adapted_layer
        assert first == 1
        recs = load_source("tiny")
        offsets = [0, 7, 12]

        def pfn(i):
            return lambda idx: rt.prefix([recs[offsets[i] + j] for j in idx], [clients[i][j] for j in idx])

        prefix_fns = [pfn(i) for i in range(3)]

    seq = []
    for i, ex in enumerate(clients):
        rt.handle.set_flat(start)
        res, _ = train_local(rt.handle, ex, gen=torch.Generator().manual_seed(100 + i), prox_mu=prox or 0.0,
                             prox_center=start if prox else None, grad_correction=corr[i] if corr else None,
                             prefix_fn=prefix_fns[i] if prefix_fns else None, first_layer=rt.first_adapted_layer, **kw)
        seq.append((res, rt.handle.get_flat()))
    rt.handle.set_flat(start)
    live = [p.detach().clone() for p in rt.handle.params]
    bat = train_clients_batched(rt.handle, clients, start, gens=[torch.Generator().manual_seed(100 + i) for i in range(3)],
                                prox_mu=prox or 0.0, grad_corrections=corr, prefix_fns=prefix_fns,
                                first_layer=rt.first_adapted_layer, **kw)
    for (rs, vs), (rb, vb) in zip(seq, bat):
        assert rs.tokens == rb.tokens
        assert rs.loss == pytest.approx(rb.loss, rel=1e-5)
        assert not torch.equal(vs, start)  # training moved the adapter
        torch.testing.assert_close(vb, vs, **TOL)
    # the live adapter is untouched and peft's own forward is back
    assert all(torch.equal(p, q) for p, q in zip(live, rt.handle.params))
    assert all("forward" not in m.__dict__ for m in rt.model.modules())


def test_engine_rounds_match_one_by_one(tmp_path):
    vecs, losses = [], []
    for g in (1, 2, 3):
        cfg = load_config("tiny", ["fl.rounds=2", f"fl.batch_clients={g}", "lora.dropout=0.0",
                                   "attack.behaviour=gaussian"])
        eng = build_engine(cfg, tmp_path / str(g), progress=False)
        rows = [eng.run_round(0), eng.run_round(1)]
        vecs.append(eng.global_vec.clone())
        losses.append([r["client_loss"] for r in rows])
    for v, lo in zip(vecs[1:], losses[1:]):
        torch.testing.assert_close(v, vecs[0], **TOL)
        for a, b in zip(lo, losses[0]):
            assert a.keys() == b.keys()
            assert all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)


def test_config_checks():
    with pytest.raises(ConfigError, match="batch_clients"):
        load_config("tiny", ["fl.batch_clients=0"])
    with pytest.raises(ConfigError, match="reset_optimizer"):
        load_config("tiny", ["fl.batch_clients=3", "fl.reset_optimizer=false"])
