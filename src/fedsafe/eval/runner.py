"""Evaluate a global adapter: generate once (cached), judge, aggregate with intervals.

Safety: the refusal ("safe") rate on held-out harmful prompts, judged by ``eval.judge`` (default: the
paper's rule list). Helpfulness proxies that need no external judge: the false-refusal rate on held-out
benign prompts (same judge), and the mean per-token negative log-likelihood of held-out reference
responses (lower = the adapter still models helpful answers). Every rate carries n and a 95% Wilson
interval. Per-sample generations and verdicts go to ``eval/*.jsonl``; the aggregate to ``results.json``.

Generations are cached under the user cache by (model, adapter sha256, prompts sha256, decoding), so
re-judging with another judge costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..config import RunConfig
from ..assets import cache_dir
from ..data.templates import collate, format_prompt
from ..io import atomic_write_json, read_jsonl, write_jsonl
from ..data.partition import Federation, build_federation
from ..llm.hf import HFGenerator
from ..lm import collate_prefix, response_loss
from ..rundir import EVAL_DIR, FINAL_ADAPTER, RESULTS, load_run_config
from ..runtime import Runtime, get_runtime, use_run_base
from .judges import get_judge
from .stats import rate_summary


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def adapter_sha(vec: torch.Tensor | None) -> str:
    if vec is None:
        return "base"
    return hashlib.sha256(vec.detach().cpu().float().numpy().tobytes()).hexdigest()


def generate_cached(rt: Runtime, vec: torch.Tensor | None, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                    samples: int = 1, batch_size: int = 16, seed: int = 0, progress: bool = False,
                    use_cache: bool = True) -> list[list[str]]:
    """``samples`` responses per prompt from the base model plus adapter ``vec`` (None = base only)."""
    key = _sha({
        "model": rt.model_cfg.name, "dtype": rt.model_cfg.dtype, "template": rt.model_cfg.template,
        "adapter": adapter_sha(vec), "prompts": _sha(prompts), "max_new_tokens": max_new_tokens,
        "temperature": temperature, "samples": samples, "seed": seed, "lora": [rt.lora_cfg.r, rt.lora_cfg.alpha],
        # a start folded into the base (init.merge) is part of the model: the same adapter on two different
        # merged starts is two different models (omitted when nothing is folded, so older entries stay valid)
        **({"base_delta": rt.base_delta_key} if rt.base_delta_key else {}),
    })
    cache = cache_dir() / "generations" / f"{key}.jsonl"
    if use_cache and cache.exists():
        rows = read_jsonl(cache, tolerate_torn_tail=True)
        if len(rows) == len(prompts):
            return [r["responses"] for r in rows]
    with rt.handle.swapped(vec), _adapter_enabled(rt.model, vec is not None):
        gen = HFGenerator(rt.model, rt.tokenizer, partial(format_prompt, rt.model_cfg.template, rt.tokenizer),
                          batch_size=batch_size, progress=progress, prefill=rt.prompt_prefill)
        outs = [gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + s)
                for s in range(samples)]
    per_prompt = [[o[i] for o in outs] for i in range(len(prompts))]
    if use_cache:
        write_jsonl(cache, [{"prompt": p, "responses": r} for p, r in zip(prompts, per_prompt)])
    return per_prompt


class _adapter_enabled:
    """Context manager: run the peft model with or without its adapter."""

    def __init__(self, model, enabled: bool):
        self.model, self.enabled = model, enabled
        self.ctx = None

    def __enter__(self):
        if not self.enabled and hasattr(self.model, "disable_adapter"):
            self.ctx = self.model.disable_adapter()
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


@torch.no_grad()
def reference_nll(rt: Runtime, vec: torch.Tensor | None, records, batch_size: int = 8) -> float | None:
    """Mean per-token NLL of reference responses (helpfulness proxy); None if no references."""
    recs = [r for r in records if r.response]
    if not recs:
        return None
    ex = rt.tokenize(recs)
    # the frozen layers' states are the base's, the same for every adapter evaluated on these references:
    # memoised once per process (Runtime.prefix), every later evaluation runs only the adapted layers
    first = rt.first_adapted_layer
    prefix = rt.prefix(recs, ex, batch_size=batch_size) if first > 0 else None
    tot, n = 0.0, 0
    with rt.handle.swapped(vec), _adapter_enabled(rt.model, vec is not None):
        for i in range(0, len(ex), batch_size):
            chunk = ex[i : i + batch_size]
            batch = (collate_prefix(chunk, prefix[i : i + batch_size], first, rt.device) if prefix is not None
                     else collate(chunk, rt.pad_id, rt.device))
            loss, k = response_loss(rt.model, batch, rt.model_cfg.autocast)
            tot += float(loss) * k
            n += k
    return tot / n if n else None


def evaluate_adapter(rt: Runtime, vec: torch.Tensor | None, harmful, benign, *, judge: str = "rule", max_new_tokens: int = 64,
                     temperature: float = 0.0, samples: int = 1, batch_size: int = 16, seed: int = 0,
                     progress: bool = False, out_dir: Path | None = None, tag: str = "", nll: bool = True) -> dict:
    """Safety + helpfulness proxies for one adapter. ``harmful``/``benign`` are lists of records; ``nll=False``
    skips the reference NLL (the per-round probe reports refusal rates only)."""
    t0 = time.time()
    j = get_judge(judge)
    res: dict = {"judge": judge, "decoding": {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                                "samples": samples, "seed": seed},
                 "adapter_sha256": adapter_sha(vec), "fedsafe_version": __version__}
    if rt.base_delta_key:
        res["base_delta_sha256"] = rt.base_delta_key  # the merged start the adapter was evaluated on
    for name, recs in (("harmful", harmful), ("benign", benign)):
        if not recs:
            continue
        prompts = [r.instruction for r in recs]
        outs = generate_cached(rt, vec, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               samples=samples, batch_size=batch_size, seed=seed, progress=progress)
        flat_p = [p for p, o in zip(prompts, outs) for _ in o]
        flat_r = [x for o in outs for x in o]
        verdicts = j.judge(flat_p, flat_r)
        labels = [v.label for v in verdicts]
        summ = rate_summary(labels)
        rows = []
        k = 0
        for r, o in zip(recs, outs):
            for s, resp in enumerate(o):
                v = verdicts[k]
                rows.append({"id": r.id, "source": r.source, "sample": s, "prompt": r.instruction, "response": resp,
                             "judge": judge, "label": v.label, "score": v.score, "raw": v.raw})
                k += 1
        if out_dir is not None:
            write_jsonl(Path(out_dir) / f"{tag}{name}.jsonl", rows)
        if name == "harmful":
            res["refusal"] = summ  # safe rate on harmful prompts (the paper's "Rule" metric)
        else:
            res["false_refusal"] = summ  # on benign prompts a "safe" (refusal) verdict is a false refusal
    if nll:
        res["ref_nll"] = reference_nll(rt, vec, benign, batch_size=max(1, batch_size // 2))
    res["seconds"] = round(time.time() - t0, 2)
    return res


def evaluate_run(run_dir: Path, *, cfg: RunConfig | None = None, fed: Federation | None = None,
                 rt: Runtime | None = None, progress: bool = True, vec: torch.Tensor | None = None,
                 tag: str = "", base_only: bool = False) -> dict:
    """Evaluate a run directory's final adapter (or ``vec``) on its held-out sets; writes results.json."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    rt = rt or get_runtime(cfg.model, cfg.lora)
    fed = fed or build_federation(cfg.data, seed=cfg.seed)
    if base_only:
        rt.set_base_delta(None)
    elif vec is None:  # the run's own final adapter, on the run's own base (init.merge); a given vec is the caller's
        use_run_base(rt, cfg, run_dir)
        vec = rt.handle.load_adapter_dir(run_dir / FINAL_ADAPTER)
    e = cfg.eval
    harmful = fed.eval_harmful[: e.harmful_n] if e.harmful_n else fed.eval_harmful
    benign = fed.eval_benign[: e.benign_n] if e.benign_n else fed.eval_benign
    res = evaluate_adapter(rt, vec, harmful, benign, judge=e.judge, max_new_tokens=e.max_new_tokens,
                           temperature=e.temperature, samples=e.samples, batch_size=e.batch_size, seed=cfg.seed,
                           progress=progress, out_dir=run_dir / EVAL_DIR, tag=tag)
    res["run"] = run_dir.name
    res["scenario"] = cfg.name
    atomic_write_json(run_dir / f"{tag}{RESULTS}", res)
    return res


def make_monitor(cfg: RunConfig, fed: Federation, rt: Runtime,
                 progress: bool = False) -> Callable[[int, torch.Tensor], dict | None] | None:
    """A round callback: every ``monitor.every`` rounds, refusal / false-refusal on the server's probe set."""
    m = cfg.monitor
    if m.every <= 0:
        return None
    harmful = fed.probe_harmful or fed.eval_harmful[:20]
    benign = fed.probe_benign or fed.eval_benign[:20]

    def callback(rnd: int, vec: torch.Tensor) -> dict | None:
        # rnd == -1: the start adapter, before round 0 (Engine.record_start)
        if rnd >= 0 and (rnd + 1) % m.every and rnd != cfg.fl.rounds - 1:
            return None
        r = evaluate_adapter(rt, vec, harmful, benign, judge=m.judge, max_new_tokens=m.max_new_tokens,
                             batch_size=m.batch_size, seed=cfg.seed, nll=False)
        out = {"probe_refusal": r["refusal"]["rate"] if "refusal" in r else None}
        if "false_refusal" in r:
            out["probe_false_refusal"] = r["false_refusal"]["rate"]
        return out

    return callback
