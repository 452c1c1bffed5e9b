"""Data configuration: who holds what, how it is split, and what is held out for evaluation.

Plain dataclasses with simple field types, so the generic YAML loader can build them from dicts by
type hints. :meth:`DataConfig.validate` checks values and that every source spec names a known
source (without loading anything).

The default reproduces the paper's main setting at its sizes: 10 clients, 7 benign then 3 malicious
(ids 7, 8, 9), 500 samples each. Benign clients mix normal pairs with 30 % aligned data (the share the
miniature run needed for safety to emerge in clean FedAvg); malicious clients hold many-shot harmful
pairs, upsampled because only 283 exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection

from ..errors import ConfigError, DataError

SPLITS = ("iid", "dirichlet", "by_source")


@dataclass
class ClientGroup:
    """``clients`` clients that share one data mix (source spec -> fraction, summing to 1)."""

    clients: int
    mix: dict[str, float]
    malicious: bool = False
    samples_per_client: int | None = None
    name: str = ""


def _default_groups() -> list[ClientGroup]:
    return [
        ClientGroup(clients=7, mix={"sharegpt": 0.7, "aligned:donotanswer": 0.3}, name="benign"),
        ClientGroup(clients=3, mix={"manyshot": 1.0}, malicious=True, name="malicious"),
    ]


@dataclass
class DataConfig:
    groups: list[ClientGroup] = field(default_factory=_default_groups)
    samples_per_client: int = 500
    split: str = "iid"  # iid | dirichlet | by_source
    dirichlet_alpha: float = 0.5
    shuffle_seed: int = 2023  # the paper's data seed
    upsample: bool = True  # too few unique records: sample with replacement (recorded) instead of failing
    eval_harmful: str = "strongreject"
    eval_harmful_n: int = 100
    eval_benign: str = "sharegpt"
    eval_benign_n: int = 50
    probe_n: int = 20  # server-held probes (harmful and benign each), disjoint from eval
    defense_aligned: str = "aligned:donotanswer"
    defense_normal: str = "sharegpt"
    allow_contamination: bool = False
    max_instruction_chars: int = 1000
    max_response_chars: int = 1000

    def validate(self, extra_specs: Collection[str] = ()) -> "DataConfig":
        """Raise :class:`ConfigError` on the first invalid value; returns self for chaining.

        ``extra_specs`` are names accepted although no registered source has them (records supplied
        directly to ``build_federation(pools=...)``).
        """
        from .sources import parse_spec as _parse

        def parse_spec(spec: str):
            return None if spec in extra_specs else _parse(spec)

        if not self.groups:
            raise ConfigError("data.groups: at least one client group is needed")
        names = set()
        for gi, g in enumerate(self.groups):
            where = f"data.groups[{gi}]" + (f" ({g.name})" if g.name else "")
            if not isinstance(g.clients, int) or isinstance(g.clients, bool) or g.clients < 1:
                raise ConfigError(f"{where}.clients: must be an integer >= 1, got {g.clients!r}")
            if g.samples_per_client is not None and (not isinstance(g.samples_per_client, int) or g.samples_per_client < 1):
                raise ConfigError(f"{where}.samples_per_client: must be an integer >= 1 or null, got {g.samples_per_client!r}")
            if not g.mix:
                raise ConfigError(f"{where}.mix: empty; give at least one source spec with a fraction")
            for spec, frac in g.mix.items():
                if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not math.isfinite(frac) or frac < 0:
                    raise ConfigError(f"{where}.mix[{spec!r}]: fraction must be a number >= 0, got {frac!r}")
                _check_spec(parse_spec, spec, f"{where}.mix")
            total = sum(g.mix.values())
            if abs(total - 1.0) > 1e-6:
                raise ConfigError(f"{where}.mix: fractions sum to {total:g}, must sum to 1")
            name = group_name(self.groups, gi)
            if name in names:
                raise ConfigError(f"{where}.name: duplicate group name {name!r}")
            names.add(name)
        if not isinstance(self.samples_per_client, int) or self.samples_per_client < 1:
            raise ConfigError(f"data.samples_per_client: must be an integer >= 1, got {self.samples_per_client!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"data.split: unknown split {self.split!r}; use one of {', '.join(SPLITS)}")
        if not isinstance(self.dirichlet_alpha, (int, float)) or not math.isfinite(self.dirichlet_alpha) or self.dirichlet_alpha <= 0:
            raise ConfigError(f"data.dirichlet_alpha: must be > 0, got {self.dirichlet_alpha!r}")
        for key in ("eval_harmful_n", "eval_benign_n", "probe_n"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"data.{key}: must be an integer >= 0, got {v!r}")
        for key in ("max_instruction_chars", "max_response_chars"):
            v = getattr(self, key)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"data.{key}: must be an integer >= 1, got {v!r}")
        for key in ("eval_harmful", "eval_benign", "defense_aligned", "defense_normal"):
            _check_spec(parse_spec, getattr(self, key), f"data.{key}")
        return self

    def client_sizes(self) -> list[int]:
        """Samples per client, in client-id order (benign groups first)."""
        return [g.samples_per_client or self.samples_per_client for g in ordered_groups(self.groups) for _ in range(g.clients)]

    def all_specs(self) -> list[str]:
        """Every source spec the config names, each once, in first-mention order."""
        specs: list[str] = []
        for g in ordered_groups(self.groups):
            specs += list(g.mix)
        specs += [self.eval_harmful, self.eval_benign, self.defense_aligned, self.defense_normal]
        return list(dict.fromkeys(specs))


def ordered_groups(groups: list[ClientGroup]) -> list[ClientGroup]:
    """Benign groups first, then malicious, each in config order (the paper's client ids 7-9 are malicious)."""
    return [g for g in groups if not g.malicious] + [g for g in groups if g.malicious]


def group_name(groups: list[ClientGroup], index: int) -> str:
    g = groups[index]
    if g.name:
        return g.name
    base = "malicious" if g.malicious else "benign"
    same = [i for i, h in enumerate(groups) if not h.name and h.malicious == g.malicious]
    return base if len(same) == 1 else f"{base}{same.index(index)}"


def _check_spec(parse_spec, spec: str, where: str) -> None:
    try:
        parse_spec(spec)
    except DataError as e:
        raise ConfigError(f"{where}: {e}") from None
