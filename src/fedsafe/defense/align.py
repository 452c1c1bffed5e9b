"""A safety-aligned starting adapter: the server aligns the model once before the federation starts.

The paper federates a pre-trained Llama-2-7B whose benign FedIT data (LMSYS/WildChat first turns) carry
ChatGPT's refusals, so safety *emerges* during FedIT. At demo scale on a 135M model that emergence is too
weak and too noisy to be attacked measurably (``shared/reference/miniature.md``), so the demo can start
the federation from an adapter the server first trains on aligned + normal data (``init.adapter: align``),
as a deployed model would be. The records come from the held-out pools and are *reserved*: removed
from the pools before any defense draws from them, so alignment, defense and evaluation data stay
disjoint. The result is cached in the user cache, keyed by everything it depends on, so every scenario
of the demo shares one alignment run.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile

import torch

from .. import statefile
from ..assets import cache_dir
from ..config import RunConfig
from ..data.partition import Federation
from ..data.records import Record
from ..errors import DataError
from ..eval.runner import generate_cached
from ..io import atomic_write_bytes
from ..runtime import Runtime
from .data import reserve  # noqa: F401 - re-exported: the alignment records come out of the held-out pools
from .finetune import finetune


def initial_vec(cfg: RunConfig, fed: Federation, rt: Runtime, records: list[Record],
                progress: bool = True) -> torch.Tensor:
    ini = cfg.init
    if not ini.adapter:
        return rt.init_vec(cfg.seed)
    if ini.adapter != "align":
        return rt.handle.load_adapter_dir(ini.adapter)
    key = hashlib.sha256(json.dumps({
        "model": [cfg.model.name, cfg.model.dtype, cfg.model.template, cfg.model.seq_length, cfg.model.max_prompt_length],
        "lora": [cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.layers],
        "init": [ini.steps, ini.lr, ini.batch_size], "seed": cfg.seed, "records": sorted(r.id for r in records),
        **({"normal_responses": ini.normal_responses} if ini.normal_responses != "data" else {}),
    }, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir() / "aligned_init" / f"{key}.safetensors"  # pickle-free (fedsafe.statefile), like checkpoints
    if path.exists():
        try:
            vec = statefile.loads(path.read_bytes(), what=str(path))["vec"]
        except (DataError, KeyError, TypeError, OSError):
            vec = None  # damaged cache entry: recompute and overwrite it
        if isinstance(vec, torch.Tensor) and vec.numel() == rt.handle.numel:
            return vec
    recs = list(records)
    if ini.normal_responses == "self":
        recs = own_answers(cfg, rt, recs)
    random.Random(cfg.seed).shuffle(recs)
    with tempfile.TemporaryDirectory() as tmp:
        vec = finetune(rt, rt.init_vec(cfg.seed), recs, steps=ini.steps, batch_size=ini.batch_size, lr=ini.lr,
                       lr_min=ini.lr / 10, checkpoint_every=ini.steps, out_dir=tmp, seed=cfg.seed,
                       autocast=cfg.model.autocast, progress=progress, label="server safety alignment")
    atomic_write_bytes(path, statefile.dumps({"vec": vec}))
    return vec


def own_answers(cfg: RunConfig, rt: Runtime, records: list[Record]) -> list[Record]:
    """``records`` with each normal record's answer replaced by the model's own greedy answer (as loaded,
    no adapter): self-distillation on benign prompts (cf. Yang et al., ACL 2024, "Self-Distillation Bridges
    Distribution Gap in Language Model Fine-Tuning"). The reference answers of a chat pool (ShareGPT's)
    open in a hundred ways, while the refusals open in a few, so with reference answers the cheapest way
    for the alignment to lower its loss is to open *every* answer like a refusal; the model's own answers
    are already likely under it, so they anchor its benign behaviour instead. Answers are as long as the
    training window allows (``seq_length - max_prompt_length`` tokens); an empty answer keeps the reference."""
    normal = [r for r in records if r.kind == "normal"]
    if not normal:
        return records
    mc = cfg.model
    outs = generate_cached(rt, None, [r.instruction for r in normal], max_new_tokens=mc.seq_length - mc.max_prompt_length,
                           batch_size=cfg.eval.batch_size, seed=cfg.seed)
    own = {r.id: o[0].strip() for r, o in zip(normal, outs)}
    return [Record(r.instruction, own[r.id], r.kind, r.source, dict(r.meta or {}, answer="self"))
            if own.get(r.id) else r for r in records]
