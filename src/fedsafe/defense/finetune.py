"""Server-side safety fine-tuning of the global adapter (paper §5) and ``fedsafe defend``.

``defend_run(SOURCE_RUN, level=..)`` loads the source run's final adapter (any aggregator, any engine:
it only needs ``config.yaml`` and ``final_adapter/``), builds the defense data, and continues training
the LoRA for ``steps`` steps at ``batch_size`` with a cosine learning rate from ``lr`` to ``lr_min``
across the steps (the paper used 50 "rounds" of 10 steps with a cosine over rounds and an optimiser reset
every 10 steps; ``restart_every=10`` reproduces that). Checkpoints every ``checkpoint_every`` steps
(adapter + optimiser state, atomic, checksummed) make it resumable; each checkpoint can be evaluated
for the steps sweep (paper Fig. 6). The result is a new run directory linked to its source.
"""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from ..config import RunConfig, dump_yaml
from ..data.contamination import assert_no_contamination
from ..data.partition import Federation, build_federation
from ..data.records import Record
from ..data.templates import format_prompt
from ..errors import FedsafeError
from ..eval.runner import evaluate_adapter, evaluate_run
from ..fl import checkpoint
from ..fl.engine import Engine, derive_seed
from ..fl.train import train_local
from ..io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, write_jsonl
from ..llm.hf import HFGenerator
from ..llm.synth import make_generator
from ..lm import cosine_lr
from ..rundir import START_ADAPTER, load_run_config, require_final_adapter
from ..runtime import Runtime, get_runtime, use_run_base
from . import data as ddata
from .data import reserve


def finetune(rt: Runtime, start_vec: torch.Tensor, records, *, steps: int, batch_size: int, lr: float, lr_min: float,
             checkpoint_every: int, out_dir: Path, seed: int, autocast: str = "none", restart_every: int = 0,
             progress: bool = True, on_checkpoint=None, label: str = "defense fine-tune") -> torch.Tensor:
    """Continue training ``start_vec`` on ``records``; resumes from ``out_dir/checkpoints`` if present."""
    out_dir = Path(out_dir)
    examples = rt.tokenize(records)
    if not examples:
        raise FedsafeError("no defense examples to train on")
    vec, opt_state, done = start_vec.clone(), None, 0
    found = checkpoint.latest_complete(out_dir)
    if found is not None:
        sd = checkpoint.load(found[1])
        vec, opt_state, done = sd["global"], sd.get("opt"), int(sd["round"])
        rows = [r for r in read_jsonl(out_dir / "metrics.jsonl", tolerate_torn_tail=True) if r["step"] <= done] \
            if (out_dir / "metrics.jsonl").exists() else []
        write_jsonl(out_dir / "metrics.jsonl", rows)
    chunk = max(1, min(checkpoint_every, restart_every or checkpoint_every))
    first = rt.first_adapted_layer
    prefix_fn = (lambda idx: rt.prefix([records[i] for i in idx], [examples[i] for i in idx])) if first else None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), disable=not progress) as prog:
        task = prog.add_task("defense", total=steps, completed=done, info="")
        while done < steps:
            k = min(chunk, steps - done)
            gen = torch.Generator().manual_seed(derive_seed(seed, done, 99))
            torch.manual_seed(derive_seed(seed, done, 98))
            rt.handle.set_flat(vec)
            base = done
            if restart_every and done % restart_every == 0:
                opt_state = None
            res, opt_state = train_local(
                rt.handle, examples, steps=k, batch_size=batch_size, grad_accum=1, lr=lr, pad_id=rt.pad_id,
                device=rt.device, gen=gen, autocast=autocast, optimizer_state=opt_state,
                lr_fn=lambda s, b=base: cosine_lr(b + s, steps, lr, lr_min), prefix_fn=prefix_fn, first_layer=first,
            )
            vec = rt.handle.get_flat()
            done += k
            append_jsonl(out_dir / "metrics.jsonl", {"step": done, "loss": res.loss,
                                                     "lr": cosine_lr(done - 1, steps, lr, lr_min)})
            if done % checkpoint_every == 0 or done == steps:
                checkpoint.save(out_dir, done, {"round": done, "global": vec.clone(), "opt": opt_state})
                if on_checkpoint is not None:
                    on_checkpoint(done, vec)
            prog.update(task, completed=done, info=f"loss {res.loss:.3f}")
    return vec


def defend_run(source: str | Path, *, level: int | None = None, steps: int | None = None, n: int | None = None,
               out: str | Path | None = None, generator: str | None = None, sweep: bool = False,
               progress: bool = True, evaluate: bool = True, cfg_overrides: dict | None = None) -> Path:
    """Run the post-hoc defense on a finished run; returns the new run directory."""
    source = Path(source)
    adapter_dir = require_final_adapter(source)
    cfg = load_run_config(source)
    d = cfg.defense
    repl = dict(enabled=True, level=level or d.level, steps=steps or d.steps, n=n or d.n,
                generator=generator if generator is not None else d.generator)
    repl.update(cfg_overrides or {})
    d = dataclasses.replace(d, **repl)
    if d.level not in (1, 2, 3):
        raise FedsafeError(f"--level must be 1, 2 or 3, got {d.level}")
    if d.steps <= 0 or d.n <= 0:
        raise FedsafeError("--steps and -n must be positive")
    cfg = dataclasses.replace(cfg, defense=d, name=f"{cfg.name}+defense-L{d.level}").validate()
    fed = build_federation(cfg.data, seed=cfg.seed)
    reserve(cfg, fed)  # alignment records are never reused as defense data
    rt = get_runtime(cfg.model, cfg.lora)
    use_run_base(rt, cfg, source)  # init.merge: the final adapter sits on the run's merged start
    start = rt.handle.load_adapter_dir(adapter_dir)
    if out is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = source.parent / f"{source.name}-defense-L{d.level}-{stamp}"
    out = Path(out)
    resuming = (out / "defense.json").exists()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.init.merged:  # the defended adapter sits on the same merged start: the run dir must say which
        rt.handle.save_adapter(out / START_ADAPTER, rt.handle.load_adapter_dir(source / START_ADAPTER))
    if resuming:
        records = [Record.from_dict(r) for r in read_jsonl(out / "defense_data.jsonl")]
        prov = json.loads((out / "defense.json").read_text())["data"]
    else:
        records, prov = build_defense_records(cfg, fed, rt, start, progress=progress)
        if not cfg.data.allow_contamination:
            # defense data never goes through build_federation's check, so check it here
            assert_no_contamination(fed.eval_harmful + fed.eval_benign, {"defense": records}, what="defense data")
        write_jsonl(out / "defense_data.jsonl", [r.to_dict() for r in records])
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        atomic_write_json(out / "defense.json", {"source_run": str(source.resolve()), "level": d.level,
                                                 "steps": d.steps, "n": len(records), "data": prov})
    sweep_rows = []

    def on_ckpt(step, vec):
        if sweep and evaluate and step < d.steps:
            e = cfg.eval
            r = evaluate_adapter(rt, vec, fed.eval_harmful[: e.harmful_n or None], fed.eval_benign[: e.benign_n or None],
                                 judge=e.judge, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=cfg.seed)
            sweep_rows.append({"step": step, **_brief(r)})
            append_jsonl(out / "steps_sweep.jsonl", sweep_rows[-1])

    vec = finetune(rt, start, records, steps=d.steps, batch_size=d.batch_size, lr=d.lr, lr_min=d.lr_min,
                   checkpoint_every=d.checkpoint_every, out_dir=out, seed=cfg.seed, autocast=cfg.model.autocast,
                   progress=progress, on_checkpoint=on_ckpt)
    rt.handle.save_adapter(out / "final_adapter", vec)
    if evaluate:
        res = evaluate_run(out, cfg=cfg, fed=fed, rt=rt, progress=progress, vec=vec)
        if sweep:
            append_jsonl(out / "steps_sweep.jsonl", {"step": d.steps, **_brief(res)})
    return out


def _brief(r: dict) -> dict:
    return {"refusal": r.get("refusal", {}).get("rate"), "false_refusal": r.get("false_refusal", {}).get("rate"),
            "ref_nll": r.get("ref_nll")}


def build_defense_records(cfg: RunConfig, fed: Federation, rt: Runtime, global_vec: torch.Tensor,
                          progress: bool = True) -> tuple[list[Record], dict]:
    """The level's defense data, with ``defense.recovery_share`` of its aligned examples made safety-recovery
    examples (:func:`fedsafe.defense.data.with_recovery`)."""
    recs, prov = _level_records(cfg, fed, rt, global_vec, progress)
    d = cfg.defense
    return ddata.with_recovery(recs, prov, fed, d.recovery_share, d.recovery_max_tokens, rt.tokenizer, cfg.seed)


def _level_records(cfg: RunConfig, fed: Federation, rt: Runtime, global_vec: torch.Tensor,
                   progress: bool) -> tuple[list[Record], dict]:
    d = cfg.defense
    if d.level == 1:
        return ddata.level1(fed, cfg.data.defense_aligned, cfg.data.defense_normal, d.n, d.aligned_ratio, cfg.seed)
    if d.level == 2 and d.aligned_data:
        return ddata.from_files(fed, d.aligned_data, d.normal_data, d.n, d.aligned_ratio, cfg.seed,
                                max_instruction_chars=cfg.data.max_instruction_chars,
                                max_response_chars=cfg.data.max_response_chars)
    exclude = {r.instruction.lower() for r in fed.eval_harmful + fed.eval_benign}
    harmful = ddata.heldout_prompts(fed, cfg.data.defense_aligned, cfg.seed) if d.harmful_prompts == "heldout" else None
    if d.level == 2:
        spec = d.generator or "smollm2-135m-instruct"
        gen = make_generator(spec, progress=progress)
        recs, prov = ddata.generated(gen, d.n_generated or d.n, d.aligned_ratio, seed=cfg.seed,
                                     filter_refusals=d.filter_refusals, max_new_tokens=d.gen_max_new_tokens,
                                     source=f"L2:{spec}", exclude=exclude, harmful_instructions=harmful,
                                     cache_key=None if spec.startswith("endpoint:") else {"gen": spec, "level": 2})
        prov.update(level=2, generator=spec, harmful_prompts=d.harmful_prompts)
        return recs, prov
    # Level 3: the aggregated global model generates its own defense data (self-alignment)
    rt.handle.set_flat(global_vec)
    gen = HFGenerator(rt.model, rt.tokenizer, partial(format_prompt, cfg.model.template, rt.tokenizer),
                      batch_size=cfg.eval.batch_size, progress=progress)
    recs, prov = ddata.generated(gen, d.n_generated or d.n, d.aligned_ratio, seed=cfg.seed,
                                 filter_refusals=d.filter_refusals, max_new_tokens=d.gen_max_new_tokens,
                                 source="L3:self", exclude=exclude, harmful_instructions=harmful)
    prov.update(level=3, generator="the aggregated global model (self-alignment)", harmful_prompts=d.harmful_prompts)
    return recs, prov


def inline_defense_hook(cfg: RunConfig, fed: Federation, rt: Runtime) -> Callable[[Engine, int], dict | None]:
    """In-training variant (beyond the paper): every ``defense.every_rounds`` rounds the server fine-tunes
    the fresh aggregate for ``defense.inline_steps`` steps on Level-1 defense data, instead of (or before)
    the post-hoc defense. Its cost per application is ``inline_steps`` server steps."""
    d = cfg.defense
    records, prov = ddata.level1(fed, cfg.data.defense_aligned, cfg.data.defense_normal, d.n, d.aligned_ratio, cfg.seed)
    records, _ = ddata.with_recovery(records, prov, fed, d.recovery_share, d.recovery_max_tokens, rt.tokenizer, cfg.seed)
    examples = rt.tokenize(records)
    first = rt.first_adapted_layer
    prefix_fn = (lambda idx: rt.prefix([records[i] for i in idx], [examples[i] for i in idx])) if first else None

    def hook(eng: Engine, rnd: int) -> dict | None:
        if (rnd + 1) % d.every_rounds:
            return None
        t0 = time.time()
        rt.handle.set_flat(eng.global_vec)
        seed = derive_seed(cfg.seed, rnd, 777)
        torch.manual_seed(seed)
        res, _ = train_local(rt.handle, examples, steps=d.inline_steps, batch_size=d.batch_size, grad_accum=1,
                             lr=d.lr, pad_id=rt.pad_id, device=rt.device, gen=torch.Generator().manual_seed(seed),
                             autocast=cfg.model.autocast, prefix_fn=prefix_fn, first_layer=first)
        eng.global_vec = rt.handle.get_flat()
        return {"inline_defense_loss": res.loss, "inline_defense_seconds": round(time.time() - t0, 3)}

    return hook
