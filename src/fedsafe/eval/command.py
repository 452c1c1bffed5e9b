"""``fedsafe eval TARGET``: evaluate a run directory, a peft adapter directory, or a plain model.

TARGET kinds: a run directory (its config gives model, template and LoRA; its ``final_adapter`` is
evaluated), an adapter directory (``adapter_config.json``; base model from it or ``--model``), or a model
name/path (evaluated without an adapter). Benchmarks: an embedded prompt source (``strongreject``,
``harmbench``, ``donotanswer``, ...), ``hf:...`` when online, or a local CSV/TSV/JSON/JSONL/Parquet file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import LoraConfig, ModelConfig
from ..data.records import Record
from ..errors import FedsafeError
from ..io import atomic_write_json
from ..rundir import FINAL_ADAPTER, is_run_dir, load_run_config, require_final_adapter
from ..runtime import get_runtime, use_run_base
from .runner import evaluate_adapter


def _bench_records(bench: str, column: str | None, limit: int | None, harmful: bool = True) -> list[Record]:
    """Records of a ``--bench``/``--benign`` spec: an embedded source, ``hf:...``, or a local file in any format
    :mod:`fedsafe.data.files` reads. Harmful benchmarks are read as prompts; a benign file keeps its responses as
    reference answers (for the reference NLL) when it has them."""
    from ..data.sources import load_source, parse_spec

    spec, opts = parse_spec(bench), {}
    if spec.name == "file":
        if column:
            opts["instruction_col"] = column
        if harmful and "schema" not in spec.options:
            opts["kind"] = "prompt"
    elif column:
        raise FedsafeError(f"--column applies to a local file, not to {bench!r}")
    recs = list(load_source(bench, **opts))
    return recs[:limit] if limit else recs


def resolve_target(target: str, model: str | None, template: str | None):
    """-> (ModelConfig, LoraConfig | None, adapter_dir | None, label)."""
    t = Path(target)
    if is_run_dir(t):
        cfg = load_run_config(t)
        ad = require_final_adapter(t)
        mc = cfg.model
        if template:
            mc.template = template
        return mc, cfg.lora, ad, t.name
    if (t / "adapter_config.json").exists():
        ac = json.loads((t / "adapter_config.json").read_text())
        base = model or ac.get("base_model_name_or_path")
        if not base:
            raise FedsafeError(f"{t}: adapter_config.json names no base model; pass --model")
        tm = ac.get("target_modules") or ["q_proj", "v_proj"]
        tm = sorted(tm) if isinstance(tm, list) else [tm]
        lc = LoraConfig(r=int(ac.get("r", 8)), alpha=int(ac.get("lora_alpha", 16)), dropout=0.0, target_modules=tm)
        return ModelConfig(name=base, template=template or "chat"), lc, t, t.name
    return ModelConfig(name=model or target, template=template or "chat"), None, None, target


def _use_base_of(rt, target: Path) -> None:
    """A run trained with init.merge (or its ``final_adapter/``) is evaluated on its own base: the start adapter
    folded in. Anything else on the base as loaded."""
    for d in (target, target.parent if target.name == FINAL_ADAPTER else None):
        if d is not None and is_run_dir(d):
            use_run_base(rt, load_run_config(d), d)
            return
    rt.set_base_delta(None)


def evaluate_target(target: str, *, bench: str = "strongreject", benign: str | None = None, judge: str = "rule",
                    column: str | None = None, limit: int | None = None, model: str | None = None,
                    template: str | None = None, samples: int = 1, temperature: float = 0.0,
                    max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0, out: str | Path | None = None,
                    progress: bool = True) -> dict:
    mc, lc, adapter, label = resolve_target(target, model, template)
    harmful = _bench_records(bench, column, limit)
    benign_recs = _bench_records(benign, None, limit, harmful=False) if benign else []
    if lc is None:
        lc = LoraConfig(r=1, alpha=1, dropout=0.0)
    rt = get_runtime(mc, lc)
    _use_base_of(rt, Path(target))
    vec = rt.handle.load_adapter_dir(adapter) if adapter is not None else None
    if out is None:
        base = Path(target) if Path(target).is_dir() else Path(".")
        out = base / f"eval-{Path(bench).stem}-{judge}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    res = evaluate_adapter(rt, vec, harmful, benign_recs, judge=judge, max_new_tokens=max_new_tokens,
                           temperature=temperature, samples=samples, batch_size=batch_size, seed=seed,
                           progress=progress, out_dir=out)
    res.update(target=str(target), model=mc.name, template=mc.template, bench=bench, benign_bench=benign)
    atomic_write_json(out / "results.json", res)
    res["out_dir"] = str(out)
    return res
