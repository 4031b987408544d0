"""Gate lookahead: which experts would MoE layer l+d pick, judged from what is known at layer l?

Two sources of the hidden state, the ones FIELD-NOTES 4 says to compare:

- ``gate_input``: layer l's router input, fed to the router of MoE layer l+d (what
  Mixtral-offloading, AdapMoE and BigMoeOnEdge do);
- ``residual``: the residual stream after decoder layer l, normalised by the pre-MoE norm of
  layer l+d's decoder layer, then fed to its router.

The router module itself is called, so its whole selection logic (correction bias, group limits,
sparsemixer) picks the first k ids. Prefetching with a budget m > k needs a ranking beyond the
router's own choice, and biased or grouped routers define only a top-k *set*. We keep that set
first (ordered by the router's selection score) and rank the remaining experts by the same score
the router selects with: the router's probability transform of its logits plus its correction
bias when it has one (DeepSeek-V3/GLM4 ``sigmoid + e_score_correction_bias``, Ernie4.5
``softmax + bias``), ignoring group limits, which only say which k to take. For unbiased routers
this is exactly ``topk(logits, m)`` with the router's own top-k in front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moescope.core.families import FamilySpec
from moescope.errors import ConfigError
from moescope.trace import RoutingSpec
from moescope.trace.schema import LOOKAHEAD_VARIANTS, lookahead_column


def extend_ranking(scores: torch.Tensor, chosen: torch.Tensor, m: int) -> torch.Tensor:
    """``(N, m)`` ids: the router's ``chosen`` (N, k) ordered by score, then the best others by score."""
    chosen = chosen.long()
    order = torch.argsort(scores.gather(1, chosen), dim=1, descending=True, stable=True)
    first = chosen.gather(1, order)  # (N, k)
    k = chosen.shape[1]
    if m == k:
        return first
    rest = torch.topk(scores.scatter(1, chosen, float("-inf")), m - k, dim=-1).indices  # (N, m-k)
    return torch.cat([first, rest], dim=1)


@dataclass
class LookaheadPlan:
    """Where the lookahead hidden states come from and how they are normalised for layer l+d."""

    distances: int
    variants: tuple[str, ...]
    decoder_layers: list[torch.nn.Module]  # decoder layer of each MoE layer
    norms: list[torch.nn.Module]  # pre-MoE norm of each MoE layer's decoder layer

    @classmethod
    def build(
        cls,
        model: torch.nn.Module,
        spec: RoutingSpec,
        fam: FamilySpec,
        distances: int,
    ) -> LookaheadPlan:
        layers, norms = [], []
        for path in spec.module_paths:
            layer_path = path.rsplit(".", 1)[0]  # the decoder layer holding the block
            layer = model.get_submodule(layer_path)
            try:
                norm = layer.get_submodule(fam.pre_moe_norm)
            except AttributeError:
                raise ConfigError(
                    f"{layer_path}: no pre-MoE norm {fam.pre_moe_norm!r} for residual lookahead"
                ) from None
            layers.append(layer)
            norms.append(norm)
        if distances >= spec.num_moe_layers:
            raise ConfigError(
                f"option lookahead={distances} must be smaller than the number of MoE layers ({spec.num_moe_layers})"
            )
        return cls(distances, tuple(LOOKAHEAD_VARIANTS), layers, norms)

    @property
    def columns(self) -> list[str]:
        return [lookahead_column(v, d) for v in self.variants for d in range(1, self.distances + 1)]

    def install(self, sink: Callable[[Any, str, int, torch.Tensor], None]) -> list[Any]:
        """Forward hooks on each MoE layer's decoder layer, feeding its output to ``sink``."""
        from moescope.capture.engine import ACTIVE_COLLECTOR

        handles = []
        for j, layer in enumerate(self.decoder_layers):

            def hook(module: torch.nn.Module, args: tuple, out: Any, j: int = j) -> None:
                col = ACTIVE_COLLECTOR.get()
                if col is None or col.suspended:
                    return
                sink(col, "residual", j, out[0] if isinstance(out, tuple) else out)

            handles.append(layer.register_forward_hook(hook))
        return handles

    def prepare(self, variant: str, source: int, target: int, x: torch.Tensor) -> torch.Tensor:
        """The ``(N, H)`` input for MoE layer ``target``'s router, from ``source``'s hidden state."""
        if variant == "residual":
            norm = self.norms[target]
            dev = next(norm.parameters()).device
            x = norm(x.to(dev))
        return x.reshape(-1, x.shape[-1])
