"""Agreement with Flower's built-in robust strategies on the same inputs (skipped without flwr).

Each client's vector is sent as two arrays (Flower aggregates array by array, fedsafe on the
flattened vector; coordinate-wise rules must not care). Documented differences, not tested
here: fedsafe's trimmed_mean trims at least one value per side when ``0 < beta * n < 1``
(Flower trims none), and fedsafe's default Bulyan selection is iterative Krum (Flower's is a
single Multi-Krum pass, available as ``selection="multikrum"``).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean  # noqa: E402
from flwr.serverapp.strategy.multikrum import select_multikrum  # noqa: E402

from fedsafe.aggregators import REGISTRY  # noqa: E402

logging.getLogger("flwr").setLevel(logging.WARNING)


def updates(n: int, d: int = 24, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[0] += 8.0  # one outlier so the robust rules have something to reject
    return x


def replies(x: np.ndarray, counts) -> list[Message]:
    """Training replies as a Flower ServerApp would receive them."""
    out = []
    for i, (row, count) in enumerate(zip(x, counts)):
        arrays = ArrayRecord([row[:10].reshape(2, 5), row[10:]])
        metrics = MetricRecord({"num-examples": int(count)})
        content = RecordDict({"arrays": arrays, "metrics": metrics})
        meta = Metadata(
            run_id=1, message_id=f"m{i}", src_node_id=i + 1, dst_node_id=0,
            reply_to_message_id="i", group_id="1", created_at=time.time(), ttl=600.0,
            message_type="train",
        )  # fmt: skip
        out.append(Message(content=content, metadata=meta))
    return out


def flower(strategy, x: np.ndarray, counts=None) -> np.ndarray:
    counts = [1] * len(x) if counts is None else counts
    arrays, _ = strategy.aggregate_train(1, replies(x, counts))
    return np.concatenate([a.ravel() for a in arrays.to_numpy_ndarrays()])


def ours(name: str, x: np.ndarray, counts=None, **params) -> np.ndarray:
    w = None if counts is None else torch.tensor(counts, dtype=torch.float64)
    return REGISTRY[name](torch.from_numpy(x), w, **params).aggregate.numpy()


@pytest.mark.parametrize("n", [5, 6, 9])
def test_median_matches_fedmedian(n):
    x = updates(n, seed=n)
    np.testing.assert_allclose(ours("median", x), flower(FedMedian(), x), rtol=1e-6)


@pytest.mark.parametrize(("n", "beta"), [(10, 0.2), (10, 0.1), (7, 0.3), (20, 0.45), (6, 0.0)])
def test_trimmed_mean_matches_fedtrimmedavg(n, beta):
    x = updates(n, seed=n)
    expected = flower(FedTrimmedAvg(beta=beta), x)
    np.testing.assert_allclose(ours("trimmed_mean", x, beta=beta), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(expected, trim_mean(x, beta), rtol=1e-6)


@pytest.mark.parametrize(("n", "f"), [(5, 1), (9, 2), (12, 3)])
def test_krum_matches_flower_krum(n, f):
    x = updates(n, seed=10 + n)
    np.testing.assert_allclose(ours("krum", x, f=f), flower(Krum(num_malicious_nodes=f), x))


@pytest.mark.parametrize(("n", "f", "m"), [(7, 1, 3), (10, 2, 6), (10, 3, 1)])
def test_multi_krum_matches_flower_multikrum_weighted(n, f, m):
    x = updates(n, seed=20 + n)
    counts = list(range(1, n + 1))
    expected = flower(MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m), x, counts)
    got = ours("multi_krum", x, counts, f=f, m=m)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_multi_krum_selection_matches_select_multikrum():
    x = updates(9, seed=30)
    contents = [msg.content for msg in replies(x, [1] * 9)]
    picked = select_multikrum(contents, num_malicious_nodes=2, num_nodes_to_select=4)
    flower_idx = sorted(contents.index(c) for c in picked)
    res = REGISTRY["multi_krum"](torch.from_numpy(x), f=2, m=4)
    assert sorted(res.info["selected"]) == flower_idx


@pytest.mark.parametrize(("n", "f"), [(7, 1), (11, 2), (12, 2)])
def test_bulyan_multikrum_selection_matches_flower_bulyan(n, f):
    x = updates(n, seed=40 + n)
    expected = flower(Bulyan(num_malicious_nodes=f), x)
    got = ours("bulyan", x, f=f, selection="multikrum")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
