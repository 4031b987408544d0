"""Write the routing a strategy actually applied as a moescope trace (variable experts per token).

Storage (see docs/trace-format.md, "Strategy traces"): the manifest's ``routing.top_k`` is the
storage width K, the most experts the strategy can give a token; each (token, layer) row holds its
``count`` experts first, ranked (the model's own choice first), and the remaining K - count slots
hold the missing-id sentinel with weight 0. ``capture.strategy`` names the strategy,
``capture.model_top_k`` the model's own k and ``capture.variable_k`` is true. A reader counts a
token's experts as the slots that are not the sentinel.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moescope.errors import ConfigError
from moescope.strategies.apply import StrategyRouter
from moescope.strategies.rules import Entropy, Mask, Random, Skip, Threshold, TopK, TopP
from moescope.trace import RoutingSpec, TraceWriter
from moescope.trace.schema import default_columns, id_dtype, missing_id


def storage_width(router: StrategyRouter) -> int:
    """The most experts any token can get under the router's plan (the trace's ``top_k``)."""
    spec, widths = router.spec, []
    for s in router.plan.by_layer.values():
        if isinstance(s, TopK | Random):
            widths.append(s.k_)
        elif isinstance(s, Mask | Skip):
            widths.append(spec.top_k)
        elif isinstance(s, TopP):
            widths.append(s.max_)
        elif isinstance(s, Entropy):
            widths.append(s.high_)
        elif isinstance(s, Threshold):
            widths.append(spec.num_experts)
        else:
            widths.append(spec.num_experts)
    if len(router.plan.by_layer) < spec.num_moe_layers:
        widths.append(spec.top_k)
    return max(widths)


def storage_spec(router: StrategyRouter, width: int) -> RoutingSpec:
    """The model's :class:`RoutingSpec` with ``top_k`` the storage width of a strategy trace."""
    return dataclasses.replace(
        router.spec,
        top_k=width,
        moe_layers=list(router.spec.moe_layers),
        module_paths=list(router.spec.module_paths),
    )


def manifest_entries(router: StrategyRouter) -> dict[str, Any]:
    """What a strategy trace's manifest ``capture`` section records about the strategy."""
    return {"strategy": router.plan.spec, "model_top_k": router.spec.top_k, "variable_k": True}


def applied_arrays(router: StrategyRouter, keep: torch.Tensor, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(experts (n, L, width), weights (n, L, width))`` of the rows ``keep`` (N,) bool, sentinel-padded."""
    E = router.spec.num_experts
    rows = keep.reshape(-1).nonzero().squeeze(1)
    n, L = int(rows.numel()), router.spec.num_moe_layers
    experts = np.full((n, L, width), missing_id(E), id_dtype(E))
    weights = np.zeros((n, L, width), np.float32)
    for j, a in enumerate(router.applied):
        if a is None:
            raise ConfigError(f"{router.spec.module_paths[j]}: no routing recorded in the last forward")
        ids, w, c = (
            a.ids[rows.to(a.ids.device)].cpu(),
            a.weights[rows.to(a.ids.device)].float().cpu(),
            a.count[rows.to(a.ids.device)].cpu(),
        )
        K = ids.shape[1]
        if K > width:
            raise ConfigError(
                f"layer {router.spec.moe_layers[j]} used {K} experts, more than the trace width {width}"
            )
        valid = (torch.arange(K).reshape(1, K) < c.reshape(-1, 1)).numpy()
        experts[:, j, :K] = np.where(valid, ids.numpy(), missing_id(E))
        weights[:, j, :K] = np.where(valid, w.numpy(), 0.0)
    return experts, weights


class StrategyTraceWriter:
    """Append the routing of successive forwards under a :class:`StrategyRouter` to a new trace."""

    def __init__(
        self,
        directory: str | Path,
        router: StrategyRouter,
        *,
        model: dict[str, Any] | None = None,
        tool: str = "moescope strategies",
        overwrite: bool = False,
    ) -> None:
        self.router = router
        self.width = storage_width(router)
        spec = storage_spec(router, self.width)
        self.writer = TraceWriter.create(
            directory,
            spec,
            columns=default_columns(weights=True),
            model=model or {},
            capture=manifest_entries(router),
            source={"tool": tool},
            overwrite=overwrite,
        )
        self.doc = 0

    def add(self, input_ids: torch.Tensor, valid: torch.Tensor, label: str = "") -> None:
        """Record the last forward's routing for ``input_ids`` (B, T), one document per valid row."""
        experts, weights = applied_arrays(self.router, valid, self.width)
        lengths = valid.sum(1).tolist()
        doc_id = np.concatenate([np.full(n, self.doc + b) for b, n in enumerate(lengths)]).astype(np.int64)
        position = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
        tokens = input_ids.reshape(-1)[valid.reshape(-1).to(input_ids.device)].cpu().numpy().astype(np.int32)
        self.writer.append(
            doc_id=doc_id, position=position, token_id=tokens, label=label, experts=experts, weights=weights
        )
        self.doc += len(lengths)
        self.writer.commit(self.doc - 1)

    def close(self) -> None:
        self.writer.close()


class StrategyRecorder:
    """The capture engine's recorder interface (``spec``, ``lookahead_columns``, ``run``) under a strategy.

    ``run`` returns ``experts``/``weights`` ``(n, L, K)`` over the valid tokens, K the storage width,
    sentinel-padded as the module docstring says; ``spec.top_k`` is K. With ``logits``,
    ``lookahead`` or ``token_loss`` a :class:`~moescope.capture.engine.RoutingRecorder` rides along
    in the same forward pass: its hooks are installed first, so they see the model's own routing
    call and router outputs, and it returns the router logits (unchanged by a strategy: it edits
    which experts run, not what the router computes), the gate-lookahead predictions (what each
    later router would choose) and the per-token loss of the model *under the strategy*.
    """

    def __init__(
        self,
        model: Any,
        strategy: str,
        *,
        logits: bool = False,
        lookahead: int = 0,
        lookahead_m: int | None = None,
        token_loss: bool = False,
    ) -> None:
        self.model = model
        self.router = StrategyRouter(model, strategy, record=True)
        self.width = storage_width(self.router)
        self.spec = storage_spec(self.router, self.width)
        self.base = None
        if logits or lookahead or token_loss:
            from moescope.capture.engine import RoutingRecorder

            self.base = RoutingRecorder(
                model, logits=logits, lookahead=lookahead, lookahead_m=lookahead_m, token_loss=token_loss
            )
        self.lookahead_columns: list[str] = list(self.base.lookahead_columns) if self.base else []
        self.lookahead_m = (self.base.lookahead_m or self.router.spec.top_k) if lookahead else None

    def manifest_entries(self) -> dict[str, Any]:
        """What the manifest's ``capture`` section records about the strategy."""
        return manifest_entries(self.router)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """One forward pass over a padded batch; routing arrays over the valid tokens, batch-major."""
        with self:
            if self.base is not None:
                out = self.base.run(input_ids, attention_mask)
            else:
                kwargs: dict[str, Any] = {
                    "input_ids": input_ids,
                    "attention_mask": attention_mask,
                    "use_cache": False,
                    "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0),
                }
                with torch.no_grad():
                    self.model(**kwargs)
                out = {}
        experts, weights = applied_arrays(self.router, attention_mask.bool(), self.width)
        out["experts"], out["weights"] = experts, weights
        return out

    def __enter__(self) -> StrategyRecorder:
        if self.base is not None:  # the recorder's hooks first: they see the model's own routing
            self.base.__enter__()
        try:
            self.router.__enter__()
        except BaseException:
            if self.base is not None:
                self.base.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.router.__exit__(*exc)
        if self.base is not None:
            self.base.__exit__(*exc)
