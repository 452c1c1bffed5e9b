"""Registry, result type and parameter checking shared by all aggregation rules.

Every rule is registered with :func:`register`, which declares its parameters (type and
default) and its feasibility bounds. The same declaration serves :func:`check_params` (called
by the engine before training) and the call-time validation done by the registered wrapper,
so the two can never disagree.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsafe.errors import ConfigError

# Keys the engine passes to every rule; rules that do not declare them in ``needs`` ignore them.
ENGINE_KEYS = frozenset({"client_ids", "round", "root_update", "probe_scores"})


@dataclass
class AggResult:
    """Output of one aggregation.

    Attributes
    ----------
    aggregate : torch.Tensor
        ``(d,)`` aggregated vector, same dtype and device as the updates.
    client_weights : torch.Tensor
        ``(n,)`` how much each client counted; 0 means rejected. For rules whose output is a
        linear combination ``sum_i c_i u_i`` this is ``c`` (sums to 1 for averaging rules).
        For coordinate-wise rules it is the fraction of coordinates in which the client's value
        was used (inside the kept range), so it does not sum to 1.
    info : dict
        JSON-serialisable extras (scores, selected indices, ...).
    """

    aggregate: torch.Tensor
    client_weights: torch.Tensor
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    """One user-settable rule parameter. ``default=None`` means "optional, rule decides"."""

    default: Any
    kind: type
    choices: tuple | None = None


@dataclass(frozen=True)
class RuleSpec:
    name: str
    params: dict[str, Param]
    bounds: Callable[[int, dict], None] | None
    needs: frozenset[str]


# Accepted by every rule: columns per block for memory-bounded processing (None = automatic).
COMMON_PARAMS = {"chunk": Param(None, int)}

REGISTRY: dict[str, Callable[..., AggResult]] = {}
SPECS: dict[str, RuleSpec] = {}


def fail(rule: str, message: str) -> None:
    raise ConfigError(f"aggregator '{rule}': {message}")


def require(ok: bool, rule: str, message: str) -> None:
    """Raise :class:`ConfigError` naming the rule when ``ok`` is false."""
    if not ok:
        fail(rule, message)


def _hint(word: str, known: Sequence[str]) -> str:
    lowered = {k.lower(): k for k in known}  # 'F' should still suggest 'f'
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return f" Did you mean '{lowered[close[0]]}'?" if close else ""


def get_spec(name: str) -> RuleSpec:
    if name not in SPECS:
        known = sorted(SPECS)
        raise ConfigError(
            f"unknown aggregator '{name}'.{_hint(name, known)} Known: {', '.join(known)}"
        )
    return SPECS[name]


def _coerce(rule: str, key: str, p: Param, value: Any) -> Any:
    if value is None and p.default is None:
        return None
    # bool is an int subclass; never let True pass as a count.
    ok = isinstance(value, p.kind) and not (p.kind is not bool and isinstance(value, bool))
    if p.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        fail(rule, f"parameter '{key}' must be {p.kind.__name__}, got {value!r}")
    if p.choices is not None and value not in p.choices:
        fail(rule, f"parameter '{key}' must be one of {list(p.choices)}, got {value!r}")
    return value


def engine_keys() -> frozenset[str]:
    """Keys any rule may receive from the engine: the fixed ones plus every rule's ``needs``."""
    return ENGINE_KEYS.union(*(spec.needs for spec in SPECS.values()))


def rule_needs(rule: str | Callable) -> frozenset[str]:
    """Engine-supplied inputs a rule uses (e.g. ``{"root_update"}`` for FLTrust)."""
    return get_spec(rule).needs if isinstance(rule, str) else rule.spec.needs


def resolve_params(spec: RuleSpec, n: int, params: dict) -> dict:
    """Type-check ``params``, fill defaults and check feasibility for ``n`` clients."""
    require(isinstance(n, int) and n >= 1, spec.name, f"needs at least 1 client (got n={n})")
    out = {}
    skip = engine_keys()
    for key, value in params.items():
        if key in skip:
            continue
        if key not in spec.params:
            known = sorted(spec.params)
            fail(
                spec.name,
                f"unknown parameter '{key}'.{_hint(key, known)} Known: {', '.join(known)}",
            )
        out[key] = _coerce(spec.name, key, spec.params[key], value)
    for key, p in spec.params.items():
        out.setdefault(key, p.default)
    require(out["chunk"] is None or out["chunk"] >= 1, spec.name, "chunk must be >= 1")
    if spec.bounds is not None:
        spec.bounds(n, out)
    return out


def check_params(name: str, n: int, params: dict) -> None:
    """Validate a rule name and its parameters for ``n`` clients per round.

    Raises
    ------
    ConfigError
        Unknown rule or parameter (with a close-match hint), wrong type, or an impossible
        setting such as Krum with ``n <= 2f + 2``; the message names the rule and the bound.
    """
    resolve_params(get_spec(name), n, dict(params or {}))


def _check_updates(name: str, updates: torch.Tensor) -> torch.Tensor:
    if not isinstance(updates, torch.Tensor) or updates.dim() != 2:
        raise ValueError(f"aggregator '{name}': updates must be an (n_clients, d) tensor")
    if not updates.is_floating_point():
        raise ValueError(f"aggregator '{name}': updates must be floating point")
    if updates.shape[0] < 1 or updates.shape[1] < 1:
        raise ValueError(f"aggregator '{name}': got empty updates {tuple(updates.shape)}")
    return updates


def normalised_weights(name: str, weights, updates: torch.Tensor) -> torch.Tensor:
    """Sample counts -> float64 weights summing to 1 on the updates' device (None = equal)."""
    n = updates.shape[0]
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=updates.device)
    w = torch.as_tensor(weights, dtype=torch.float64).to(updates.device).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"aggregator '{name}': {w.numel()} weights for {n} updates")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"aggregator '{name}': weights must be finite, >= 0, not all zero")
    return w / w.sum()


def register(
    name: str,
    *,
    params: dict[str, Param] | None = None,
    bounds: Callable[[int, dict], None] | None = None,
    needs: Sequence[str] = (),
) -> Callable:
    """Register ``fn(x, w, *, state, **params) -> AggResult`` under ``name``.

    The registered callable has the engine signature
    ``rule(updates, weights=None, *, state=None, **params)``; it validates the updates, turns
    sample counts into normalised weights ``w``, checks ``params`` (raising ``ConfigError``)
    and forwards only the engine keys listed in ``needs``.
    """
    spec = RuleSpec(name, {**COMMON_PARAMS, **(params or {})}, bounds, frozenset(needs))

    def decorator(fn: Callable[..., AggResult]) -> Callable[..., AggResult]:
        if name in REGISTRY:
            raise RuntimeError(f"aggregator '{name}' registered twice")

        @functools.wraps(fn)
        def rule(updates, weights=None, *, state=None, **kwargs) -> AggResult:
            x = _check_updates(name, updates)
            w = normalised_weights(name, weights, x)
            resolved = resolve_params(spec, x.shape[0], kwargs)
            resolved.update({k: kwargs[k] for k in spec.needs if k in kwargs})
            return fn(x, w, state=state, **resolved)

        rule.spec = spec  # type: ignore[attr-defined]
        REGISTRY[name] = rule
        SPECS[name] = spec
        return rule

    return decorator


def as_list(t: torch.Tensor) -> list:
    """Tensor -> plain Python list for ``AggResult.info``."""
    return t.detach().cpu().tolist()


def fraction_used(counts: torch.Tensor, d: int, like: torch.Tensor) -> torch.Tensor:
    """Per-client usage counts over ``d`` coordinates -> fractions in ``like``'s dtype."""
    return (counts.double() / d).to(dtype=like.dtype, device=like.device)


def masked_weights(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w`` restricted to ``mask`` and renormalised; uniform over ``mask`` if that sums to 0."""
    coef = torch.where(mask, w, torch.zeros_like(w))
    total = coef.sum()
    if total <= 0:
        coef = mask.to(w.dtype)
        total = coef.sum()
    return coef / total
