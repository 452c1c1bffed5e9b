"""Safety-recovery examples (Qi et al., ICLR 2025) as an option of the defense data."""

from __future__ import annotations

import json

import pytest

from fedsafe.config import load_config
from fedsafe.data.partition import build_federation
from fedsafe.data.records import Record
from fedsafe.data.safe_responses import safe_response
from fedsafe.data.templates import IGNORE, format_response, tokenize_pair
from fedsafe.defense import data as ddata
from fedsafe.defense.align import reserve
from fedsafe.errors import ConfigError, FedsafeError
from fedsafe.runtime import get_runtime


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("tiny")
    fed = build_federation(cfg.data, seed=cfg.seed)
    reserve(cfg, fed)
    rt = get_runtime(cfg.model, cfg.lora)
    recs, prov = ddata.level1(fed, cfg.data.defense_aligned, cfg.data.defense_normal, 16, 0.5, cfg.seed)
    return cfg, fed, rt, recs, prov


def test_share_zero_keeps_the_defense_data(setup):
    cfg, fed, rt, recs, prov = setup
    assert load_config("tiny").defense.recovery_share == 0.0  # the default keeps current behaviour
    out, p = ddata.with_recovery(recs, prov, fed, 0.0, 16, rt.tokenizer, cfg.seed)
    assert out is recs and p is prov


def test_recovery_examples_open_harmfully_then_refuse(setup):
    cfg, fed, rt, recs, prov = setup
    out, p = ddata.with_recovery(recs, prov, fed, 0.5, 6, rt.tokenizer, cfg.seed)
    assert len(out) == len(recs) and sum(r.kind == "aligned" for r in out) == sum(r.kind == "aligned" for r in recs)
    assert [r for r in out if r.kind == "normal"] == [r for r in recs if r.kind == "normal"]  # normal data untouched
    rec = [r for r in out if r.source.startswith("recovery:")]
    assert len(rec) == 4 == p["recovery"]["examples"]  # half of the 8 aligned examples
    unaligned = {r.id: r for v in fed.heldout.values() for r in v if r.kind == "unaligned"}
    client_ids = {r.id for c in fed.clients for r in c.records}
    for r in rec:
        h = unaligned[r.meta["recovery_of"]]  # from the held-out harmful answers, never a client's record
        assert h.id not in client_ids and r.instruction == h.instruction
        n = r.meta["harmful_prefix_tokens"]
        assert 1 <= n <= 6
        opening = r.response[: r.meta["loss_from"]]
        assert opening == rt.tokenizer.decode(rt.tokenizer(h.response, add_special_tokens=False)["input_ids"][:n])
        assert r.response[r.meta["loss_from"]:].strip() == safe_response(h.instruction, key=h.id)
    again, _ = ddata.with_recovery(recs, prov, fed, 0.5, 6, rt.tokenizer, cfg.seed)
    assert [r.to_dict() for r in again] == [r.to_dict() for r in out]  # seeded
    # stored and read back (defense_data.jsonl, resume) with the loss boundary intact
    assert Record.from_dict(json.loads(json.dumps(rec[0].to_dict()))).meta["loss_from"] == rec[0].meta["loss_from"]


def test_loss_falls_on_the_recovery_only(setup):
    cfg, fed, rt, recs, prov = setup
    out, _ = ddata.with_recovery(recs, prov, fed, 1.0, 8, rt.tokenizer, cfg.seed)
    r = next(r for r in out if r.source.startswith("recovery:"))
    mc = cfg.model
    ex = rt.tokenize([r])[0]
    plain = tokenize_pair(rt.tokenizer, mc.template, r.instruction, r.response, mc.seq_length, mc.max_prompt_length)
    prompt_len = next(i for i, t in enumerate(plain.labels) if t != IGNORE)
    cut = r.meta["loss_from"]
    opening = rt.tokenizer(format_response(mc.template, rt.tokenizer, r.response)[:cut], add_special_tokens=False)["input_ids"]
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
    assert first == prompt_len + len(opening) and ex.input_ids[prompt_len:first] == opening  # opening: context only
    trained = rt.tokenizer.decode([t for t in ex.labels if t != IGNORE])
    assert trained and r.response[cut:].startswith(trained.rstrip(rt.tokenizer.eos_token or "")[:20])
    assert ex.n_loss_tokens < plain.n_loss_tokens
    # loss_from = 0 is the ordinary tokenisation
    assert tokenize_pair(rt.tokenizer, mc.template, r.instruction, r.response, mc.seq_length, mc.max_prompt_length,
                         0) == plain


def test_too_few_harmful_answers_is_a_clear_error(setup):
    cfg, fed, rt, recs, prov = setup
    saved = {k: list(v) for k, v in fed.heldout.items()}
    try:
        for k in fed.heldout:
            fed.heldout[k] = [r for r in fed.heldout[k] if r.kind != "unaligned"]
        with pytest.raises(FedsafeError, match="recovery_share=0.5 needs 4 held-out harmful answers"):
            ddata.with_recovery(recs, prov, fed, 0.5, 6, rt.tokenizer, cfg.seed)
    finally:
        fed.heldout.update(saved)


@pytest.mark.parametrize("bad", ["defense.recovery_share=1.5", "defense.recovery_share=-0.1",
                                 "defense.recovery_max_tokens=0"])
def test_config_bounds(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config("tiny", [bad])


def test_defense_run_trains_on_recovery_examples(tmp_path):
    from fedsafe.defense.finetune import defend_run
    from fedsafe.pipeline import start_run

    run = start_run(load_config("tiny", ["fl.rounds=1", "defense.recovery_share=0.5"]), tmp_path / "run",
                    progress=False, evaluate=False)
    out = defend_run(run, level=1, steps=2, n=8, out=tmp_path / "d", progress=False, evaluate=False)
    meta = json.loads((out / "defense.json").read_text())["data"]
    assert meta["recovery"]["examples"] == 2  # half of 4 aligned
    rows = [json.loads(x) for x in (out / "defense_data.jsonl").read_text().splitlines()]
    assert sum(r["source"].startswith("recovery:") and r["meta"]["loss_from"] > 0 for r in rows) == 2
