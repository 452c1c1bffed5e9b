"""Up-front frozen-prefix states (fl.prefix_precompute) train exactly as the lazy per-record cache does."""

import torch

from fedsafe import runtime
from fedsafe.config import load_config
from fedsafe.pipeline import build_engine


def _rounds(tmp_path, mode: str, monkeypatch, extra=()) -> tuple:
    cfg = load_config("tiny", ["lora.layers=1", "fl.rounds=2", f"fl.prefix_precompute={mode}", *extra])
    eng = build_engine(cfg, tmp_path / mode, progress=False)
    eng.rt._prefix_cache.clear()  # the runtime is shared by the process: start both paths from nothing
    calls = []
    real = runtime.prefix_hidden

    def counted(model, examples, *a, **kw):
        calls.append(len(examples))
        return real(model, examples, *a, **kw)

    monkeypatch.setattr(runtime, "prefix_hidden", counted)
    info = eng.precompute_prefix()
    up_front = list(calls)
    rows = [eng.run_round(r) for r in range(2)]
    monkeypatch.setattr(runtime, "prefix_hidden", real)
    return eng, info, up_front, calls[len(up_front) :], rows


def test_precomputed_states_give_the_lazy_losses_and_adapter(tmp_path, monkeypatch):
    on, info, up_front, during_on, rows_on = _rounds(tmp_path, "always", monkeypatch)
    off, info_off, _, during_off, rows_off = _rounds(tmp_path, "never", monkeypatch)
    n_records = sum(len(c.records) for c in on.fed.clients)
    assert info["done"] and info["records"] == n_records and info["mb"] > 0
    assert sum(up_front) == len({r.id for c in on.fed.clients for r in c.records})  # every distinct record, once
    assert during_on == []  # rounds run only the top layers
    assert not info_off["done"] and sum(during_off) > 0  # the lazy path computes while training
    for a, b in zip(rows_on, rows_off):
        assert a["sampled"] == b["sampled"]
        for cid, loss in a["client_loss"].items():
            assert abs(loss - b["client_loss"][cid]) < 1e-6
    assert torch.allclose(on.global_vec, off.global_vec, atol=1e-6)


def test_auto_precomputes_only_when_the_run_meets_most_records(tmp_path):
    # tiny: 4 clients x 16 records; 3 rounds x 3 clients x 2 steps x batch 4 = 72 draws >= 64 records
    cfg = load_config("tiny", ["lora.layers=1"])
    assert build_engine(cfg, tmp_path / "a", progress=False).prefix_plan.do
    short = load_config("tiny", ["lora.layers=1", "fl.rounds=1"])  # 24 draws < 64 records: stay lazy, silently
    plan = build_engine(short, tmp_path / "b", progress=False).prefix_plan
    assert not plan.do and not plan.over_budget and "draws 24 records of 64" in plan.reason
    assert build_engine(load_config("tiny"), tmp_path / "c", progress=False).prefix_plan is None  # no cache: no plan


def test_over_budget_says_so_in_one_line_and_stays_lazy(tmp_path, capsys):
    cfg = load_config(
        "tiny", ["lora.layers=1", "fl.rounds=1", "fl.prefix_precompute=always", "fl.prefix_precompute_mb=0"]
    )
    eng = build_engine(cfg, tmp_path, progress=False)
    row = eng.run_round(0)
    err = [line for line in capsys.readouterr().err.splitlines() if "prefix" in line]
    assert len(err) == 1 and "fl.prefix_precompute_mb=0" in err[0] and "lazily" in err[0]
    assert not eng.prefix_precomputed["done"] and row["train_loss"] is not None
