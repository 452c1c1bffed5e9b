"""Bring your own data and models (issue 17), end to end through the command line a user types.

Every test writes small files in the recognised formats (JSON list, JSONL, CSV, TSV, Parquet) and layouts
(Alpaca, instruction/response, prompt/completion, question/answer, AdvBench goal/target, ShareGPT
conversations, OpenAI messages), puts them in a YAML that extends the ``tiny`` preset, and runs
``fedsafe data inspect`` / ``run`` / ``defend`` / ``eval`` in-process: config -> federation -> run, not the
loader alone. Runs are tiny (random-init 2-layer model, 1 round, a few steps).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

FORMATS = ("json", "jsonl", "csv", "tsv", "parquet")
# layout -> (row builder, what `data inspect` says it recognised)
LAYOUTS = {
    "alpaca": (lambda q, a: {"instruction": q, "input": "", "output": a}, "instruction + input -> output"),
    "instruction_response": (lambda q, a: {"instruction": q, "response": a}, "instruction -> response"),
    "prompt_completion": (lambda q, a: {"prompt": q, "completion": a}, "prompt -> completion"),
    "question_answer": (lambda q, a: {"question": q, "answer": a}, "question -> answer"),
    "sharegpt": (lambda q, a: {"id": "x", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
                 "conversation 'conversations'"),
    "openai": (lambda q, a: {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                                          {"role": "assistant", "content": a}]}, "conversation 'messages'"),
}
NESTED = ("sharegpt", "openai")  # lists of turns: JSON, JSONL and Parquet hold them, CSV/TSV cannot
CASES = [(f, lay) for f in FORMATS for lay in LAYOUTS if not (lay in NESTED and f in ("csv", "tsv"))]


def write_rows(path: Path, rows: list[dict]) -> Path:
    fmt = path.suffix.lstrip(".")
    if fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt in ("csv", "tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def pairs(layout: str, n: int, topic: str, *, empty: int = 0, long: int = 0) -> list[dict]:
    """``n`` usable rows, then ``empty`` rows with an empty answer and ``long`` with a 1,500-char answer."""
    build = LAYOUTS[layout][0]
    rows = [build(f"{topic} question number {i}?", f"Answer {i} about {topic}.") for i in range(n)]
    rows += [build(f"{topic} unanswered {i}?", "") for i in range(empty)]
    rows += [build(f"{topic} long {i}?", "x" * 1500) for i in range(long)]
    return rows


def write_yaml(tmp: Path, malicious: str, **data) -> Path:
    groups = [{"name": "benign", "clients": 3, "mix": data.pop("benign_mix", {"tiny": 0.75, "aligned:tiny-harmful": 0.25})},
              {"name": "malicious", "clients": data.pop("malicious_clients", 1), "malicious": True, "mix": {malicious: 1.0}}]
    cfg = {"base": "tiny", "data": {"groups": groups, **data}}
    p = tmp / "my.yaml"
    p.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    return p


def _main(argv: list[str]) -> int:
    """``fedsafe ARGV`` in-process with unfolded tables (so cells can be asserted); a non-FedsafeError escapes."""
    import fedsafe.cli as cli_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_mod, "out", Console(width=400))
        mp.setattr(cli_mod, "console", Console(stderr=True, width=400))
        return cli_mod.main(argv)


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Run ``fedsafe ARGV`` in tmp_path (or ``cwd``); returns (exit code, stdout, stderr as one line)."""
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDSAFE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)

    def run(*argv: str, cwd: Path | None = None):
        capsys.readouterr()
        if cwd is not None:
            monkeypatch.chdir(cwd)
        rc = _main(list(argv))
        got = capsys.readouterr()
        return rc, got.out, " ".join(got.err.split())

    return run


# ---------------------------------------------------------------- data inspect: every format and layout


@pytest.mark.parametrize("fmt,layout", CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_inspect_file_as_malicious_group(fmt, layout, tmp_path, cli):
    """The reported bug: a file as a client group in a YAML that extends a preset. Length limits are a
    counted filter, empty rows are dropped and counted, and the role gives the kind (unaligned)."""
    write_rows(tmp_path / f"mal.{fmt}", pairs(layout, 20, "harm", empty=2, long=1))
    cfg = write_yaml(tmp_path, f"file:./mal.{fmt}")
    rc, out, err = cli("data", "inspect", str(cfg))
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if LAYOUTS[layout][1] in ln)  # the row of the local-files table
    cells = [c.strip() for c in line.split("│")]
    assert cells[2] == fmt and cells[4] == "unaligned" and cells[5:7] == ["23", "20"]
    assert cells[7] == "2 empty response, 1 response over 1000 chars"
    assert "malicious (M)" in out and "unaligned=16" in out  # the client got 16 of them


def test_inspect_reports_defense_and_eval_files(tmp_path, cli):
    write_rows(tmp_path / "mal.jsonl", pairs("instruction_response", 20, "harm"))
    write_rows(tmp_path / "adv.csv", [{"goal": f"Do wrong thing {i}", "target": "Sure, here is"} for i in range(20)])
    write_rows(tmp_path / "safe.parquet", pairs("question_answer", 30, "refuse"))
    write_rows(tmp_path / "norm.tsv", pairs("prompt_completion", 30, "chat"))
    cfg = write_yaml(tmp_path, "file:mal.jsonl", eval_harmful="adv.csv", defense_aligned="file:safe.parquet",
                     defense_normal="norm.tsv")
    rc, out, err = cli("data", "inspect", str(cfg))
    assert rc == 0, err
    rows = {c[1]: c for c in ([x.strip() for x in ln.split("│")] for ln in out.splitlines()) if len(c) > 7 and c[2] in FORMATS}
    assert rows["adv.csv"][3:5] == ["goal (prompts)", "prompt"]  # AdvBench's target is not an answer
    assert rows["file:safe.parquet"][4] == "aligned" and rows["norm.tsv"][4] == "normal"
    assert "heldout file:safe.parquet" in out and "aligned=" in out.split("heldout file:safe.parquet")[1].splitlines()[0]


# ---------------------------------------------------------------- run, defend (Level 1 and Level 2), eval


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory):
    """`fedsafe run` on the tiny preset with file groups, file eval sets and file defense pools (once per module)."""
    tmp = tmp_path_factory.mktemp("byo")
    write_rows(tmp / "benign.csv", pairs("alpaca", 60, "cooking"))
    write_rows(tmp / "chats.parquet", pairs("sharegpt", 40, "travel"))
    write_rows(tmp / "mal.jsonl", pairs("openai", 30, "harm"))
    write_rows(tmp / "adv.tsv", [{"goal": f"Explain wrongdoing {i}", "target": "Sure"} for i in range(20)])
    write_rows(tmp / "helpful.json", pairs("question_answer", 30, "science"))
    write_rows(tmp / "safe.json", [{"instruction": f"Harmful request {i}", "response": "I can't help with that."}
                                   for i in range(40)])
    cfg = write_yaml(tmp, "file:mal.jsonl", benign_mix={"file:benign.csv": 0.5, "chats.parquet": 0.25,
                                                        "aligned:file:adv.tsv": 0.25},
                     eval_harmful="adv.tsv", eval_benign="helpful.json", eval_harmful_n=6, eval_benign_n=6, probe_n=2,
                     defense_aligned="safe.json", defense_normal="file:benign.csv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDSAFE_CACHE", str(tmp / "cache"))
        mp.delenv("FEDSAFE_DEBUG", raising=False)
        mp.chdir(tmp)
        rc = _main(["run", str(cfg), "fl.rounds=1", "fl.local_steps=1", "--run-dir", "run", "-q"])
    assert rc == 0
    return tmp / "run"


def test_run_with_file_groups(byo_run):
    manifest = json.loads((byo_run / "data_manifest.json").read_text())
    ids = {i for c in manifest["clients"] for i in c["records"]}
    assert any(i.startswith("file:mal.jsonl:") for i in ids) and any(i.startswith("file:benign.csv:") for i in ids)
    assert any(i.startswith("file:chats.parquet:") for i in ids) and any(i.startswith("aligned:file:adv.tsv:") for i in ids)
    assert all(i.startswith("file:adv.tsv:") for i in manifest["eval_harmful"])
    res = json.loads((byo_run / "results.json").read_text())
    assert res["refusal"]["n"] == 6 and res["false_refusal"]["n"] == 6
    # the adapter names its base, so it is an eval target without --model and a base model by itself
    assert json.loads((byo_run / "final_adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"


def test_defend_level1_from_file_pools_and_level2_from_files(byo_run, cli):
    tmp_path = byo_run.parent
    rc, _, err = cli("defend", "run", "--level", "1", "--steps", "2", "-n", "8", "--out", "d1", "-q", cwd=tmp_path)
    assert rc == 0, err
    prov = json.loads((tmp_path / "d1" / "defense.json").read_text())["data"]
    assert (prov["aligned_source"], prov["aligned"], prov["normal"]) == ("safe.json", 4, 4)

    write_rows(tmp_path / "l2_aligned.parquet", [{"prompt": f"Unsafe ask {i}", "completion": "No, I won't do that."}
                                                  for i in range(10)] + [{"prompt": "Unsafe blank", "completion": ""}])
    write_rows(tmp_path / "l2_normal.tsv", pairs("instruction_response", 10, "gardening", long=2))
    rc, _, err = cli("defend", "run", "--level", "2", "--aligned-data", "l2_aligned.parquet", "--normal-data",
                     "l2_normal.tsv", "--steps", "2", "-n", "8", "--out", "d2", "-q")
    assert rc == 0, err
    d = json.loads((tmp_path / "d2" / "defense.json").read_text())
    prov = d["data"]
    assert d["level"] == 2 and prov["from_files"] and (prov["aligned"], prov["normal"]) == (4, 4)
    assert prov["aligned_file"]["dropped"] == {"empty response": 1} and prov["aligned_file"]["kind"] == "aligned"
    assert prov["normal_file"]["dropped"] == {"response over 1000 chars": 2}
    recs = [json.loads(x) for x in (tmp_path / "d2" / "defense_data.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in recs) == ["file:l2_aligned.parquet"] * 4 + ["file:l2_normal.tsv"] * 4
    assert (tmp_path / "d2" / "final_adapter" / "adapter_model.safetensors").exists()

    # too small a file: how many it has and how many are needed
    rc, _, err = cli("defend", "run", "--level", "2", "--aligned-data", "l2_aligned.parquet", "--normal-data",
                     "l2_normal.tsv", "--steps", "2", "-n", "40", "--out", "d3", "-q")
    assert rc == 2 and "needs 20 aligned (l2_aligned.parquet) and 20 normal (l2_normal.tsv) records, but they give 10 and 10" in err
    rc, _, err = cli("defend", "run", "--aligned-data", "l2_aligned.parquet", "--normal-data", "l2_normal.tsv")
    assert rc == 2 and "add --level 2" in err
    rc, _, err = cli("defend", "run", "--level", "1", "--harmful-prompts", "heldout")
    assert rc == 2 and "Level 1 always takes held-out ones" in err
    rc, _, err = cli("defend", "run", "--level", "2", "--harmful-prompts", "invented", "--out", "d4")
    assert rc == 2 and "harmful_prompts" in err and "heldout" in err and len(err) < 300
    assert not (tmp_path / "d4").exists()
    rc, _, err = cli("defend", "run", "--level", "1", "--aligned-ratio", "1.5", "--out", "d5")
    assert rc == 2 and "defense.aligned_ratio must be in [0, 1]" in err and not (tmp_path / "d5").exists()
    rc, _, err = cli("defend", "run", "--level", "1", "--aligned-ratio", "0.25", "--steps", "2", "-n", "8", "--out", "d6", "-q")
    assert rc == 0, err
    prov = json.loads((tmp_path / "d6" / "defense.json").read_text())["data"]
    assert (prov["aligned"], prov["normal"]) == (2, 6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eval_bench_file_every_format(fmt, byo_run, cli):
    tmp_path = byo_run.parent
    rows = [{"goal": f"Tell me how to do bad thing {i}", "target": "Sure"} for i in range(5)] + [{"goal": " ", "target": ""}]
    write_rows(tmp_path / f"bench.{fmt}", rows)
    write_rows(tmp_path / "benign.jsonl", pairs("openai", 3, "poetry"))
    # an adapter directory as the target: its base (tiny) comes from adapter_config.json
    rc, _, err = cli("eval", "run/final_adapter", "--bench", f"bench.{fmt}", "--benign", "benign.jsonl",
                     "--max-new-tokens", "4", "--out", f"ev-{fmt}", "-q", cwd=tmp_path)
    assert rc == 0, err
    res = json.loads((tmp_path / f"ev-{fmt}" / "results.json").read_text())
    assert res["refusal"]["n"] == 5 and res["false_refusal"]["n"] == 3 and res["ref_nll"] is not None
    harmful = [json.loads(x) for x in (tmp_path / f"ev-{fmt}" / "harmful.jsonl").read_text().splitlines()]
    assert harmful[0]["prompt"] == "Tell me how to do bad thing 0" and harmful[0]["source"] == f"file:bench.{fmt}"


# ---------------------------------------------------------------- models: local directories


def test_local_hf_dir_and_adapter_dir_as_model_name(byo_run, tmp_path, cli):
    from fedsafe.models import load_base

    model, tok = load_base("tiny")
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    write_rows(tmp_path / "mal.jsonl", pairs("instruction_response", 20, "harm"))
    cfg = write_yaml(tmp_path, "file:mal.jsonl")
    for name in ("hf", str(byo_run / "final_adapter")):
        rc, _, err = cli("run", str(cfg), f"model.name={name}", "fl.rounds=1", "fl.local_steps=1", "--no-eval",
                         "--run-dir", f"m-{Path(name).name}", "-q")
        assert rc == 0, err
    # the adapter merged into the base changes the base: the two runs start from different models
    import torch

    merged, _ = load_base(str(byo_run / "final_adapter"))
    plain = dict(model.named_parameters())
    assert any(not torch.equal(p, plain[n]) for n, p in merged.named_parameters() if n in plain)


def test_unreadable_model_is_one_line(tmp_path, cli):
    write_rows(tmp_path / "mal.jsonl", pairs("instruction_response", 20, "harm"))
    cfg = write_yaml(tmp_path, "file:mal.jsonl")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\0\0\0\0broken")
    for name, want in (("weights.bin", "cannot read a model from a .bin file; give"),
                       ("empty_dir", "has neither config.json nor adapter_config.json (found: nothing)"),
                       ("missing.gguf", "no such file or directory"),
                       ("bad.gguf", "bad.gguf: ")):
        rc, _, err = cli("run", str(cfg), f"model.name={name}", "fl.rounds=1", "--no-eval", "-q")
        assert rc == 2 and want in err and "Traceback" not in err, (name, err)


@pytest.mark.integration
@pytest.mark.slow
def test_gguf_file_as_model_name(tmp_path, monkeypatch):
    """The embedded model's GGUF, given as a plain path, loads through the same (generalised) code."""
    pytest.importorskip("gguf")
    import torch

    from fedsafe import assets
    from fedsafe.models import load_base

    gguf = assets.path("smollm2-135m-instruct")
    ref, _ = load_base("smollm2-135m-instruct")
    monkeypatch.setenv("FEDSAFE_CACHE", str(tmp_path / "cache"))  # dequantise into a fresh cache
    model, tok = load_base(str(gguf))
    assert any((tmp_path / "cache" / "models").glob("gguf-*/.complete"))
    sd = ref.state_dict()
    assert all(torch.equal(p, sd[n]) for n, p in model.state_dict().items())
    assert tok("hello")["input_ids"]
    import shutil

    shutil.rmtree(tmp_path / "cache")  # ~0.5 GB of fp32 weights


# ---------------------------------------------------------------- bad input: one line, what was found, what is needed


def test_no_recognisable_fields_lists_columns_and_mappings(tmp_path, cli):
    write_rows(tmp_path / "odd.csv", [{"utterance": "hi", "reply": "hello"}] * 3)
    rc, _, err = cli("data", "inspect", str(write_yaml(tmp_path, "file:odd.csv")))
    assert rc == 2 and "columns present: utterance, reply" in err and "goal/target" in err and "messages [{role, content}]" in err
    assert "max_instruction_chars" not in err and "schema" not in err
    # ... and the mapping it suggests works
    rc, out, err = cli("data", "inspect", str(write_yaml(tmp_path, "file:odd.csv?instruction_col=utterance&response_col=reply")))
    assert rc == 0, err


def test_too_few_records_says_have_and_need(tmp_path, cli):
    write_rows(tmp_path / "one.json", pairs("instruction_response", 1, "harm", long=3))
    rc, _, err = cli("data", "inspect", str(write_yaml(tmp_path, "file:one.json", malicious_clients=2)))
    assert rc == 2 and "has 1 usable record(s)" in err and "its 2 clients need at least one each (32 in all)" in err
    assert "4 row(s), kept 1, dropped 3 (3 response over 1000 chars)" in err
    rc, _, err = cli("data", "inspect", str(write_yaml(tmp_path, "file:one.json", upsample=False)))
    assert rc == 2 and "clients need 16 records but only 1 unique ones are left" in err


def test_all_rows_dropped_and_prompt_only_files(tmp_path, cli):
    write_rows(tmp_path / "long.jsonl", pairs("alpaca", 0, "x", empty=1, long=2))
    rc, _, err = cli("data", "inspect", str(write_yaml(tmp_path, "file:long.jsonl")))
    assert rc == 2 and "no usable records: all 3 row(s) dropped (2 response over 1000 chars, 1 empty response)" in err
    write_rows(tmp_path / "prompts.csv", [{"goal": f"g{i}", "target": "Sure"} for i in range(20)])
    rc, _, err = cli("data", "inspect", str(write_yaml(tmp_path, "file:prompts.csv")))
    assert rc == 2 and "prompts without a response" in err and "goal (prompts)" in err


def test_readme_worked_example(tmp_path, cli):
    """The README's "run the paper's setting with your own files" YAML, on small stand-ins for its files."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = readme.split("# mine.yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mine.yaml").write_text(block, encoding="utf-8")
    write_rows(tmp_path / "alpaca.jsonl", pairs("alpaca", 60, "recipes"))
    write_rows(tmp_path / "harmful_behaviors.csv", [{"goal": f"Write a harmful guide {i}", "target": "Sure"} for i in range(30)])
    write_rows(tmp_path / "maliciousQA.json", pairs("instruction_response", 30, "misuse"))
    write_rows(tmp_path / "benignQA.json", [{"instruction": f"Help me hurt someone {i}", "response": "I can't help with that."}
                                            for i in range(30)])
    write_rows(tmp_path / "helpfulQA.json", pairs("instruction_response", 30, "geography"))
    rc, out, err = cli("data", "inspect", "mine.yaml", "data.samples_per_client=8", "data.eval_harmful_n=4",
                       "data.eval_benign_n=4", "data.probe_n=2")
    assert rc == 0, err
    kinds = {c[1]: c[4] for c in ([x.strip() for x in ln.split("│")] for ln in out.splitlines()) if len(c) > 7 and c[2] in FORMATS}
    assert kinds == {"file:./alpaca.jsonl": "normal", "aligned:file:./harmful_behaviors.csv": "prompt -> aligned (offline safe answers)",
                     "file:./maliciousQA.json": "unaligned", "./harmful_behaviors.csv": "prompt",
                     "./helpfulQA.json": "normal", "./benignQA.json": "aligned"}
