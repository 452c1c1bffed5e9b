"""Robust aggregation rules over flattened client updates, with per-client forensics.

Every rule in :data:`REGISTRY` is called as
``rule(updates, weights=None, *, state=None, **params) -> AggResult`` where ``updates`` is an
``(n_clients, d)`` float tensor (any device; results stay there) and ``weights`` the clients'
sample counts (None = equal). ``state`` is a dict the engine keeps across rounds (FoolsGold
history, centered-clipping momentum). The engine also passes ``client_ids``, ``round`` and, for
``fltrust``, ``root_update``; rules that do not need them ignore them. :func:`rule_needs` says
which of these inputs a rule uses.
:func:`check_params` validates a rule name and its parameters before training.

Canonical rules and the paper's variants (Ye et al., ICLR 2025, code ``fed_global.py``):

==================  =====================================================================
``mean``            FedAvg, sample-count weighted
``median``          coordinate-wise median (mean of two middle values for even n)
``median_paper``    ``torch.median``: lower middle value for even n
``trimmed_mean``    coordinate-wise, ``beta`` fraction or ``k`` values per side
``trimmed_mean_paper``  ``k = 1`` hard-coded (equals the median for n = 3)
``krum``            Blanchard et al.: argmin of summed squared distances to n-f-2 neighbours
``multi_krum``      weighted mean of the m best Krum scores
``krum_paper``      L2 distances, mean of the n-f points nearest to the Krum winner
``bulyan``          El Mhamdi et al.: Krum selection then trimmed mean around the median
``geometric_median``  RFA smoothed Weiszfeld
``norm_bound``      clip to norm M, weighted mean, optional Gaussian noise
``centered_clipping``  Karimireddy et al., iterative clipping around a centre
``foolsgold``       Fung et al. with per-client history, normalised weights
``foolsgold_paper`` per-round, unnormalised (the paper's code)
``residual``        Fu et al. IRLS residual reweighting (the paper's code)
``dnc``             Shejwalkar & Houmansadr, seeded
``fltrust``         Cao et al., trust from a server root update
``safety_probe``    behavioural scores from a server probe set (``safety_probe.py``)
``flame``           Nguyen et al.: HDBSCAN over cosine distances, median-norm clipping, noise
``update_classifier``  a classifier trained on server-simulated updates (``classifier.py``)
==================  =====================================================================

``flame`` needs scikit-learn >= 1.3 (HDBSCAN), an optional dependency (``pip install 'fedsafe[flame]'``);
choosing it without scikit-learn is refused before training.

Deltas or weights
-----------------
The engine passes deltas from the global adapter by default, or raw weights with
``fl.aggregate_on: weights``. Translation-equivariant rules (``rule(U + t) = rule(U) + t``)
give the same new global model either way: ``mean``, ``median*``, ``trimmed_mean*``, ``krum*``,
``multi_krum``, ``bulyan``, ``geometric_median``, ``residual`` and ``dnc`` (its centring makes
the scores shift-free). The others are not and should run on deltas: ``norm_bound`` and
``centered_clipping`` clip norms, ``foolsgold*`` and ``fltrust`` use cosine directions (and
``fltrust`` norms); ``foolsgold_paper`` additionally scales the step by its weights.

Memory
------
Nothing makes a full copy of ``updates``: pairwise quantities come from an ``(n, n)`` Gram
matrix accumulated over column blocks, and coordinate-wise rules work block by block
(parameter ``chunk`` = columns per block, automatic by default). Exceptions: FoolsGold's
history keeps ``d`` floats per client, and ``residual`` stores its replaced values sparsely.

Precision: Gram blocks are fp32 matmuls summed in fp64 after removing the column mean, so
pairwise distances are exact to about 1e-7 of the largest centred squared norm.

Speed
-----
Distance rules cost about one ``(n x d) @ (d x n)`` matmul, linear rules one or two passes
over the data. On CPU (float32/64) the block work runs in numpy on all cores, with torch (MKL)
for the products: numpy sorts many short rows 10-30x faster than torch, and has no per-op
thread synchronisation, which made small ATen ops 10-20x slower on busy cores. The results
are those of the torch code, which GPUs run (tests check the two agree). Exact selections
(median, trimmed mean, Bulyan's second stage, Residual's slopes) use a compiled SIMD sorting
network (``_select.c``, built on first use with the system C compiler into the fedsafe cache;
numpy sorts without one, or with ``FEDSAFE_NATIVE=0``): about 4-5 passes' worth of work on
2 busy cores instead of 10-45. ``residual`` stays ``O(n^2 d)``. ``benchmarks/bench_aggregators.py``
and ``benchmarks/bench_coordinatewise.py`` measure the rules against those baselines.
"""

# Importing the rule modules registers them.
from . import clipping, coordinatewise, dnc, fltrust, foolsgold, geomed, krum, mean  # noqa: F401
from . import classifier, flame, residual, safety_probe  # noqa: F401
from .base import REGISTRY, AggResult, check_params, register, rule_needs
from .forensics import forensics

__all__ = ["REGISTRY", "AggResult", "check_params", "forensics", "register", "rule_needs"]
