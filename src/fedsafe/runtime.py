"""One frozen base model per process, shared by every client, scenario and evaluation.

``get_runtime`` loads the base once and wraps it with a LoRA adapter; later calls with the same model
reuse it (the demo runs several scenarios in one process). Tokenised examples are memoised by record id,
so each client's data is tokenised once per run, not per round.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from dataclasses import dataclass, field

import torch

from .config import LoraConfig, ModelConfig, RunConfig
from .data.templates import Example, tokenize_pair
from .lm import prefill_from_states, prefix_hidden, prompt_lower_states
from .errors import FedsafeError
from .models import EMBEDDED, LoraHandle, add_lora, load_base, num_layers, resolve_device
from .rundir import ADAPTER_WEIGHTS, START_ADAPTER


@dataclass
class Runtime:
    model_cfg: ModelConfig
    lora_cfg: LoraConfig
    model: torch.nn.Module  # the peft-wrapped model
    tokenizer: object
    handle: LoraHandle
    device: torch.device
    _tok_cache: dict = field(default_factory=dict)
    _prefix_cache: dict = field(default_factory=dict)
    _base_originals: dict = field(default_factory=dict)  # module name -> its weight before set_base_delta
    _prompt_cache: dict = field(default_factory=dict)  # prompt token ids -> frozen-layer states (prompt_prefill)
    _prompt_cache_bytes: int = 0
    prompt_cache_mb: float = 2048.0  # beyond this, prompts not yet cached are prefilled the ordinary way
    base_delta_key: str = ""  # sha256 of the start folded into the base ("" = the base as loaded)

    def tokenize(self, records) -> list[Example]:
        mc = self.model_cfg
        out = []
        for r in records:
            loss_from = int((getattr(r, "meta", None) or {}).get("loss_from", 0))  # > 0: safety-recovery example
            key = (r.id, r.instruction, r.response, mc.template, mc.seq_length, mc.max_prompt_length, loss_from)
            ex = self._tok_cache.get(key)
            if ex is None:
                ex = tokenize_pair(self.tokenizer, mc.template, r.instruction, r.response, mc.seq_length,
                                   mc.max_prompt_length, loss_from)
                self._tok_cache[key] = ex
            out.append(ex)
        return out

    def init_vec(self, seed: int) -> torch.Tensor:
        """A fresh LoRA initialisation (A ~ kaiming-uniform as peft, B = 0), deterministic in ``seed``."""
        gen = torch.Generator().manual_seed(int(seed))
        parts = []
        for name, p in zip(self.handle.names, self.handle.params):
            if "lora_A" in name:
                fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) gives this bound
                parts.append((torch.rand(p.shape, generator=gen) * 2 - 1).mul_(bound).reshape(-1))
            else:
                parts.append(torch.zeros(p.numel()))
        return torch.cat(parts).float()

    @torch.no_grad()
    def set_base_delta(self, vec: torch.Tensor | None) -> None:
        """Fold the LoRA delta of ``vec`` into the base weights of every adapted module (``None``: restore
        the base as loaded). This makes an aligned start part of the *base model*, so the federation trains
        a fresh LoRA on a safety-aligned model, as the paper does on Llama-2-chat (``init.merge``). The
        originals are kept, so switching starts (or back) is exact rather than an add-then-subtract.
        Only LoRA-adapted modules change, so the frozen-prefix cache of the layers below stays valid."""
        if vec is None and not self._base_originals:
            return
        key = hashlib.sha256(vec.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest() if vec is not None else ""
        if key == self.base_delta_key:
            return
        lora = {n: m for n, m in self.model.named_modules() if hasattr(m, "get_delta_weight") and "default" in
                getattr(m, "lora_A", {})}
        with self.handle.swapped(vec):
            for name, m in lora.items():
                w = m.get_base_layer().weight
                orig = self._base_originals.setdefault(name, w.detach().clone())
                w.copy_(orig)
                if vec is not None:
                    w.add_(m.get_delta_weight("default").to(w.dtype))
        if vec is None:
            self._base_originals.clear()
        self.base_delta_key = key if vec is not None else ""

    @property
    def first_adapted_layer(self) -> int:
        """Index of the lowest decoder layer with LoRA (0 when every layer is adapted)."""
        if not self.lora_cfg.layers:
            return 0
        return num_layers(self.model.get_base_model()) - self.lora_cfg.layers

    def prefix(self, records, examples, batch_size: int = 16) -> list[torch.Tensor]:
        """Frozen-prefix hidden states for ``examples`` (memoised by record id, computed once per process)."""
        first = self.first_adapted_layer
        keys = [(r.id, r.instruction, r.response, first, self.model_cfg.template, self.model_cfg.seq_length,
                 self.model_cfg.max_prompt_length) for r in records]
        todo = list({k: i for i, k in enumerate(keys) if k not in self._prefix_cache}.values())  # each new key once
        if todo:
            hs = prefix_hidden(self.model, [examples[i] for i in todo], first, self.device, batch_size=batch_size)
            for i, h in zip(todo, hs):
                self._prefix_cache[keys[i]] = h
        return [self._prefix_cache[k] for k in keys]

    def prompt_prefill(self, prompts: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict | None:
        """``generate`` keyword arguments carrying the cache of a left-padded prompt batch, computed from
        frozen-layer states memoised per prompt (:func:`fedsafe.lm.prompt_lower_states`); None when every
        layer is adapted or the memo is full. Only LoRA modules change between the adapters and merged
        starts a process evaluates, and they sit above the cached layers, so a state stays valid for the
        runtime's life (tests/test_prompt_prefill.py checks outputs against an ordinary prefill)."""
        first = self.first_adapted_layer
        if first <= 0:
            return None
        keys = [tuple(p[:-1]) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in self._prompt_cache]
        if todo:
            if self._prompt_cache_bytes > self.prompt_cache_mb * 2**20:
                return None
            states = prompt_lower_states(self.model, [prompts[i] for i in todo], first, self.device,
                                         batch_size=len(todo))
            for i, st in zip(todo, states):
                self._prompt_cache[keys[i]] = st
                self._prompt_cache_bytes += sum(t.numel() * t.element_size() for t in [st["h"], *st["k"], *st["v"]])
        states = [self._prompt_cache[k] for k in keys]
        return prefill_from_states(self.model, states, input_ids, attention_mask, first)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def use_run_base(rt: Runtime, cfg: RunConfig, run_dir: str | Path) -> None:
    """Put ``run_dir``'s base model in place: with ``init.merge`` its ``start_adapter/`` folded into the base
    weights, otherwise the base as loaded. Every reader of a run's adapters calls this first, because one
    runtime serves runs of both kinds in a process."""
    if not cfg.init.merged:
        rt.set_base_delta(None)
        return
    d = Path(run_dir) / START_ADAPTER
    if not (d / ADAPTER_WEIGHTS).exists():
        raise FedsafeError(f"{run_dir}: the run has init.merge=true but no {START_ADAPTER}/ (the adapter its "
                           f"final adapter sits on); it was not written by this version or was removed")
    rt.set_base_delta(rt.handle.load_adapter_dir(d))


_CACHE: dict = {}


def get_runtime(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> Runtime:
    mkey = (model_cfg.name, model_cfg.dtype, str(resolve_device(model_cfg.device)))
    lkey = (lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, tuple(lora_cfg.target_modules), lora_cfg.layers)
    rt = _CACHE.get("rt")
    if rt is not None and _CACHE.get("mkey") == mkey:
        if _CACHE.get("lkey") == lkey:
            rt.model_cfg = model_cfg
            rt.lora_cfg = lora_cfg
            return rt
        rt.set_base_delta(None)  # a merged start belongs to the old adapter's run
        base = rt.model.unload()  # drop the old adapter, keep the frozen base
        tok = rt.tokenizer
    else:
        _CACHE.clear()
        base, tok = load_base(model_cfg.name, model_cfg.dtype, model_cfg.device)
    if model_cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    pm = add_lora(base, lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.target_modules, lora_cfg.layers)
    pm.eval()
    handle = LoraHandle.of(pm)
    handle.base_name = model_cfg.name if model_cfg.name == "tiny" or model_cfg.name in EMBEDDED else ""
    rt = Runtime(model_cfg, lora_cfg, pm, tok, handle, resolve_device(model_cfg.device))
    _CACHE.update(rt=rt, mkey=mkey, lkey=lkey)
    return rt
