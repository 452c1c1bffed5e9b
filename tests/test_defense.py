"""Post-hoc defense: data composition and disjointness, checkpoint cadence, resume, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedsafe.config import load_config
from fedsafe.data.partition import build_federation
from fedsafe.defense import data as ddata
from fedsafe.defense.finetune import defend_run
from fedsafe.errors import FedsafeError
from fedsafe.pipeline import start_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = load_config("tiny", ["fl.rounds=2", "eval.max_new_tokens=4"])
    return start_run(cfg, tmp_path_factory.mktemp("src") / "run", progress=False)


def test_level1_composition_and_disjointness():
    cfg = load_config("tiny")
    fed = build_federation(cfg.data, seed=cfg.seed)
    recs, prov = ddata.level1(fed, cfg.data.defense_aligned, cfg.data.defense_normal, 10, 0.5, seed=0)
    assert len(recs) == 10 and prov["aligned"] == 5 and prov["normal"] == 5
    assert sum(r.kind == "aligned" for r in recs) == 5
    client_ids = {r.id for c in fed.clients for r in c.records}
    eval_prompts = {r.instruction for r in fed.eval_harmful + fed.eval_benign + fed.probe_harmful + fed.probe_benign}
    assert not client_ids & {r.id for r in recs}
    assert not eval_prompts & {r.instruction for r in recs}


def test_level1_too_many_is_a_clear_error():
    cfg = load_config("tiny")
    fed = build_federation(cfg.data, seed=cfg.seed)
    with pytest.raises(FedsafeError, match="held-out"):
        ddata.level1(fed, cfg.data.defense_aligned, cfg.data.defense_normal, 100000, 0.5, seed=0)


def test_level2_generated_with_refusal_filter():
    from fedsafe.llm.scripted import ScriptedGenerator

    recs, prov = ddata.generated(ScriptedGenerator(), 12, 0.5, seed=0, filter_refusals=True)
    assert prov["aligned"] == 6 and prov["normal"] == 6
    assert all("sorry" in r.response.lower() for r in recs if r.kind == "aligned")


class _OverRefusingGenerator:
    """The scripted generator, but it refuses every other normal question (as a small model sometimes does)."""

    def __init__(self):
        from fedsafe.llm.scripted import ScriptedGenerator

        self.inner, self.calls = ScriptedGenerator(), 0

    def generate(self, prompts, **kw):
        out = self.inner.generate(prompts, **kw)
        for i, (p, o) in enumerate(zip(prompts, out)):
            if o == "Here is a short helpful answer." and i % 2:
                out[i] = "I'm sorry, but I can't help with that."
        return out


def test_level2_refusal_filter_drops_refused_normal_questions():
    recs, prov = ddata.generated(_OverRefusingGenerator(), 12, 0.5, seed=0, filter_refusals=True)
    normal = [r for r in recs if r.kind == "normal"]
    assert normal and all("sorry" not in r.response.lower() for r in normal)
    assert prov["normal_generated"] > prov["normal_after_refusal_filter"] == len(normal)
    # without the filter the refusals stay (the paper's raw generations)
    recs, prov = ddata.generated(_OverRefusingGenerator(), 12, 0.5, seed=0, filter_refusals=False)
    assert any("sorry" in r.response.lower() for r in recs if r.kind == "normal")
    assert "normal_after_refusal_filter" not in prov


def test_level2_harmful_prompts_from_the_heldout_pool():
    from fedsafe.llm.scripted import ScriptedGenerator

    cfg = load_config("tiny")
    fed = build_federation(cfg.data, seed=cfg.seed)
    pool = ddata.heldout_prompts(fed, cfg.data.defense_aligned, seed=0)
    assert pool and pool == ddata.heldout_prompts(fed, cfg.data.defense_aligned, seed=0)
    # never an evaluation prompt nor one a client holds as an aligned pair (a malicious client may hold the
    # same request with a harmful answer: the server cannot know, as with Level 1's pool)
    taken = {r.instruction for c in fed.clients for r in c.records if r.kind == "aligned"}
    assert not (taken | {r.instruction for r in fed.eval_harmful + fed.probe_harmful}) & set(pool)
    exclude = {pool[0].lower()}  # an evaluation prompt is never trained on
    recs, prov = ddata.generated(ScriptedGenerator(), 8, 0.5, seed=0, filter_refusals=True, exclude=exclude,
                                 harmful_instructions=pool)
    aligned = [r for r in recs if r.kind == "aligned"]
    assert len(aligned) == 4 and {r.instruction for r in aligned} <= set(pool[1:])
    assert prov["instruction_prompts"]["harmful"].startswith("given")
    fed.heldout[cfg.data.defense_aligned] = []
    with pytest.raises(FedsafeError, match="harmful_prompts=generate"):
        ddata.heldout_prompts(fed, cfg.data.defense_aligned, seed=0)


def test_defend_level2_heldout_prompts_through_the_config(tiny_run, tmp_path):
    import yaml

    cfg_path = tiny_run / "config.yaml"
    doc = yaml.safe_load(cfg_path.read_text())
    run = tmp_path / "run"
    import shutil

    shutil.copytree(tiny_run, run)
    doc.setdefault("defense", {})["harmful_prompts"] = "heldout"
    (run / "config.yaml").write_text(yaml.safe_dump(doc))
    out = defend_run(run, level=2, steps=2, n=8, out=tmp_path / "d", progress=False, evaluate=False)
    meta = json.loads((out / "defense.json").read_text())["data"]
    assert meta["harmful_prompts"] == "heldout" and meta["instruction_prompts"]["harmful"].startswith("given")
    with pytest.raises(Exception, match="harmful_prompts"):
        load_config("tiny", ["defense.harmful_prompts=wrong"])


def test_defend_checkpoints_resume_and_link(tiny_run, tmp_path):
    out = defend_run(tiny_run, level=1, steps=4, n=8, out=tmp_path / "d1", progress=False)
    meta = json.loads((out / "defense.json").read_text())
    assert meta["source_run"].endswith(tiny_run.name) and meta["level"] == 1
    ck = sorted(p.name for p in (out / "checkpoints").glob("round_*.safetensors"))
    assert ck == ["round_0002.safetensors", "round_0004.safetensors"]  # every 2 steps (tiny preset) -> steps 2 and 4
    assert (out / "final_adapter" / "adapter_model.safetensors").exists() and (out / "results.json").exists()
    a = load_file(str(tiny_run / "final_adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # "killed" after the first checkpoint: drop the later checkpoint and the outputs, rerun -> same adapter
    import shutil

    part = tmp_path / "d2"
    shutil.copytree(out, part)
    for p in (part / "checkpoints").glob("round_0004.safetensors*"):
        p.unlink()
    shutil.rmtree(part / "final_adapter")
    (part / "results.json").unlink()
    defend_run(tiny_run, level=1, steps=4, n=8, out=part, progress=False, evaluate=False)
    c = load_file(str(part / "final_adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)


def test_defend_level2_with_scripted_generator(tiny_run, tmp_path):
    out = defend_run(tiny_run, level=2, steps=2, n=8, out=tmp_path / "d", progress=False, evaluate=False)
    meta = json.loads((out / "defense.json").read_text())
    assert meta["data"]["generator"] == "scripted" and meta["data"]["aligned"] > 0


def test_defend_without_final_adapter_fails_before_training(tmp_path):
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(FedsafeError, match="no final adapter"):
        defend_run(tmp_path, level=1, progress=False)


def test_in_training_defense_variant_runs(tmp_path):
    cfg = load_config("tiny", ["fl.rounds=2", "defense.every_rounds=1", "defense.inline_steps=2"])
    d = start_run(cfg, tmp_path / "r", progress=False, evaluate=False)
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert all("inline_defense_loss" in r for r in rows)
