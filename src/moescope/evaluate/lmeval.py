"""lm-evaluation-harness plug-in: ``lm_eval --model moescope --model_args pretrained=PATH,strategy=S``.

The ``moescope`` model type is lm-eval's ``hf`` model with a routing strategy applied in every
forward pass (:class:`~moescope.strategies.StrategyRouter`). Extra ``model_args``:

``strategy``
    a strategy spec (``topp:p=0.7``; per-layer items joined by ``;`` cannot be written inside
    ``--model_args``, whose separator is ``,``: write them with ``|`` instead, e.g.
    ``topk:k=1@0|topp:p=0.9``). Default: the model's own routing.
``trace``
    a directory to record the routing actually applied as a moescope trace (one document per
    sequence lm-eval scores; right padding excluded).

lm-eval's results gain ``config.moescope_strategy``, ``config.moescope_mean_active_experts`` and
``config.moescope_active_per_layer`` (mean experts per token over every non-padding position the
model processed). Importing this module registers the model type; the package's ``lm_eval``
entry point makes the CLI find it without an import.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from moescope.strategies import StrategyRouter


@register_model("moescope")
class MoescopeLM(HFLM):
    """lm-eval's ``HFLM`` with a moescope routing strategy applied and active experts counted."""

    def __init__(
        self, pretrained: Any = None, strategy: str | None = None, trace: str | None = None, **kwargs: Any
    ):
        super().__init__(pretrained=pretrained, **kwargs)
        spec = (strategy or "baseline").replace("|", ";")
        self.moescope_router = StrategyRouter(self.model, spec, record=True)
        L = self.moescope_router.spec.num_moe_layers
        self._active_sums = np.zeros(L)
        self._active_tokens = 0
        self._trace = None
        if trace:
            from moescope.strategies.trace import StrategyTraceWriter

            self._trace = StrategyTraceWriter(
                trace, self.moescope_router, model={"name": str(pretrained)}, tool="lm-eval --model moescope"
            )

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ):
        with self.moescope_router:
            out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        valid = _unpadded(inps) if attn_mask is None else attn_mask.bool()
        mask = valid.reshape(-1)
        for j, a in enumerate(self.moescope_router.applied):
            if a is not None:
                self._active_sums[j] += float(a.count.reshape(-1)[mask.to(a.count.device)].float().sum())
        self._active_tokens += int(mask.sum())
        if self._trace is not None:
            self._trace.add(inps, valid.cpu())
        return out

    def mean_active_per_layer(self) -> list[float]:
        """Mean experts per processed token at each MoE layer, so far."""
        return (self._active_sums / max(self._active_tokens, 1)).tolist()

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        per_layer = self.mean_active_per_layer()
        if self._trace is not None:
            self._trace.close()
        info.update(
            {
                "moescope_strategy": self.moescope_router.plan.spec,
                "moescope_mean_active_experts": float(np.mean(per_layer)),
                "moescope_active_per_layer": per_layer,
                "moescope_model_top_k": self.moescope_router.spec.top_k,
            }
        )
        return info


def _unpadded(inps: torch.Tensor) -> torch.Tensor:
    """Positions before each row's right padding (lm-eval pads causal batches on the right with 0)."""
    nonzero = inps != 0
    last = torch.where(nonzero.any(1), inps.shape[1] - nonzero.flip(1).int().argmax(1), 0)
    return torch.arange(inps.shape[1], device=inps.device).reshape(1, -1) < last.reshape(-1, 1)


if __name__ == "__main__":  # python -m moescope.evaluate.lmeval --model moescope ... (lm_eval's own CLI)
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
