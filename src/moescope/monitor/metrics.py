"""Per-layer routing metrics from the monitor's fixed-size counters, and their summary across layers.

The definitions are those of the offline analyses (FIELD-NOTES section 3), checked equal to
:func:`moescope.analysis.load.load_summary` and :func:`moescope.analysis.entropy.routing_entropy`
on the same routing by ``tests/test_monitor.py``:

- ``load_cv``: std/mean of the per-expert assignment counts (every top-k slot, ddof 0), unitless.
- ``max_vio``: MaxVio = max/mean - 1 of the same counts (Loss-Free Balancing, arXiv 2408.15664).
- ``gini``: Gini coefficient of the counts (0 = equal, (E-1)/E = one expert takes all).
- ``dead_experts``: experts whose share of the layer's assignments is below ``dead_share``.
- ``entropy_bits``: mean over tokens of the router's entropy in bits (softmax of the logits;
  sigmoid routers: sigmoid scores normalised to sum 1); ``entropy_norm`` divides by log2 E.
- ``first_max_share``: the largest share of tokens that one expert gets as first choice.
- ``aux_loss``: the family's own ``load_balancing_loss_func`` applied to this layer's logits of
  one forward pass, averaged over the window's forward passes (balanced = k, collapsed = E).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.analysis.load import gini

#: Metrics reported per layer, in this order.
LAYER_METRICS = (
    "load_cv",
    "max_vio",
    "gini",
    "dead_experts",
    "entropy_bits",
    "entropy_norm",
    "first_max_share",
    "aux_loss",
)

#: Statistics across layers of every per-layer metric (percentiles interpolate linearly, NumPy's default).
SUMMARY_STATS = ("mean", "min", "max", "p10", "p50", "p90")


def layer_metrics(
    counts: np.ndarray,
    first: np.ndarray,
    tokens: np.ndarray,
    entropy_sum: np.ndarray,
    aux_sum: np.ndarray,
    forwards: int,
    *,
    top_k: int,
    dead_share: float,
) -> dict[str, np.ndarray]:
    """Every metric of :data:`LAYER_METRICS` as an ``(L,)`` array; NaN for a layer that saw no token.

    ``counts`` and ``first`` are ``(L, E)`` assignment and first-choice counts, ``tokens`` the
    valid tokens per layer, ``entropy_sum`` the summed per-token entropy in bits, ``aux_sum`` the
    summed per-forward aux loss of each layer over ``forwards`` forward passes.
    """
    counts = np.asarray(counts, np.float64)  # (L, E)
    L, E = counts.shape
    T = np.asarray(tokens, np.float64)  # (L,)
    seen = T > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = counts.mean(1)
        share = counts / (top_k * T[:, None])
        out = {
            "load_cv": counts.std(1, ddof=0) / mean,
            "max_vio": counts.max(1) / mean - 1.0,
            "gini": np.array([gini(c) if s else np.nan for c, s in zip(counts, seen, strict=True)]),
            "dead_experts": np.where(seen, (share < dead_share).sum(1), np.nan).astype(np.float64),
            "entropy_bits": np.asarray(entropy_sum, np.float64) / T,
            "first_max_share": np.asarray(first, np.float64).max(1) / T,
            "aux_loss": np.asarray(aux_sum, np.float64) / forwards if forwards else np.full(L, np.nan),
        }
    out["entropy_norm"] = out["entropy_bits"] / np.log2(E) if E > 1 else np.full(L, np.nan)
    return {name: np.where(seen, out[name], np.nan) for name in LAYER_METRICS}


def summarise(values: np.ndarray) -> dict[str, float]:
    """Mean, min, max and 10th/50th/90th percentiles across layers, ignoring NaN (all NaN: empty)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {
        "mean": float(v.mean()),
        "min": float(v.min()),
        "max": float(v.max()),
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
    }


@dataclass
class RoutingReport:
    """What the monitor saw between two reports.

    Attributes
    ----------
    step : the training step the report closes.
    layers : decoder-layer index of each MoE layer.
    tokens : valid tokens routed per MoE layer in the window (the same for every layer).
    forwards : forward passes counted in the window.
    per_layer : each metric of :data:`LAYER_METRICS` as an ``(L,)`` array.
    summary : ``{metric: {stat: value}}`` across layers, stats from :data:`SUMMARY_STATS`.
    aux_loss_model : the family's aux loss over all layers pooled (what the model adds to its
        loss, before the coefficient), averaged over the window's forward passes; None without one.
    load_share, first_share : ``(L, E)`` shares of assignments and of first choices.
    dead_share : the share of a layer's assignments under which an expert counts as dead.
    alerts : alerts raised on this report (see :mod:`moescope.monitor.alerts`).
    """

    step: int
    layers: list[int]
    tokens: int
    forwards: int
    per_layer: dict[str, np.ndarray]
    summary: dict[str, dict[str, float]]
    aux_loss_model: float | None
    load_share: np.ndarray
    first_share: np.ndarray
    dead_share: float = 0.001
    alerts: list[Any] = field(default_factory=list)

    def scalars(
        self, prefix: str = "moe/", *, per_layer: bool = True, per_expert: bool = False
    ) -> dict[str, float]:
        """Flat ``name -> value`` for a tracker.

        Always: ``<prefix><metric>/<stat>`` for every metric and stat, ``tokens`` and
        ``aux_loss_model``, i.e. 8 x 6 + 2 series whatever the model's size. ``per_layer`` adds
        ``<metric>/layer_<i>`` (8 x L series); ``per_expert`` adds ``load_share/layer_<i>/expert_<e>``
        and ``first_share/...`` (2 x L x E series, only when asked).
        """
        out: dict[str, float] = {f"{prefix}tokens": float(self.tokens)}
        if self.aux_loss_model is not None:
            out[f"{prefix}aux_loss_model"] = self.aux_loss_model
        for metric, stats in self.summary.items():
            for stat, value in stats.items():
                out[f"{prefix}{metric}/{stat}"] = value
        if per_layer:
            for metric, values in self.per_layer.items():
                for layer, v in zip(self.layers, values, strict=True):
                    if np.isfinite(v):
                        out[f"{prefix}{metric}/layer_{layer:02d}"] = float(v)
        if per_expert:
            for name, arr in (("load_share", self.load_share), ("first_share", self.first_share)):
                for layer, row in zip(self.layers, arr, strict=True):
                    for e, v in enumerate(row):
                        if np.isfinite(v):
                            out[f"{prefix}{name}/layer_{layer:02d}/expert_{e:03d}"] = float(v)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per MoE layer (``step``, ``layer``, ``tokens`` and every metric), for CSV/JSONL."""
        rows = []
        for i, layer in enumerate(self.layers):
            row: dict[str, Any] = {"step": self.step, "layer": layer, "tokens": self.tokens}
            for metric in LAYER_METRICS:
                v = float(self.per_layer[metric][i])
                row[metric] = v if np.isfinite(v) else None
            rows.append(row)
        return rows
