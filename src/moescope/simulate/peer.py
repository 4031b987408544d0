"""Cross-check with the peer tool moe-policylang (PyPI), whose ``benchmark.replay`` replays LRU and Belady.

Its replay keeps one cache per (layer, prompt), so the equivalent moescope run is per-layer capacity
with ``reset="document"``; its budget is ``max(top_k, round(E * fraction))`` slots per layer. It
serves a token's experts one at a time in ``argpartition`` order, where moescope decides a step's
hits before any eviction, so the two can differ by the few accesses where that order matters.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moescope.errors import ConfigError


def available() -> bool:
    """Whether moe-policylang is importable."""
    try:
        import moe_policylang.benchmark.replay  # noqa: F401
    except ImportError:
        return False
    return True


def to_recording(trace: Any) -> Any:
    """The trace as a moe-policylang ``TraceRecording`` (a one-hot-like softmax over the top-k)."""
    if not available():
        raise ConfigError("moe-policylang is not installed: pip install moe-policylang")
    from moe_policylang.integrations.trace_recorder import TraceEntry, TraceRecording

    E, k, L = trace.num_experts, trace.top_k, trace.num_layers
    rec = TraceRecording(
        model_name=str(trace.path), num_layers=L, num_experts=E, top_k=k, records_full_softmax=True
    )
    rank_mass = (k - np.arange(k)) / (k * (k + 1) / 2)
    for b in trace.iter_batches(["doc_id", "position", "experts"]):
        for i in range(len(b)):
            for layer in range(L):
                ids = b.experts[i, layer]
                if (ids == trace.missing_id).any():
                    continue
                probs = np.zeros(E)
                probs[ids.astype(np.int64)] = rank_mass
                rec.entries.append(
                    TraceEntry(
                        prompt_id=int(b.doc_id[i]),
                        token_idx=int(b.position[i]),
                        layer_idx=layer,
                        selected_experts=ids.astype(int).tolist(),
                        router_softmax=probs.tolist(),
                    )
                )
    return rec


def peer_budget(num_experts: int, top_k: int, fraction: float) -> int:
    """The per-layer slots moe-policylang uses for a budget fraction."""
    return max(top_k, round(num_experts * fraction))


def peer_hit_rates(
    recording: Any, top_k: int, fraction: float, policies: tuple[str, ...] = ("topk_lru", "belady")
) -> dict[str, float]:
    """Hit rates from moe-policylang's own replay (``replay_policies``)."""
    from moe_policylang.benchmark.replay import replay_policies

    out = replay_policies(recording, top_k, policies=policies, budget_fractions=(fraction,))
    return {r.label: r.hit_rate for r in out}
