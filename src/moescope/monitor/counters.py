"""Fixed-size routing counters, updated from inside a training forward pass.

Every update is a handful of reductions on tensors the model already made, kept on the model's
device, so nothing is copied to the host until a report and memory does not grow with steps:
the state is ``(L, E)`` counts plus a few ``(L,)`` sums whatever the number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_LN2 = math.log(2.0)


def router_probs(logits: torch.Tensor, router_kind: str) -> torch.Tensor:
    """Router distribution ``(N, E)`` float32: softmax, or sigmoid scores normalised to sum 1.

    The same convention as :func:`moescope.analysis.entropy.token_entropy_bits`.
    """
    z = logits.float()
    if router_kind == "sigmoid":
        s = z.sigmoid()
        return s / s.sum(-1, keepdim=True)
    return z.softmax(-1)


class RoutingCounters:
    """Per-layer sums over the forward passes of one report window.

    Attributes (torch tensors on ``device``, float64)
    -------------------------------------------------
    tokens : (L,) valid tokens routed. counts, first : (L, E) assignments (all k slots) and
    first choices (the largest-weight slot). entropy_sum : (L,) summed router entropy in bits.
    aux_sum : (L,) summed per-forward aux loss. aux_model_sum : () the same pooled over layers.
    forwards : Python int, forward passes counted.
    """

    def __init__(self, num_layers: int, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Zero every counter in place (no reallocation after the first call on a device)."""
        L, E, dev = self.num_layers, self.num_experts, self.device
        f64 = torch.float64
        self.tokens = torch.zeros(L, dtype=f64, device=dev)
        self.counts = torch.zeros(L, E, dtype=f64, device=dev)
        self.first = torch.zeros(L, E, dtype=f64, device=dev)
        self.entropy_sum = torch.zeros(L, dtype=f64, device=dev)
        self.aux_sum = torch.zeros(L, dtype=f64, device=dev)
        self.aux_model_sum = torch.zeros((), dtype=f64, device=dev)
        self.forwards = 0
        self.aux_forwards = 0

    def to(self, device: torch.device | str) -> None:
        """Move the counters to ``device`` (the device the router tensors live on)."""
        device = torch.device(device)
        if device == self.device:
            return
        for name in ("tokens", "counts", "first", "entropy_sum", "aux_sum", "aux_model_sum"):
            setattr(self, name, getattr(self, name).to(device))
        self.device = device

    def add_selection(
        self, j: int, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor | None
    ) -> None:
        """Layer ``j``'s chosen ``ids`` (N, k) and their ``weights`` (N, k); ``mask`` (N,) float64 or None."""
        ids = ids.reshape(-1, ids.shape[-1]).long()
        weights = weights.reshape(ids.shape)
        k = ids.shape[1]
        m = torch.ones(ids.shape[0], dtype=torch.float64, device=ids.device) if mask is None else mask
        self.tokens[j] += m.sum()
        self.counts[j].index_add_(0, ids.reshape(-1), m.repeat_interleave(k))
        first = ids.gather(1, weights.argmax(1, keepdim=True)).squeeze(
            1
        )  # (N,) largest weight, first on ties
        self.first[j].index_add_(0, first, m)

    def add_logits(self, j: int, logits: torch.Tensor, router_kind: str, mask: torch.Tensor | None) -> None:
        """Layer ``j``'s router ``logits`` (N, E): router entropy in bits summed over valid tokens."""
        h = torch.special.entr(router_probs(logits, router_kind)).sum(-1).double() / _LN2  # (N,) bits
        self.entropy_sum[j] += h.sum() if mask is None else (h * mask).sum()

    def add_aux(
        self,
        fn: Callable[..., Any],
        logits: list[torch.Tensor],
        top_k: int,
        attention_mask: torch.Tensor | None,
    ) -> None:
        """The family's ``load_balancing_loss_func`` per layer and over all layers, for one forward."""
        E = self.num_experts
        flat = tuple(lg.reshape(-1, lg.shape[-1]) for lg in logits)
        for j, lg in enumerate(flat):
            self.aux_sum[j] += torch.as_tensor(fn((lg,), E, top_k, attention_mask), dtype=torch.float64)
        self.aux_model_sum += torch.as_tensor(fn(flat, E, top_k, attention_mask), dtype=torch.float64)
        self.aux_forwards += 1

    def host(self) -> dict[str, np.ndarray]:
        """The counters as NumPy arrays (one device-to-host copy each)."""
        return {
            "tokens": self.tokens.cpu().numpy(),
            "counts": self.counts.cpu().numpy(),
            "first": self.first.cpu().numpy(),
            "entropy_sum": self.entropy_sum.cpu().numpy(),
            "aux_sum": self.aux_sum.cpu().numpy(),
            "aux_model_sum": self.aux_model_sum.cpu().numpy(),
        }

    def nbytes(self) -> int:
        """Bytes held by the counters (constant for a given model)."""
        names = ("tokens", "counts", "first", "entropy_sum", "aux_sum", "aux_model_sum")
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in names)
