"""The safety attack: automated generation of unaligned data, and the malicious clients' behaviours.

Malicious clients in the engine train with exactly the benign clients' code path and hyper-parameters
(``fedsafe.fl.engine``); for the paper's data-only attack only their data differ (paper §4). What they
then send is ``attack.behaviour``, a function in :data:`REGISTRY` (registered like the aggregation rules):

===============  =======  ===========================================================================
behaviour        scope    what the malicious clients send (knowledge)
===============  =======  ===========================================================================
``data``         client   the trained adapter, unchanged: the paper's attack (own data)
``none``         client   the trained adapter, unchanged (own data)
``sign_flip``    client   ``-delta`` (own update)
``scale``        client   ``attack.scale * delta`` (own update)
``gaussian``     client   ``N(0, attack.noise_std^2)`` noise (nothing)
``alie``         round    ``mean - z * std`` of benign updates (Baruch et al. 2019)
``ipm``          round    ``-eps * mean`` of benign updates (Xie et al. 2020)
``min_max``      round    benign mean + gamma * p within the benign max distance (Shejwalkar & Houmansadr 2021)
``min_sum``      round    as min_max with the sum of squared distances
``stealthy``     round    its harmful delta rescaled to benign norm and cosine statistics (fedsafe)
``probe_evade``  client   the adapter trained with a regulariser keeping safe answers likely (fedsafe)
===============  =======  ===========================================================================

Round-scope attacks collude and need benign updates: ``attack.knowledge`` says whose (``omniscient``:
the round's benign updates; ``estimate``: ``attack.ref_updates`` benign-looking updates the coalition
trains itself on held-out normal data). :func:`check_attack` refuses impossible settings before training.
"""

from . import adaptive, classic, probe_evasion  # noqa: F401  (importing registers the behaviours)
from .base import KNOWLEDGE, REGISTRY, SPECS, RoundContext, check_attack, get_spec, knowledge_of, resolve_params
from .classic import apply_client

__all__ = ["KNOWLEDGE", "REGISTRY", "SPECS", "RoundContext", "apply_client", "check_attack", "get_spec",
           "knowledge_of", "resolve_params"]
