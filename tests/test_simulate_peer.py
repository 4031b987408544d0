"""Cross-check against moe-policylang's replay (runs only when the peer package is installed)."""

from __future__ import annotations

import numpy as np
import pytest

from moescope.simulate import LRU, Belady, ModelCost, get_preset, simulate
from moescope.simulate.peer import available, peer_budget, peer_hit_rates, to_recording

pytestmark = pytest.mark.skipif(not available(), reason="moe-policylang is not installed")

COST = ModelCost(expert_params=1000, top_k=2)


def _ours(tr, fraction):
    cap = np.full(tr.num_layers, peer_budget(tr.num_experts, tr.top_k, fraction))
    dep = get_preset("rtx4090-pcie4")
    return {
        name: simulate(tr, pol, cap, dep, COST, reset="document").summary()["hit_rate"]
        for name, pol in (("topk_lru", LRU()), ("belady", Belady()))
    }


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_lru_identical_to_peer_at_top1(synthetic, fraction):
    """With one expert per token the two replays' LRU semantics coincide: identical hit rates."""
    tr = synthetic(n_tokens=600, top_k=1)
    peer = peer_hit_rates(to_recording(tr), tr.top_k, fraction)
    ours = _ours(tr, fraction)
    assert ours["topk_lru"] == peer["topk_lru"]
    # ours may stream a miss (MIN with bypass); the peer always inserts, so it can only do worse
    assert ours["belady"] >= peer["belady"]


def test_belady_not_below_peer_at_top2(synthetic):
    """The peer serves a token's experts one by one and may evict one the token still needs; our
    MIN decides the step's hits first and is optimal (tests/test_simulate.py), so it is never lower."""
    tr = synthetic(n_tokens=600, top_k=2)
    peer = peer_hit_rates(to_recording(tr), tr.top_k, 0.25)
    ours = _ours(tr, 0.25)
    assert ours["belady"] >= peer["belady"]
    assert ours["topk_lru"] <= ours["belady"]
