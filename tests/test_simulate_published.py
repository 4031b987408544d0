"""The sourced cost fields of :class:`Deployment` used by ``benchmarks/simulate_published.py``.

Each expected time is written out by formula (latency + bytes / bandwidth, bytes / GPU bandwidth),
independently of the engine's code.
"""

from __future__ import annotations

import numpy as np
import pytest

from moescope.errors import ConfigError
from moescope.simulate import LRU, Deployment, ModelCost, Tier, run
from moescope.simulate.deployment import compute_times
from moescope.simulate.engine import Steps


def _one_layer(demand: list[list[int]], E: int = 4) -> Steps:
    d = np.asarray(demand, np.int16)[:, None, :]  # (S, 1, k)
    S = d.shape[0]
    return Steps(
        d, np.ones(S, np.int64), np.r_[True, np.zeros(S - 1, bool)], np.arange(S), E, np.zeros((1, E))
    )


def test_expert_read_bytes_one_layer_one_miss_by_hand():
    """One token, one layer, one missing expert: link time + (dense + expert traffic) / GPU bandwidth."""
    cost = ModelCost(expert_params=1000, bytes_per_param=0.5, dense_params_per_layer=300, top_k=1)
    gpu_gbs, link_gbs, lat_us = 2.0, 1.0, 7.0
    dep = Deployment("d", 1.0, gpu_gbs, 1e3, [Tier("host", None, link_gbs, lat_us)])
    link = lat_us * 1e-6 + 1000 * 0.5 / (link_gbs * 1e9)
    base = run(_one_layer([[1]]), LRU().fit(), np.array([2]), dep, cost)
    assert base.total_s == pytest.approx(link + (300 * 0.5 + 1000 * 0.5) / (gpu_gbs * 1e9))
    # dequantising kernels move 1.875 bytes per expert parameter; the link still moves the stored 0.5
    hqq = run(
        _one_layer([[1]]), LRU().fit(), np.array([2]), dep.replace(expert_read_bytes_per_param=1.875), cost
    )
    assert hqq.total_s == pytest.approx(link + (300 * 0.5 + 1000 * 1.875) / (gpu_gbs * 1e9))
    assert hqq.stall_s.sum() == pytest.approx(base.stall_s.sum())


def test_expert_read_bytes_counts_each_distinct_expert_once():
    """Two tokens, the second hitting: every distinct expert of a step is read once per step."""
    cost = ModelCost(expert_params=100, bytes_per_param=1.0, top_k=2)
    dep = Deployment("d", 1.0, 1.0, 1e3, [Tier("host", None, 1.0, 0.0)], expert_read_bytes_per_param=3.0)
    res = run(_one_layer([[0, 1], [1, 0]]), LRU().fit(), np.array([2]), dep, cost)
    loads = 2 * 100 * 1.0 / 1e9  # two misses in the first step, none in the second
    compute = 2 * (2 * 100 * 3.0 / 1e9)  # two steps, two experts each at 3 bytes per parameter
    assert res.total_s == pytest.approx(loads + compute)
    direct = compute_times(dep, cost, np.array([1.0]), np.array([[0, 1, 2]]))
    assert direct[0].tolist() == pytest.approx([0.0, 300 / 1e9, 600 / 1e9])


def test_expert_read_bytes_default_is_the_storage_width_and_bad_values_are_named():
    cost = ModelCost(expert_params=10, bytes_per_param=2.0, dense_params_per_layer=5, top_k=1)
    dep = Deployment("d", 1.0, 1.0, 1e3, [Tier("host", None, 1.0, 0.0)])
    same = dep.replace(expert_read_bytes_per_param=2.0)
    u = np.array([[0, 1, 3]])
    assert (
        compute_times(dep, cost, np.array([1.0]), u).tolist()
        == compute_times(same, cost, np.array([1.0]), u).tolist()
    )
    with pytest.raises(ConfigError, match="expert_read_bytes_per_param"):
        run(_one_layer([[1]]), LRU().fit(), np.array([2]), dep.replace(expert_read_bytes_per_param=0.0), cost)


def test_copies_per_load_with_two_directions_by_hand():
    """A swap whose device-to-host copy runs at another speed: copies_per_load = 1 + H2D / D2H."""
    cost = ModelCost(expert_params=1000, bytes_per_param=1.0, top_k=1)
    h2d, d2h = 2.0, 4.0  # GB/s
    dep = Deployment(
        "d",
        1.0,
        1e3,
        1e3,
        [Tier("host", None, h2d, 0.0)],
        compute_ms_per_layer=0.0,
        copies_per_load=1 + h2d / d2h,
    )
    res = run(_one_layer([[1]]), LRU().fit(), np.array([2]), dep, cost)
    assert res.total_s == pytest.approx(1000 / (h2d * 1e9) + 1000 / (d2h * 1e9))
