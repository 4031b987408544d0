"""Apply a routing strategy at run time where each family consumes its routing; no weight is edited.

The hooks sit at the ablation's points (:mod:`moescope.ablate.hooks`): a forward pre-hook on
``<block>.experts`` rewrites the ``(top_k_index, top_k_weights)`` it is called with, a forward hook
on the router keeps its logits, and Llama4/JetMoE routers have their output decoded, edited and
encoded back. A strategy returns the experts each token uses; this module turns that set into what
the block consumes:

- the kept experts, ranked (the model's own choice first), fill the first ``count`` slots of an
  ``(N, K)`` call, ``K`` the largest count in the batch; the other slots repeat the token's first
  expert with weight 0, which adds exactly nothing (x + 0 == x), so tokens may use 0..E experts;
- kept experts are weighted by the family's own rule (:func:`moescope.ablate.hooks.rule_weights`:
  Mixtral's renormalised softmax, DeepSeek-V3's unbiased sigmoid normalised and scaled, ...), or
  keep the model's weights for ``drop``-style strategies (``mask``, ``skip``);
- a token whose set equals the model's own keeps its exact ids and weights, in their slot order, so
  ``topk`` at the model's k is bit-identical to no strategy.

With ``record=True`` the routing actually applied in the last forward is kept per MoE layer:
``ids`` (N, K), ``weights`` (N, K) and ``count`` (N,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moescope.core.families import resolve_adapter, text_config
from moescope.core.routing import (
    HookSet,
    call_arg,
    choice_scores,
    decode_router_output,
    encode_router_output,
    moe_sites,
    replace_arg,
    routing_spec,
    rule_weights,
)
from moescope.errors import ConfigError
from moescope.strategies.base import ModelFacts, Routing
from moescope.strategies.spec import StrategyPlan, parse_strategy


@dataclass
class Applied:
    """The routing one MoE layer used in one forward: ``ids``/``weights`` (N, K), ``count`` (N,)."""

    ids: torch.Tensor
    weights: torch.Tensor
    count: torch.Tensor


def model_facts(model_or_spec: Any) -> ModelFacts:
    """The :class:`ModelFacts` of a model (or a :class:`~moescope.trace.RoutingSpec`)."""
    spec = model_or_spec if hasattr(model_or_spec, "moe_layers") else routing_spec(model_or_spec)
    return ModelFacts(
        num_experts=spec.num_experts,
        top_k=spec.top_k,
        family=spec.family,
        moe_layers=tuple(spec.moe_layers),
        router_kind=spec.router_kind,
    )


def materialise(
    strategy: Any, rule: Any, routing: Routing, ids: torch.Tensor, weights: torch.Tensor
) -> Applied:
    """Turn ``strategy.select(routing)`` into the ``(N, K)`` ids and weights the block consumes."""
    keep = strategy.select(routing)
    if strategy.min_experts > 0:
        keep = keep | torch.zeros_like(keep).scatter(1, routing.probs.argmax(1, keepdim=True), True) & (
            keep.sum(1, keepdim=True) == 0
        )
    if not strategy.reweight and bool((keep & ~routing.model_mask).any()):
        raise ConfigError(
            f"strategy {strategy.name} kept experts outside the model's choice but does not reweight"
        )
    count = keep.sum(1)  # (N,)
    k = ids.shape[1]
    same = (count == k) & (keep == routing.model_mask).all(1)
    if bool(same.all()):
        return Applied(ids, weights, count)
    K = max(int(count.max()), 1)
    ranked_keep = keep.gather(1, routing.ranking)  # (N, E) in rank order
    order = torch.argsort((~ranked_keep).to(torch.int8), dim=1, stable=True)
    sel = routing.ranking.gather(1, order)[:, :K]  # kept first, in rank order
    valid = torch.arange(K, device=sel.device).reshape(1, K) < count.reshape(-1, 1)
    sel = torch.where(valid, sel, sel[:, :1])
    w = torch.zeros(sel.shape, dtype=torch.float32, device=sel.device)
    if strategy.reweight:
        for c in torch.unique(count).tolist():
            rows = (count == c).nonzero().squeeze(1)
            if c > 0 and rows.numel():
                w[rows, :c] = rule_weights(rule, routing.logits[rows], sel[rows, :c]).float()
    else:
        dense = torch.zeros(routing.logits.shape, dtype=torch.float32, device=sel.device)
        dense.scatter_(1, ids.long(), weights.float())
        w = dense.gather(1, sel)
    w = torch.where(valid, w, 0.0)
    new_ids = sel.to(ids.dtype)
    new_w = w.to(weights.dtype)
    if bool(same.any()):  # unchanged tokens keep their exact ids, weights and slot order
        rows = same.nonzero().squeeze(1)
        new_ids[rows, :k] = ids[rows]
        new_w[rows, :k] = weights[rows]
        if K > k:
            new_ids[rows, k:] = ids[rows, :1]
            new_w[rows, k:] = 0
    return Applied(new_ids, new_w, count)


class StrategyRouter(HookSet):
    """Context manager applying a strategy plan to every MoE block of a model.

    Parameters
    ----------
    model : a transformers causal LM of a family in :mod:`moescope.core.families`.
    strategy : a spec string (:func:`~moescope.strategies.spec.parse_strategy`) or a plan.
    record : keep the routing applied in the last forward (:attr:`applied`).
    samples : calibration logits ``{decoder layer: (m, E)}`` for a ``pvalue`` item without density.

    Examples
    --------
    >>> from moescope.capture.tiny import tiny_model
    >>> model = tiny_model("mixtral")
    >>> with StrategyRouter(model, "topp:p=0.5", record=True) as router:
    ...     _ = model(torch.tensor([[5, 6, 7]]))
    >>> router.applied[0].count.shape
    torch.Size([3])
    """

    def __init__(
        self,
        model: torch.nn.Module,
        strategy: str | StrategyPlan | None,
        *,
        record: bool = False,
        samples: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.model = model
        self.record = record
        self.spec = routing_spec(model)
        self.family = resolve_adapter(self.spec.family)
        self.facts = model_facts(self.spec)
        plan = strategy if isinstance(strategy, StrategyPlan) else parse_strategy(strategy)
        self.plan = plan.fit(self.facts, samples)
        config = text_config(model.config)
        self._rule = self.family.weight_rule(config) if self.family.weight_rule else None
        if self._rule is None and any(s.reweight for s in self.plan.by_layer.values()):
            raise ConfigError(
                f"{self.spec.family}: the adapter row has no weight_rule, so strategies cannot reweight"
            )
        sites = moe_sites(model, self.spec, self.family)
        self._blocks = [site.block for site in sites]
        self._routers = [site.router for site in sites]
        L = self.spec.num_moe_layers
        self._strategies = [self.plan.by_layer.get(layer) for layer in self.spec.moe_layers]
        self._logits: list[torch.Tensor | None] = [None] * L
        self.applied: list[Applied | None] = [None] * L
        self._init_hooks()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with self._lock:
            if self._depth == 0:
                self._logits = [None] * self.spec.num_moe_layers

    def _install(self) -> None:
        fam = self.family
        for j, (block, router) in enumerate(zip(self._blocks, self._routers, strict=True)):
            if self._strategies[j] is None and not self.record:
                continue
            if fam.selection == "experts_call":
                experts = getattr(block, fam.experts, None) if fam.experts else None
                if experts is None:
                    raise ConfigError(f"{self.spec.module_paths[j]}: no {fam.experts!r} module to hook")
                self._handles.append(
                    experts.register_forward_pre_hook(self._experts_hook(j), with_kwargs=True, prepend=True)
                )
                self._handles.append(router.register_forward_hook(self._logits_hook(j), prepend=True))
            else:
                self._handles.append(router.register_forward_hook(self._router_hook(j, block), prepend=True))

    def edit(self, j: int, ids: torch.Tensor, w: torch.Tensor, logits: torch.Tensor | None) -> Applied:
        """The routing MoE layer ``j`` (0..L-1) uses instead of the model's ``ids``/``w``."""
        strategy = self._strategies[j]
        if strategy is None:
            return Applied(ids, w, torch.full((ids.shape[0],), ids.shape[1], device=ids.device))
        if logits is None:
            raise ConfigError(f"{self.spec.module_paths[j]}: no router logits seen before the experts call")
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] != ids.shape[0]:
            raise ConfigError(
                f"{self.spec.module_paths[j]}: router logits cover {logits.shape[0]} tokens, the experts call {ids.shape[0]}"
            )
        scores = choice_scores(self.family, self._routers[j], logits)
        routing = Routing(logits, ids, w, scores, self.family.router_kind, self.spec.moe_layers[j])
        return materialise(strategy, self._rule, routing, ids, w)

    def _logits_hook(self, j: int):
        index = self.family.logits_index

        def hook(module: torch.nn.Module, args: tuple, out: Any) -> None:
            self._logits[j] = out if index is None else out[index]

        return hook

    def _experts_hook(self, j: int):
        fam = self.family

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            ids = call_arg(args, kwargs, fam.index_arg, fam.index_kwarg)
            w = call_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg)
            if ids is None or w is None:
                raise ConfigError(
                    f"{self.spec.module_paths[j]}.{fam.experts}: call carries no {fam.index_kwarg}/{fam.weights_kwarg}"
                )
            out = self.edit(j, ids, w, self._logits[j])
            self._logits[j] = None
            if self.record:
                self.applied[j] = _detached(out)
            if out.ids is ids and out.weights is w:
                return None
            args, kwargs = replace_arg(args, kwargs, fam.index_arg, fam.index_kwarg, out.ids)
            args, kwargs = replace_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg, out.weights)
            return args, kwargs

        return hook

    def _router_hook(self, j: int, block: torch.nn.Module):
        fam = self.family
        E, k = self.spec.num_experts, self.spec.top_k

        def hook(module: torch.nn.Module, args: tuple, out: Any):
            ids, w = decode_router_output(fam, block, out, k)
            logits = out if fam.logits_index is None else out[fam.logits_index]
            res = self.edit(j, ids, w, logits)
            if self.record:
                self.applied[j] = _detached(res)
            if res.ids is ids and res.weights is w:
                return None
            return _encode(fam, out, res.ids, res.weights, E)

        return hook

    def mean_active(self, attention_mask: torch.Tensor | None = None) -> np.ndarray:
        """Mean experts per valid token at each MoE layer in the last forward (needs ``record``)."""
        out = []
        for j, a in enumerate(self.applied):
            if a is None:
                raise ConfigError(
                    f"{self.spec.module_paths[j]}: nothing recorded (record=True, then a forward)"
                )
            c = a.count.float()
            if attention_mask is not None:
                m = attention_mask.reshape(-1).to(c.device).bool()
                c = c[m]
            out.append(float(c.mean()) if c.numel() else float("nan"))
        return np.array(out)


def _detached(a: Applied) -> Applied:
    return Applied(a.ids.detach(), a.weights.detach(), a.count.detach())


def _encode(fam: Any, out: Any, ids: torch.Tensor, w: torch.Tensor, num_experts: int) -> Any:
    """The router output a Llama4/JetMoE block consumes, rebuilt from ``ids``/``w`` (N, K).

    Padding slots repeat a kept id with weight 0, so dense scores are built by adding.
    """
    if fam.selection == "router_dense_scores":
        scores = torch.zeros_like(out[0]).scatter_add(1, ids.long(), w.to(out[0].dtype))
        return (scores, *tuple(out[1:]))

    return encode_router_output(fam, out, ids, w, num_experts)
