"""Generation from memoised frozen-layer prompt states gives what an ordinary prefill gives."""

from functools import partial

import pytest
import torch

from fedsafe import lm
from fedsafe.config import load_config
from fedsafe.data.sources import load_source
from fedsafe.data.templates import format_prompt
from fedsafe.llm.hf import HFGenerator
from fedsafe.runtime import get_runtime


def _rt(layers: int):
    cfg = load_config("tiny", [f"lora.layers={layers}", "lora.target_modules=[all-linear]"])
    rt = get_runtime(cfg.model, cfg.lora)
    rt.handle.set_flat(rt.init_vec(5) + 0.02)  # a non-zero adapter, so the adapted layers matter
    rt._prompt_cache.clear()
    rt._prompt_cache_bytes = 0
    return rt


def _gen(rt, prompts, *, prefill: bool, **kw):
    g = HFGenerator(rt.model, rt.tokenizer, partial(format_prompt, rt.model_cfg.template, rt.tokenizer),
                    batch_size=3, prefill=rt.prompt_prefill if prefill else None)
    return g.generate(prompts, max_new_tokens=8, **kw)


PROMPTS = [r.instruction for r in load_source("tiny")[:7]] + ["x", "a much longer prompt " * 6]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 3}])
def test_outputs_match_an_ordinary_prefill(sampling):
    rt = _rt(1)
    assert rt.first_adapted_layer == 1
    ref = _gen(rt, PROMPTS, prefill=False, **sampling)
    assert _gen(rt, PROMPTS, prefill=True, **sampling) == ref
    assert len(rt._prompt_cache) == len(PROMPTS)
    # the memo is the base's, not the adapter's: another adapter reuses it and still matches
    rt.handle.set_flat(rt.init_vec(9) - 0.03)
    ref2 = _gen(rt, PROMPTS, prefill=False, **sampling)
    assert ref2 != ref
    assert _gen(rt, PROMPTS, prefill=True, **sampling) == ref2


def test_each_prompt_is_computed_once(monkeypatch):
    rt = _rt(1)
    seen = []
    real = lm.prompt_lower_states

    def counted(model, prompts, *a, **kw):
        seen.extend(prompts)
        return real(model, prompts, *a, **kw)

    monkeypatch.setattr("fedsafe.runtime.prompt_lower_states", counted)
    _gen(rt, PROMPTS, prefill=True)
    _gen(rt, PROMPTS[:4], prefill=True)
    assert len(seen) == len(PROMPTS)


def test_logits_match_the_full_forward():
    rt = _rt(1)
    tok = [rt.tokenizer(p)["input_ids"] for p in PROMPTS[:3]]
    W = max(len(t) for t in tok)
    ids = torch.full((3, W), rt.pad_id)
    attn = torch.zeros((3, W), dtype=torch.long)
    for r, t in enumerate(tok):
        ids[r, W - len(t):] = torch.tensor(t)
        attn[r, W - len(t):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = rt.model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1]
        kw = rt.prompt_prefill(tok, ids, attn)
        cache = next(iter(kw.values()))
        assert cache.get_seq_length() == W - 1  # all but the last column
        last = rt.model(input_ids=ids[:, -1:], attention_mask=attn, position_ids=pos[:, -1:], use_cache=True,
                        **kw).logits[:, -1]
    assert torch.allclose(full, last, atol=1e-5)


def test_every_layer_adapted_or_memo_full_means_an_ordinary_prefill():
    rt = _rt(0)  # lora.layers=0: every layer adapted, nothing frozen to cache
    assert rt.first_adapted_layer == 0
    assert rt.prompt_prefill([[1, 2, 3]], torch.tensor([[1, 2, 3]]), torch.ones((1, 3), dtype=torch.long)) is None
    rt = _rt(1)
    rt.prompt_cache_mb = 0
    ref = _gen(rt, PROMPTS[:3], prefill=False)
    assert _gen(rt, PROMPTS[:3], prefill=True) == ref  # the first batch fills the memo past its budget
    assert rt.prompt_prefill([[1, 2, 3, 4]], torch.tensor([[1, 2, 3, 4]]), torch.ones((1, 4), dtype=torch.long)) is None



def test_reference_nll_from_memoised_prefix_matches_the_full_forward(monkeypatch):
    from fedsafe.eval.runner import reference_nll
    from fedsafe.runtime import Runtime

    recs = load_source("tiny")[:6]
    rt = _rt(1)
    vec = rt.handle.get_flat().clone()
    cached = reference_nll(rt, vec, recs, batch_size=4)
    assert len(rt._prefix_cache) >= len(recs)
    monkeypatch.setattr(Runtime, "first_adapted_layer", property(lambda self: 0))  # no memo: the full forward
    assert abs(cached - reference_nll(rt, vec, recs, batch_size=4)) < 1e-5
    assert abs(cached - reference_nll(rt, None, recs, batch_size=4)) > 1e-4  # and the adapter matters
