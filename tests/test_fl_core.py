"""Engine building blocks: server optimisers against hand-computed values, masking, schedule, sampling."""

import math

import pytest
import torch

from fedsafe.data.templates import IGNORE, collate, format_prompt, tokenize_pair
from fedsafe.fl.engine import sample_clients
from fedsafe.fl.server_opt import ScaffoldState, ServerOptimizer
from fedsafe.fl.train import batch_plan
from fedsafe.lm import cosine_lr
from fedsafe.models import tiny_tokenizer


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_fedavg_adds_delta():
    opt = ServerOptimizer("fedavg")
    assert torch.allclose(opt.step(t(1.0, 2.0), t(0.5, -1.0)), t(1.5, 1.0))


def test_fedavgm_two_steps():
    opt = ServerOptimizer("fedavgm", eta=1.0, momentum=0.5)
    x = opt.step(t(0.0), t(1.0))  # v = 1 -> x = 1
    assert torch.allclose(x, t(1.0))
    x = opt.step(x, t(1.0))  # v = 0.5*1 + 1 = 1.5 -> x = 2.5
    assert torch.allclose(x, t(2.5))


@pytest.mark.parametrize("alg", ["fedadagrad", "fedyogi", "fedadam"])
def test_adaptive_first_step_by_hand(alg):
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerOptimizer(alg, eta=eta, beta1=b1, beta2=b2, tau=tau)
    d = 2.0
    m = (1 - b1) * d
    v0 = tau**2
    if alg == "fedadagrad":
        v = v0 + d * d
    elif alg == "fedyogi":
        v = v0 - (1 - b2) * d * d * math.copysign(1, v0 - d * d)
    else:
        v = b2 * v0 + (1 - b2) * d * d
    expect = eta * m / (math.sqrt(v) + tau)
    got = opt.step(t(0.0), t(d))
    assert got.item() == pytest.approx(expect, rel=1e-5)


def test_scaffold_control_variates_by_hand():
    s = ScaffoldState(c=t(0.0, 0.0))
    x, y = t(1.0, 1.0), t(0.0, 2.0)
    dc = s.client_update(3, x, y, steps=2, lr=0.5)  # c_i+ = 0 - 0 + (x - y)/(2*0.5) = (1, -1)
    assert torch.allclose(dc, t(1.0, -1.0)) and torch.allclose(s.ci[3], t(1.0, -1.0))
    s.server_update([dc], num_clients=4)  # c += (1/4) * dc
    assert torch.allclose(s.c, t(0.25, -0.25))
    assert torch.allclose(s.correction(3), t(-0.75, 0.75))  # c - c_i


def test_cosine_schedule_matches_paper_formula():
    assert cosine_lr(0, 100, 5e-5, 1e-6) == pytest.approx(5e-5)
    assert cosine_lr(50, 100, 5e-5, 1e-6) == pytest.approx(1e-6 + 0.5 * (5e-5 - 1e-6))
    assert cosine_lr(99, 100, 5e-5, 1e-6) > 1e-6
    assert cosine_lr(7, 100, 5e-5, 1e-6, "constant") == 5e-5


def test_sampling_seeded_and_reproducible():
    a = [sample_clients(0, r, 10, 3, [7, 8, 9], "random") for r in range(20)]
    b = [sample_clients(0, r, 10, 3, [7, 8, 9], "random") for r in range(20)]
    c = [sample_clients(1, r, 10, 3, [7, 8, 9], "random") for r in range(20)]
    assert a == b and a != c
    assert all(len(set(s)) == 3 for s in a)
    strat = [sample_clients(0, r, 10, 3, [7, 8, 9], "stratified") for r in range(20)]
    assert all(sum(c in (7, 8, 9) for c in s) == 1 for s in strat)


@pytest.mark.parametrize("dose", [0, 1, 2, 3])
def test_stratified_dose_sets_malicious_per_round(dose):
    rounds = [sample_clients(0, r, 10, 3, [7, 8, 9], "stratified", dose) for r in range(20)]
    assert all(len(set(s)) == 3 and sum(c in (7, 8, 9) for c in s) == dose for s in rounds)


def test_malicious_per_round_is_validated():
    from fedsafe.config import load_config
    from fedsafe.errors import ConfigError

    base = ["fl.sample_clients=3"]
    with pytest.raises(ConfigError, match="needs fl.sampling: stratified"):
        load_config("demo", base + ["fl.malicious_per_round=1", "fl.sampling=random"])
    with pytest.raises(ConfigError, match="integer in \\[0, 3\\]"):
        load_config("demo", base + ["fl.malicious_per_round=4"])
    assert load_config("demo", base + ["fl.malicious_per_round=3"]).fl.malicious_per_round == 3


def test_batch_plan_wraps_and_is_seeded():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    p1, p2 = batch_plan(5, 3, 4, 1, g1), batch_plan(5, 3, 4, 1, g2)
    assert p1 == p2 and len(p1) == 3 and all(len(b) == 4 for b in p1)
    assert set(i for b in p1 for i in b) <= set(range(5))


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_only_response_tokens_carry_loss(template):
    tok = tiny_tokenizer()
    ex = tokenize_pair(tok, template, "What is two plus two?", "Four.", seq_length=512, max_prompt_length=400)
    n_prompt = len(tok(format_prompt(template, tok, "What is two plus two?"), add_special_tokens=True)["input_ids"])
    assert all(x == IGNORE for x in ex.labels[:n_prompt])
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert tok.decode(ex.input_ids[n_prompt:]).strip().startswith("Four.")
    assert ex.input_ids[-1] == tok.eos_token_id


def test_alpaca_template_is_the_papers():
    tok = tiny_tokenizer()
    p = format_prompt("alpaca", tok, "Say hi")
    assert p == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\nSay hi \n\n### Response:")


def test_truncation_keeps_response_tokens():
    tok = tiny_tokenizer()
    ex = tokenize_pair(tok, "chat", "word " * 200, "answer " * 200, seq_length=40, max_prompt_length=20)
    assert len(ex.input_ids) <= 40
    assert ex.n_loss_tokens >= 20


def test_collate_pads_right_with_ignored_labels():
    tok = tiny_tokenizer()
    a = tokenize_pair(tok, "chat", "a", "b", 32, 16)
    b = tokenize_pair(tok, "chat", "a longer prompt here", "a longer answer", 32, 16)
    batch = collate([a, b], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE).all()
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
