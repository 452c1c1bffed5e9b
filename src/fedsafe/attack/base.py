"""Registry of malicious-client behaviours, with their parameters and knowledge declared once.

A behaviour is a plain function registered with :func:`register`. Two scopes:

* ``client``: called on one malicious client's own trained update, right after its local training,
  ``fn(delta, gen, **params) -> delta | None`` (``None``: send the trained adapter unchanged, which
  keeps the data-only attack bit-identical). The attacker knows only its own update. With
  ``regulariser=True`` the client's local training also gets an extra loss term (``probe_evade``).
* ``round``: called once per round for the colluding malicious clients together,
  ``fn(ctx: RoundContext, **params) -> (crafted (n_mal, d), info)``. It needs benign updates, which the
  engine supplies according to the attacker's *knowledge*:

  - ``omniscient``: this round's benign clients' deltas (the strongest, standard threat model of
    ALIE/IPM/min-max evaluations);
  - ``estimate``: ``attack.ref_updates`` benign-looking deltas the coalition trains itself from the
    global adapter on held-out normal data (the ALIE paper's "attackers estimate from their own
    benign data").

:func:`check_attack` validates the behaviour, its parameters and whether its knowledge assumption can
be met by the configuration, before any training (``ConfigError``: one line, exit 2).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..aggregators.base import Param  # one parameter spec for rules and attacks (default None: it decides)
from ..errors import ConfigError

KNOWLEDGE = ("omniscient", "estimate")


@dataclass(frozen=True)
class AttackSpec:
    name: str
    scope: str  # client | round
    params: dict[str, Param]
    knowledge: tuple[str, ...] = ()  # round scope: accepted knowledge, the first is the default
    min_benign: int = 0  # benign updates the crafting needs (e.g. 2 for a standard deviation)
    bounds: Callable[[dict], None] | None = None
    targets_aggregator: bool = False  # has a mode that simulates the server's rule (must be simulable)
    regulariser: bool = False  # client scope: trains with an extra loss term (``weight``, ``safe_n`` params)


@dataclass
class RoundContext:
    """What a colluding coalition sees in one round (all tensors are deltas from the global adapter).

    ``own``: the malicious clients' trained (data-attack) deltas, ``(n_mal, d)``; ``benign``: the benign
    updates its knowledge gives, ``(n_b, d)``; ``n``: clients in the round (benign + malicious);
    ``aggregate``: the server's rule as ``fn(U) -> (d,)``, only for attacks that target it.
    """

    own: torch.Tensor
    benign: torch.Tensor
    n: int
    gen: torch.Generator
    aggregate: Callable[[torch.Tensor], torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


REGISTRY: dict[str, Callable] = {}
SPECS: dict[str, AttackSpec] = {}


def fail(name: str, message: str) -> None:
    raise ConfigError(f"attack '{name}': {message}")


def register(name: str, *, scope: str, params: dict[str, Param] | None = None, knowledge: tuple[str, ...] = (),
             min_benign: int = 0, bounds: Callable[[dict], None] | None = None,
             targets_aggregator: bool = False, regulariser: bool = False) -> Callable:
    """Register a behaviour function under ``name`` (see the module docstring for the two signatures)."""
    if scope not in ("client", "round"):
        raise ValueError(f"scope must be client or round, got {scope!r}")
    if scope == "round" and not knowledge:
        raise ValueError(f"round-scope attack {name!r} must declare its knowledge")
    spec = AttackSpec(name, scope, dict(params or {}), tuple(knowledge), min_benign, bounds, targets_aggregator,
                      regulariser)

    def decorator(fn: Callable) -> Callable:
        if name in REGISTRY:
            raise RuntimeError(f"attack '{name}' registered twice")
        fn.spec = spec  # type: ignore[attr-defined]
        REGISTRY[name] = fn
        SPECS[name] = spec
        return fn

    return decorator


def get_spec(name: str) -> AttackSpec:
    if name not in SPECS:
        known = sorted(SPECS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"attack.behaviour={name!r} is not allowed; choose one of: {', '.join(known)}{hint}")
    return SPECS[name]


def resolve_params(spec: AttackSpec, params: dict) -> dict:
    """Type-check ``attack.params`` against the behaviour's declaration and fill defaults."""
    out = {}
    for key, value in (params or {}).items():
        if key not in spec.params:
            known = sorted(spec.params)
            close = difflib.get_close_matches(key, known, n=1)
            fail(spec.name, f"unknown parameter '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                 + (f"; known: {', '.join(known)}" if known else "; it takes no attack.params"))
        p = spec.params[key]
        if value is None and p.default is None:
            out[key] = None
            continue
        if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, p.kind) or (p.kind is not bool and isinstance(value, bool)):
            fail(spec.name, f"parameter '{key}' must be {p.kind.__name__}, got {value!r}")
        if p.choices is not None and value not in p.choices:
            fail(spec.name, f"parameter '{key}' must be one of {list(p.choices)}, got {value!r}")
        out[key] = value
    for key, p in spec.params.items():
        out.setdefault(key, p.default)
    if spec.bounds is not None:
        spec.bounds(out)
    return out


def knowledge_of(spec: AttackSpec, knowledge: str) -> str:
    """The knowledge a round-scope attack runs with (``""`` = its declared default)."""
    return knowledge or (spec.knowledge[0] if spec.knowledge else "")


def check_attack(behaviour: str, params: dict, knowledge: str, *, ref_updates: int, sample_clients: int,
                 n_benign_clients: int, n_malicious_clients: int, benign_per_round: int | None = None,
                 aggregator: str = "",
                 aggregator_simulable: Callable[[str], str] | None = None) -> None:
    """Refuse, before training, a behaviour whose parameters are wrong or whose knowledge cannot be met.

    ``benign_per_round``: benign clients in every round when the sampling fixes it (None: it varies).

    ``aggregator_simulable(name)`` returns ``""`` when the attacker can run the server's rule itself,
    else the reason it cannot (server state, server-private inputs).
    """
    spec = get_spec(behaviour)
    p = resolve_params(spec, params)
    if spec.scope == "client":
        if knowledge:
            fail(behaviour, f"attack.knowledge={knowledge!r} applies only to attacks that use benign updates "
                 f"({', '.join(n for n, s in sorted(SPECS.items()) if s.scope == 'round')}); leave it empty")
        return
    k = knowledge_of(spec, knowledge)
    if k not in spec.knowledge:
        fail(behaviour, f"attack.knowledge={k!r} is not supported; choose one of: {', '.join(spec.knowledge)}")
    if n_malicious_clients == 0:
        fail(behaviour, "there are no malicious clients (no data group with malicious: true) to run it")
    if k == "omniscient":
        if n_benign_clients == 0:
            fail(behaviour, "knowledge 'omniscient' needs benign clients to observe, but every client is "
                 "malicious; use attack.knowledge=estimate")
        if benign_per_round == 0:
            fail(behaviour, "knowledge 'omniscient' needs benign updates in the round, but fl.malicious_per_round "
                 "fills every sampled slot with a malicious client; use attack.knowledge=estimate")
        if sample_clients < 2:
            fail(behaviour, "knowledge 'omniscient' needs at least one benign update in the round, but "
                 "fl.sample_clients=1 leaves a malicious client alone in its rounds; use attack.knowledge=estimate")
    elif ref_updates < max(1, spec.min_benign):
        fail(behaviour, f"knowledge 'estimate' needs attack.ref_updates >= {max(1, spec.min_benign)} benign-looking "
             f"updates to estimate from, got {ref_updates}")
    if spec.targets_aggregator and p.get("target") == "aggregator":
        why = aggregator_simulable(aggregator) if aggregator_simulable else ""
        if why:
            fail(behaviour, f"target=aggregator cannot target fl.aggregator={aggregator!r}: {why}; "
                 "use target=agnostic")
