"""Per-client behaviours: the paper's data-only attack and the classical model-poisoning baselines.

Each malicious client first trains exactly like a benign one, on its own (unaligned) data; these
functions then see only that client's own delta from the global adapter. They keep the engine's
original arithmetic, so runs are bit-identical to the code they replace.
"""

from __future__ import annotations

import torch

from .base import register


@register("data", scope="client")
def data_only(delta: torch.Tensor, gen: torch.Generator) -> None:
    """The paper's attack (Ye et al., ICLR 2025, §4): ordinary SFT on unaligned data, sent unchanged.

    Knows: its own data only. Malicious clients share the benign code path and hyper-parameters; with
    ``attack.benign_mix`` they also mix held-out normal data in (:func:`fedsafe.attack.data.apply_benign_mix`).
    """
    return None


@register("none", scope="client")
def honest(delta: torch.Tensor, gen: torch.Generator) -> None:
    """No tampering with the update (the client's data still decide what it learns). Knows: nothing."""
    return None


@register("sign_flip", scope="client")
def sign_flip(delta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sign flipping (e.g. Damaskinos et al. 2018; Karimireddy et al. 2021): send ``-delta``. Knows: own update."""
    return -delta


@register("scale", scope="client")
def scale(delta: torch.Tensor, gen: torch.Generator, *, scale: float) -> torch.Tensor:
    """Model replacement by boosting (Bagdasaryan et al., AISTATS 2020): ``attack.scale * delta``. Knows: own update."""
    return delta * scale


@register("gaussian", scope="client")
def gaussian(delta: torch.Tensor, gen: torch.Generator, *, noise_std: float) -> torch.Tensor:
    """Gaussian noise update (Blanchard et al., NeurIPS 2017's omniscient-free baseline): ``N(0, noise_std^2 I)``.

    Knows: nothing (the trained update is discarded); the noise comes from the client's own seeded
    generator, after its training draws.
    """
    return torch.randn(delta.shape, generator=gen) * noise_std


# Per-client behaviours that read a first-class attack.* field (kept for existing configs).
FIELD_PARAMS = {"scale": ("scale",), "gaussian": ("noise_std",)}


def apply_client(behaviour: str, y: torch.Tensor, global_vec: torch.Tensor, gen: torch.Generator,
                 attack_cfg) -> torch.Tensor:
    """The adapter a malicious client sends after training to ``y`` (the engine's behaviour hook)."""
    from .base import REGISTRY

    fn = REGISTRY[behaviour]
    kw = {k: getattr(attack_cfg, k) for k in FIELD_PARAMS.get(behaviour, ())}
    d = fn(y - global_vec, gen, **kw)
    return y if d is None else global_vec + d
