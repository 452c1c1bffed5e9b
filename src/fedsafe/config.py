"""Typed run configuration: dataclasses, YAML presets, dotted overrides, validation.

A run is described by :class:`RunConfig`. It is built from a preset name shipped in
``fedsafe/presets/`` (``tiny``, ``demo``, ``paper``, ...) or a YAML path, then ``key=value`` overrides
(``fl.rounds=20``; values parsed as YAML). OpenFedLLM's flag names are accepted as aliases
(``num_rounds``, ``sample_clients``, ``max_steps``, ``peft_lora_r``, ...), so users of the paper's code
can keep their habits. Unknown keys fail with the allowed keys and a close-match hint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .data.config import DataConfig
from .errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "tiny"  # embedded name (tiny, smollm2-135m-instruct), HF hub id, or local path
    dtype: str = "float32"  # float32 | bfloat16 | float16 (weights of the frozen base)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    template: str = "chat"  # chat (the tokenizer's chat template) | alpaca (the paper's)
    seq_length: int = 512  # max tokens per example (OpenFedLLM --seq_length)
    max_prompt_length: int = 256  # prompt tokens kept (the response gets the rest)
    autocast: str = "none"  # none | bf16 (mixed precision for the frozen backbone)
    gradient_checkpointing: bool = False


@dataclass
class LoraConfig:
    r: int = 32  # paper: 32
    alpha: int = 64  # paper: 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # or ["all-linear"]
    layers: int = 0  # LoRA only on the top N decoder layers (0 = every layer); enables prefix caching


@dataclass
class FLConfig:
    rounds: int = 100
    sample_clients: int = 3
    local_steps: int = 10
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-5  # client learning rate at round 1
    lr_min: float = 1e-6  # cosine across rounds down to this (constant within a round), as the paper
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping
    reset_optimizer: bool = True  # fresh AdamW per client per round (paper); False keeps each client's state
    fed_alg: str = "fedavg"  # fedavg | fedavgm | fedadagrad | fedyogi | fedadam | fedprox | scaffold
    aggregator: str = "mean"  # robust rule from fedsafe.aggregators.REGISTRY
    aggregator_params: dict[str, Any] = field(default_factory=dict)
    aggregate_on: str = "deltas"  # deltas (default) | weights (the paper's raw-LoRA-weights variant)
    oracle: bool = False  # give the true malicious count to the rule as `f` (the paper's Krum/DnC did)
    weighted: bool = True  # weight clients by their sample counts
    server_lr: float = 1.0  # FedOpt eta (fedavgm/fedadagrad/fedyogi/fedadam); OpenFedLLM --fedopt_eta
    server_momentum: float = 0.9  # FedAvgM beta
    beta1: float = 0.9  # FedOpt
    beta2: float = 0.99
    tau: float = 1e-3
    prox_mu: float = 0.01  # FedProx
    sampling: str = "random"  # random (seeded per round) | stratified (same share of malicious each round)
    malicious_per_round: int | None = None  # stratified only: exactly this many malicious clients per round (dose)
    checkpoint_every: int = 1  # rounds
    keep_checkpoints: int = 0  # 0 keeps all
    max_update_norm: float = 1e6  # absurd-norm guard for client updates
    min_clients: int = 1  # skip the round if fewer valid updates remain
    prefix_cache: bool = True  # with lora.layers > 0: cache hidden states below the adapted layers once per run
    batch_clients: int = 1  # train up to this many sampled clients together in one batched forward (1 = one by one)
    # with the prefix cache: compute every client record's lower-layer states in one batched pass before round 0.
    # auto = when the run's local steps draw at least as many records as the clients hold (most would be met anyway)
    prefix_precompute: str = "auto"  # auto | always | never (never = lazily, the first time a record is met)
    prefix_precompute_mb: int = 2048  # memory budget of that pass's states; over it: one line, then lazy


@dataclass
class AttackConfig:
    # fedsafe.attack.REGISTRY: data (the paper: ordinary SFT on unaligned data) | none | sign_flip | scale |
    # gaussian | alie | ipm | min_max | min_sum | stealthy | probe_evade (params: weight, safe_n)
    behaviour: str = "data"
    scale: float = 10.0  # for 'scale' (model replacement)
    noise_std: float = 0.01  # for 'gaussian'
    benign_mix: float = 0.0  # fraction of benign data a malicious client mixes in for stealth
    params: dict[str, Any] = field(default_factory=dict)  # behaviour parameters (e.g. z for alie, eps for ipm)
    knowledge: str = ""  # colluding attacks: omniscient (the round's benign updates) | estimate ("" = its default)
    ref_updates: int = 3  # knowledge=estimate: benign-looking updates the coalition trains per round


@dataclass
class MonitorConfig:
    every: int = 0  # evaluate the global model on the probe set every k rounds (0 = off)
    judge: str = "rule"
    max_new_tokens: int = 48
    batch_size: int = 16


@dataclass
class EvalConfig:
    judge: str = "rule"
    max_new_tokens: int = 64
    batch_size: int = 16
    temperature: float = 0.0  # greedy by default; the paper sampled at 0.7
    samples: int = 1
    harmful_n: int | None = None  # None: all of data.eval_harmful_n
    benign_n: int | None = None


@dataclass
class DefenseConfig:
    enabled: bool = False  # run the post-hoc defense after the last round
    level: int = 1
    n: int = 1000  # defense samples (paper: 1,000)
    aligned_ratio: float = 0.5
    steps: int = 500  # paper: 500
    batch_size: int = 16
    lr: float = 5e-5
    lr_min: float = 1e-6
    checkpoint_every: int = 100
    filter_refusals: bool = True  # drop generated aligned answers the judge does not flag as refusals, and
    # generated normal answers it does (a refusal of a normal question would teach over-refusal)
    every_rounds: int = 0  # in-training variant: fine-tune on Level-1 data every k rounds (0 = post-hoc only)
    inline_steps: int = 10  # steps per in-training application
    generator: str = ""  # Level 2: model name/path or endpoint:URL#model
    n_generated: int = 0  # Levels 2/3: samples to generate (0 = defense.n); generation is the slow part on CPU
    gen_max_new_tokens: int = 64  # Levels 2/3: tokens per generated response
    # Levels 2/3: where the harmful instructions come from. "generate" = the generator writes them with the
    # paper's prompt (faithful); "heldout" = the held-out harmful prompts of data.defense_aligned (never given
    # to clients or evaluation), the generator writing only the safe answers. A small generator cannot write
    # harmful questions: the embedded 135M model's "harmful" ones are benign, so refusing them teaches
    # over-refusal (docs/fidelity.md, "Level 2's false refusals")
    harmful_prompts: str = "generate"
    projection: bool = False  # training-free: remove each round's aggregated delta along the unsafe direction
    projection_threshold: float = 0.0  # project a module when cos(its delta, unsafe direction) exceeds this
    recovery_share: float = 0.0  # share of aligned defense examples made safety-recovery examples (Qi et al.)
    recovery_max_tokens: int = 16  # harmful opening of a recovery example: 1..this many tokens
    aligned_data: str = ""  # Level 2 from pre-generated data (the paper's released files): a spec or local file of
    normal_data: str = ""   # harmful prompts with safe answers, and one of normal pairs; set both to skip generation


@dataclass
class InitConfig:
    """Where the global adapter starts. The paper starts from a fresh LoRA on a base model whose FedIT data
    carries incidental refusals; a 135M model at demo scale needs a safe starting point instead (issue 8)."""

    adapter: str = ""  # "" = fresh LoRA | "align" = server-side safety alignment first | path to a peft adapter dir
    merge: bool = False  # fold that adapter into the base weights and federate a fresh LoRA on it (the paper's
    # setting: a fresh LoRA on a safety-aligned model); False = the federation continues the start adapter.
    # Without an adapter (adapter: "") there is nothing to fold: a fresh LoRA on the base either way.
    steps: int = 60  # alignment steps
    n: int = 400  # alignment samples, reserved from the held-out pools (never given to clients or defense)
    aligned_ratio: float = 0.4
    lr: float = 5e-4
    batch_size: int = 8
    # the answers the alignment trains on for its normal prompts: "data" = the pool's reference answers
    # (ShareGPT's), "self" = the model's own greedy answers before alignment (self-distillation), so that the
    # alignment teaches refusals on harmful prompts without pulling benign behaviour towards refusals
    normal_responses: str = "data"

    @property
    def merged(self) -> bool:
        """Whether the start adapter is folded into the base (``merge`` with an adapter to fold)."""
        return bool(self.merge and self.adapter)


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)

    def validate(self) -> "RunConfig":
        validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def num_clients(self) -> int:
        return sum(g.clients for g in self.data.groups)


# OpenFedLLM flag names (and a few natural spellings) -> canonical dotted keys.
ALIASES: dict[str, str] = {
    "num_rounds": "fl.rounds",
    "fl.num_rounds": "fl.rounds",
    "sample_clients": "fl.sample_clients",
    "max_steps": "fl.local_steps",
    "fl.max_steps": "fl.local_steps",
    "batch_size": "fl.batch_size",
    "gradient_accumulation_steps": "fl.grad_accum",
    "fl.gradient_accumulation_steps": "fl.grad_accum",
    "learning_rate": "fl.lr",
    "fl.learning_rate": "fl.lr",
    "fed_alg": "fl.fed_alg",
    "prox_mu": "fl.prox_mu",
    "fedopt_eta": "fl.server_lr",
    "fedopt_beta1": "fl.beta1",
    "fedopt_beta2": "fl.beta2",
    "fedopt_tau": "fl.tau",
    "peft_lora_r": "lora.r",
    "lora.peft_lora_r": "lora.r",
    "peft_lora_alpha": "lora.alpha",
    "lora.peft_lora_alpha": "lora.alpha",
    "seq_length": "model.seq_length",
    "template": "model.template",
    "model_name_or_path": "model.name",
    "num_data_per_client": "data.samples_per_client",
    "model.max_seq_length": "model.seq_length",
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.template": ("chat", "alpaca"),
    "model.autocast": ("none", "bf16"),
    "fl.lr_schedule": ("cosine", "constant"),
    "fl.fed_alg": ("fedavg", "fedavgm", "fedadagrad", "fedyogi", "fedadam", "fedprox", "scaffold"),
    "fl.aggregate_on": ("deltas", "weights"),
    "fl.sampling": ("random", "stratified"),
    "fl.prefix_precompute": ("auto", "always", "never"),
    "defense.harmful_prompts": ("generate", "heldout"),
}


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fedsafe.presets").iterdir() if p.name.endswith(".yaml"))


def _read_yaml(path_or_name: str, _chain: tuple[tuple[str, str], ...] = ()) -> tuple[dict, str]:
    """``(mapping, origin)`` of a YAML path or preset name, with its ``base:`` chain merged in.

    ``_chain`` holds ``(identity, origin)`` of the files/presets that led here through ``base:``, so a
    cycle is a ConfigError rather than a RecursionError.
    """
    p = Path(path_or_name)
    try:
        is_path = p.suffix in (".yaml", ".yml") or p.exists()
    except OSError:  # e.g. a name over NAME_MAX: not an existing file, so try it as a preset name
        is_path = False
    origin, key = (str(p), str(p.absolute())) if is_path else (f"preset {path_or_name}", f"preset:{path_or_name}")
    seen = [k for k, _ in _chain]
    if key in seen:
        loop = [o for _, o in _chain[seen.index(key):]] + [origin]
        raise ConfigError(f"'base' chain loops back on itself: {' -> '.join(loop)}")
    if is_path:
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory, not a YAML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:  # permissions, name too long, ...
            raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    else:
        res = resources.files("fedsafe.presets") / f"{path_or_name}.yaml"
        try:
            found = res.is_file()
        except OSError:
            found = False
        if not found:
            hint = difflib.get_close_matches(path_or_name, preset_names(), n=1)
            raise ConfigError(
                f"unknown preset {path_or_name!r}; presets: {', '.join(preset_names())}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + "; or give a path to a .yaml file"
            )
        text = res.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: invalid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{origin}: invalid YAML: nested too deeply") from None
    except ValueError as e:  # a scalar PyYAML resolves but cannot build, e.g. the date 2001-13-14
        raise ConfigError(f"{origin}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)  # presets may extend another preset
    if base:
        parent, _ = _read_yaml(str(base), _chain + ((key, origin),))
        data = _deep_merge(parent, data)
    return data, origin


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("aggregator_params", "mix", "params"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. fl.rounds=20)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML (or a date like 2001-13-14): keep the text
        value = raw
    return ALIASES.get(key, key), value


def set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


def load_config(source: str | dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Preset name / YAML path / dict, plus ``key=value`` overrides -> validated :class:`RunConfig`."""
    if source is None:
        raw, origin = {}, "defaults"
    elif isinstance(source, dict):
        raw, origin = dict(source), "dict"
    else:
        raw, origin = _read_yaml(source)
    raw = _apply_aliases(raw)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    cfg = from_dict(RunConfig, raw, origin)
    return cfg.validate()


def _apply_aliases(raw: dict) -> dict:
    out: dict = {}
    for k, v in raw.items():
        if k in ALIASES:
            set_dotted(out, ALIASES[k], v)
        elif isinstance(v, dict) and k in ("model", "lora", "fl", "data"):
            sub = {}
            for sk, sv in v.items():
                canon = ALIASES.get(f"{k}.{sk}")
                if canon:
                    set_dotted(out, canon, sv)
                else:
                    sub[sk] = sv
            out.setdefault(k, {}).update(sub)
        else:
            out[k] = v
    return out


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, checking keys and types (by the field annotations)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where and where not in ("dict", "defaults") and not where.startswith(("preset", "/")) else key
        if not isinstance(key, str):  # YAML `1:` or `yes:`; difflib below needs strings
            raise ConfigError(
                f"config key {path!r} must be a string, not {type(key).__name__}; allowed here: {', '.join(fields)}"
            )
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            raise ConfigError(
                f"unknown config key {path!r}; allowed here: {', '.join(fields)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        kwargs[key] = _coerce(hints[key], value, path)
    # fields without a default (e.g. a client group's clients/mix) must be given; the constructor
    # would raise TypeError otherwise
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where or cls.__name__}: missing required key(s) {', '.join(missing)}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and args and args[0] is str:
            value = [s.strip() for s in str(value).split(",") if s.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def _get(cfg: Any, dotted: str) -> Any:
    for p in dotted.split("."):
        cfg = getattr(cfg, p)
    return cfg


def validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        v = _get(cfg, key)
        if v not in allowed:
            hint = difflib.get_close_matches(str(v), allowed, n=1)
            raise ConfigError(
                f"{key}={v!r} is not allowed; choose one of: {', '.join(allowed)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
    positive = ["fl.rounds", "fl.sample_clients", "fl.local_steps", "fl.batch_size", "fl.grad_accum",
                "lora.r", "model.seq_length", "model.max_prompt_length", "eval.max_new_tokens",
                "eval.batch_size", "eval.samples", "defense.batch_size", "fl.checkpoint_every"]
    for key in positive:
        if _get(cfg, key) <= 0:
            raise ConfigError(f"{key} must be positive, got {_get(cfg, key)}")
    for key in ["fl.lr", "defense.lr"]:
        if not _get(cfg, key) > 0:
            raise ConfigError(f"{key} must be > 0, got {_get(cfg, key)}")
    if cfg.fl.lr_min > cfg.fl.lr:
        raise ConfigError(f"fl.lr_min ({cfg.fl.lr_min}) must not exceed fl.lr ({cfg.fl.lr})")
    if not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.model.max_prompt_length >= cfg.model.seq_length:
        raise ConfigError(
            f"model.max_prompt_length ({cfg.model.max_prompt_length}) must be below model.seq_length "
            f"({cfg.model.seq_length}) so the response keeps some tokens"
        )
    if cfg.fl.batch_clients < 1:
        raise ConfigError(f"fl.batch_clients must be >= 1 (1 = train clients one by one), got {cfg.fl.batch_clients}")
    if cfg.fl.batch_clients > 1 and not cfg.fl.reset_optimizer:
        raise ConfigError("fl.batch_clients > 1 needs fl.reset_optimizer: true (batched clients start each round "
                          "with a fresh AdamW, as the paper); set fl.batch_clients=1 to keep optimiser state")
    if cfg.fl.prefix_precompute_mb < 0:
        raise ConfigError(f"fl.prefix_precompute_mb must be >= 0 (MB of up-front prefix states), got {cfg.fl.prefix_precompute_mb}")
    if cfg.lora.layers < 0:
        raise ConfigError(f"lora.layers must be >= 0 (0 = all layers), got {cfg.lora.layers}")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules must name at least one module (or 'all-linear')")
    cfg.data.validate()
    k = cfg.num_clients
    if cfg.fl.sample_clients > k:
        raise ConfigError(
            f"fl.sample_clients ({cfg.fl.sample_clients}) exceeds the number of clients ({k}, the sum of "
            "data.groups[*].clients)"
        )
    mpr = cfg.fl.malicious_per_round
    if mpr is not None:
        n_mal_clients = sum(g.clients for g in cfg.data.groups if g.malicious)
        if cfg.fl.sampling != "stratified":
            raise ConfigError("fl.malicious_per_round needs fl.sampling: stratified")
        if not isinstance(mpr, int) or isinstance(mpr, bool) or not 0 <= mpr <= min(cfg.fl.sample_clients, n_mal_clients):
            raise ConfigError(f"fl.malicious_per_round must be an integer in [0, {min(cfg.fl.sample_clients, n_mal_clients)}] "
                              f"(sampled clients per round and malicious clients), got {mpr!r}")
        if cfg.fl.sample_clients - mpr > k - n_mal_clients:
            raise ConfigError(f"fl.malicious_per_round={mpr} leaves {cfg.fl.sample_clients - mpr} benign slots per round "
                              f"but only {k - n_mal_clients} benign clients exist")
    if not 0 <= cfg.attack.benign_mix < 1:
        raise ConfigError(f"attack.benign_mix must be in [0, 1), got {cfg.attack.benign_mix}")
    if cfg.defense.level not in (1, 2, 3):
        raise ConfigError(f"defense.level must be 1, 2 or 3, got {cfg.defense.level}")
    if cfg.init.normal_responses not in ("data", "self"):
        raise ConfigError(f"init.normal_responses must be 'data' or 'self', got {cfg.init.normal_responses!r}")
    if cfg.defense.projection and cfg.init.merged:
        raise ConfigError("defense.projection reads the unsafe direction off the start adapter's LoRA "
                          "parameters, which init.merge=true folds away: use one or the other")
    if cfg.defense.projection and not cfg.init.adapter:
        raise ConfigError("defense.projection needs an aligned start to compute the unsafe direction from: "
                          "set init.adapter=align (or a path to an aligned peft adapter)")
    if not -1 <= cfg.defense.projection_threshold < 1:
        raise ConfigError(f"defense.projection_threshold must be in [-1, 1), got {cfg.defense.projection_threshold}")
    if not 0 <= cfg.defense.aligned_ratio <= 1:
        raise ConfigError(f"defense.aligned_ratio must be in [0, 1], got {cfg.defense.aligned_ratio}")
    if not 0 <= cfg.defense.recovery_share <= 1:
        raise ConfigError(f"defense.recovery_share must be in [0, 1], got {cfg.defense.recovery_share}")
    if cfg.defense.recovery_max_tokens < 1:
        raise ConfigError(f"defense.recovery_max_tokens must be >= 1, got {cfg.defense.recovery_max_tokens}")
    _check_defense_files(cfg.defense)
    from . import aggregators

    params = dict(cfg.fl.aggregator_params)
    n_mal = sum(g.clients for g in cfg.data.groups if g.malicious)
    if cfg.fl.oracle and "f" not in params and "f" in aggregators.base.get_spec(cfg.fl.aggregator).params:
        params["f"] = mpr if mpr is not None else round(cfg.fl.sample_clients * n_mal / max(k, 1))
    aggregators.check_params(cfg.fl.aggregator, cfg.fl.sample_clients, params)
    _validate_attack(cfg, params, n_mal)


def _validate_attack(cfg: RunConfig, agg_params: dict, n_mal: int) -> None:
    """The behaviour, its parameters, and whether its knowledge assumption can be met (before training)."""
    from . import aggregators, attack

    def simulable(name: str) -> str:
        """Why an attacker cannot run the server's rule itself ("" when it can)."""
        import torch

        private = sorted(aggregators.rule_needs(name) - {"round"})  # root set, probe, history, simulations
        if private:
            return f"the rule uses server-side input the attacker does not have ({', '.join(private)})"
        n = cfg.fl.sample_clients
        state: dict = {}
        aggregators.REGISTRY[name](torch.randn(n, 8, generator=torch.Generator().manual_seed(0)), state=state,
                                   round=0, **agg_params)
        return "the rule keeps server state across rounds that the attacker cannot observe" if state else ""

    a = cfg.attack
    if a.ref_updates < 0:
        raise ConfigError(f"attack.ref_updates must be >= 0, got {a.ref_updates}")
    attack.check_attack(a.behaviour, a.params, a.knowledge, ref_updates=a.ref_updates,
                        sample_clients=cfg.fl.sample_clients, n_benign_clients=cfg.num_clients - n_mal,
                        n_malicious_clients=n_mal, aggregator=cfg.fl.aggregator, aggregator_simulable=simulable,
                        benign_per_round=None if cfg.fl.malicious_per_round is None
                        else cfg.fl.sample_clients - cfg.fl.malicious_per_round)


def _check_defense_files(d: DefenseConfig) -> None:
    if bool(d.aligned_data) != bool(d.normal_data):
        raise ConfigError("defense.aligned_data and defense.normal_data go together (Level 2 from files: "
                          "aligned answers + normal answers); set both or neither")
    from .data.sources import parse_spec
    from .errors import DataError

    for key in ("aligned_data", "normal_data"):
        if getattr(d, key):
            try:
                parse_spec(getattr(d, key))
            except DataError as e:
                raise ConfigError(f"defense.{key}: {e}") from None


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=1000)
