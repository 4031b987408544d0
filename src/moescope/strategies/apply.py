"""Apply a routing strategy at run time where each family consumes its routing; no weight is edited.

The hooks sit at the ablation's points (:mod:`moescope.ablate.hooks`): a forward pre-hook on
``<block>.experts`` rewrites the ``(top_k_index, top_k_weights)`` it is called with, a forward hook
on the router keeps its logits, and Llama4/JetMoE routers have their output decoded, edited and
encoded back. A strategy returns the experts each token uses; this module turns that set into what
the block consumes:

- the kept experts, ranked (the model's own choice first), fill the first ``count`` slots of an
  ``(N, K)`` call, ``K`` the largest count in the batch; the other slots are padding with weight 0,
  which adds exactly nothing (x + 0 == x), so tokens may use 0..E experts. Padding repeats the
  token's first expert. Padded slots are not computed: where a batch has padding, the experts call
  is *compacted* to one row per kept (token, expert) pair (``hidden[token]``, ids and weights of
  width 1) and a forward hook adds the rows back per token, so the experts module does the work of
  the mean count, not the batch's largest (:func:`compaction_ok` checks each experts class once;
  Llama4's dense experts and JetMoE's router-side layout keep the zero-weight slots);
- kept experts are weighted by the family's own rule (:func:`moescope.core.routing.rule_weights`:
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
    moe_sites,
    replace_arg,
    rewrite_experts_call,
    rewrite_router_output,
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
    strategy: Any,
    rule: Any,
    routing: Routing,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> Applied:
    """Turn ``strategy.select(routing)`` into the ``(N, K)`` ids and weights the block consumes.

    Padding slots (beyond each token's ``count``) repeat the token's first expert with weight 0.
    """
    if strategy.has_prefix():
        order, count = strategy.select_prefix(routing)
        if order is None:  # the model's own choice
            return Applied(ids, weights, count)
        if order is routing.ranking:  # the set is a prefix of the ranking: ids straight from it
            return _from_ranking(strategy, rule, routing, ids, weights, count)
        keep = routing.prefix_mask(order, count)
    else:
        keep = strategy.select(routing)
    if strategy.min_experts > 0 and not strategy.nonempty:
        empty = ~keep.any(1, keepdim=True)
        keep = keep | (torch.zeros_like(keep).scatter(1, routing.top1, True) & empty)
    if not strategy.reweight and bool((keep & ~routing.model_mask).any()):
        raise ConfigError(
            f"strategy {strategy.name} kept experts outside the model's choice but does not reweight"
        )
    count = keep.sum(1)  # (N,)
    k = ids.shape[1]
    same = (count == k) & keep.gather(1, ids.long()).all(1)  # exactly the model's own set
    if bool(same.all()):
        return Applied(ids, weights, count)
    K = max(int(count.max()), 1)
    ranking = routing.ranking
    ranked_keep = keep.gather(1, ranking)  # (N, E) in rank order
    slot = torch.where(ranked_keep, ranked_keep.cumsum(1) - 1, K)  # kept: its slot; others: column K
    sel = ranking[:, :1].expand(-1, K + 1).clone().scatter_(1, slot, ranking)[:, :K]  # kept first, ranked
    valid = torch.arange(K, device=sel.device).reshape(1, K) < count.reshape(-1, 1)
    sel = torch.where(valid, sel, sel[:, :1])
    return _weigh(strategy, rule, routing, ids, weights, count, same, sel, valid)


def _from_ranking(
    strategy: Any, rule: Any, routing: Routing, ids: torch.Tensor, weights: torch.Tensor, count: torch.Tensor
) -> Applied:
    """:func:`materialise` for a set that is the first ``count`` experts of the ranking (no mask)."""
    k = ids.shape[1]
    ranking = routing.ranking
    # the ranking starts with the model's own k experts, so count == k is the model's own set
    same = count == k
    if bool(same.all()):
        return Applied(ids, weights, count)
    K = max(int(count.max()), 1)
    sel = ranking[:, :K]
    valid = torch.arange(K, device=sel.device).reshape(1, K) < count.reshape(-1, 1)
    sel = torch.where(valid, sel, sel[:, :1])
    return _weigh(strategy, rule, routing, ids, weights, count, same, sel, valid)


def _weigh(
    strategy: Any,
    rule: Any,
    routing: Routing,
    ids: torch.Tensor,
    weights: torch.Tensor,
    count: torch.Tensor,
    same: torch.Tensor,
    sel: torch.Tensor,
    valid: torch.Tensor,
) -> Applied:
    """The :class:`Applied` of kept ids ``sel`` (N, K): weights by the family's rule (or the model's)."""
    k, K = ids.shape[1], sel.shape[1]
    if strategy.reweight and rule.score != "sparsemixer":  # one masked call for every count
        w = rule_weights(rule, routing.logits, sel, valid=valid)  # padding slots already 0
    elif strategy.reweight:
        w = torch.zeros(sel.shape, dtype=torch.float32, device=sel.device)
        for c in torch.unique(count).tolist():
            rows = (count == c).nonzero().squeeze(1)
            if c > 0 and rows.numel():
                w[rows, :c] = rule_weights(rule, routing.logits[rows], sel[rows, :c]).float()
    else:
        dense = torch.zeros(routing.logits.shape, dtype=torch.float32, device=sel.device)
        dense.scatter_(1, ids.long(), weights.float())
        w = torch.where(valid, dense.gather(1, sel), 0.0)
    new_ids = sel.to(ids.dtype)
    new_w = w.to(weights.dtype)
    if K >= k and bool(same.any()):  # (a token keeping the model's k experts needs K >= k)
        row = same.reshape(-1, 1)
        new_ids[:, :k] = torch.where(row, ids, new_ids[:, :k])
        new_w[:, :k] = torch.where(row, weights, new_w[:, :k])
        if K > k:
            new_ids[:, k:] = torch.where(row, ids[:, :1], new_ids[:, k:])
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
        self._last: list[Applied | None] = [None] * L  # the edit the experts call is about to use
        self._compact = [False] * L  # layers whose experts call is compacted (set on install)
        self._scatter: list[tuple[torch.Tensor, int] | None] = [None] * L  # (token of each row, N)
        self._compaction_checked: dict[type, bool] = {}
        self._init_hooks()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with self._lock:
            if self._depth == 0:
                self._logits = [None] * self.spec.num_moe_layers

    def _install(self) -> None:
        fam = self.family
        checked = self._compaction_checked  # probed once per experts class, kept across `with` blocks
        for j, (block, router) in enumerate(zip(self._blocks, self._routers, strict=True)):
            if self._strategies[j] is None and not self.record:
                continue
            if fam.selection == "experts_call":
                experts = getattr(block, fam.experts, None) if fam.experts else None
                if experts is None:
                    raise ConfigError(f"{self.spec.module_paths[j]}: no {fam.experts!r} module to hook")
                if self._strategies[j] is not None:
                    if type(experts) not in checked:
                        checked[type(experts)] = compaction_ok(experts, fam)
                    self._compact[j] = checked[type(experts)]
                    if self._compact[j]:
                        self._handles.append(
                            experts.register_forward_hook(self._scatter_hook(j), prepend=True)
                        )
                self._handles.append(  # after hooks already there: they see the model's own call
                    experts.register_forward_pre_hook(self._experts_hook(j), with_kwargs=True)
                )
                self._handles.append(router.register_forward_hook(self._logits_hook(j), prepend=True))
            else:
                self._handles.append(router.register_forward_hook(self._router_hook(j, block)))

    def _remove(self) -> None:
        super()._remove()
        L = self.spec.num_moe_layers
        self._compact, self._scatter, self._last = [False] * L, [None] * L, [None] * L

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
        path = self.spec.module_paths[j]

        def edit(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.edit(j, ids, w, self._logits[j])
            self._logits[j] = None
            self._last[j] = out
            if self.record:
                self.applied[j] = _detached(out)
            return out.ids, out.weights

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            self._scatter[j] = None
            call = rewrite_experts_call(self.family, path, args, kwargs, edit)
            if call is None or not self._compact[j]:
                return call
            return self._compacted(j, *call)

        return hook

    def _compacted(self, j: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The experts call with one row per kept (token, expert) pair; padding slots dropped."""
        fam = self.family
        ids = call_arg(args, kwargs, fam.index_arg, fam.index_kwarg)
        w = call_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg)
        hidden = args[0] if args else None
        a = self._last[j]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[0] != ids.shape[0]:
            return args, kwargs
        K = ids.shape[1]
        valid = torch.arange(K, device=ids.device).reshape(1, K) < a.count.reshape(-1, 1).to(ids.device)
        if bool(valid.all()) or not bool(valid.any()):  # nothing padded, or no row to run
            return args, kwargs
        tok, slot = valid.nonzero(as_tuple=True)
        self._scatter[j] = (tok, hidden.shape[0])
        args = (hidden[tok], *args[1:])
        args, kwargs = replace_arg(
            args, kwargs, fam.index_arg, fam.index_kwarg, ids[tok, slot].reshape(-1, 1)
        )
        return replace_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg, w[tok, slot].reshape(-1, 1))

    def _scatter_hook(self, j: int):
        def hook(module: torch.nn.Module, args: tuple, out: Any):
            sc, self._scatter[j] = self._scatter[j], None
            if sc is None:
                return None
            tok, n = sc
            rows = out[0] if isinstance(out, tuple) else out
            full = torch.zeros((n, *rows.shape[1:]), dtype=rows.dtype, device=rows.device).index_add_(
                0, tok, rows
            )
            return (full, *out[1:]) if isinstance(out, tuple) else full

        return hook

    def _router_hook(self, j: int, block: torch.nn.Module):
        def edit(ids: torch.Tensor, w: torch.Tensor, logits: torch.Tensor):
            res = self.edit(j, ids, w, logits)
            if self.record:
                self.applied[j] = _detached(res)
            return res.ids, res.weights

        def hook(module: torch.nn.Module, args: tuple, out: Any):
            return rewrite_router_output(self.family, block, out, self.spec, edit)

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


def compaction_ok(experts: torch.nn.Module, fam: Any) -> bool:
    """Whether ``experts`` computes each (token, slot) row independently, so a call can be compacted.

    Probed once per experts class on three tokens, calling the class's forward directly (no hook
    fires): the ``(3, 2)`` call must equal the sum, per token, of the ``(6, 1)`` call over its rows.
    """
    params = [p for p in experts.parameters() if p.is_floating_point()]
    hidden = getattr(getattr(experts, "config", None), "hidden_size", None)
    E = getattr(experts, "num_experts", None)
    if not params or params[0].device.type == "meta" or not isinstance(hidden, int) or not isinstance(E, int):
        return False
    p = params[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, hidden, generator=g).to(p.device, p.dtype)
    ids = torch.tensor([[0, 1], [min(2, E - 1), 0], [1, E - 1]], device=p.device)
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.2, 0.8]], device=p.device, dtype=p.dtype)

    def call(h: torch.Tensor, i: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        args: list[Any] = [h, None, None]
        args[fam.index_arg], args[fam.weights_arg] = i, v
        out = type(experts).forward(experts, *args)
        return out[0] if isinstance(out, tuple) else out

    try:
        with torch.no_grad():
            full = call(x, ids, w)
            tok = torch.arange(3, device=p.device).repeat_interleave(2)
            rows = call(x[tok], ids.reshape(-1, 1), w.reshape(-1, 1))
            summed = torch.zeros_like(full).index_add_(0, tok, rows)
        return full.shape == summed.shape and bool(torch.allclose(full, summed, rtol=1e-4, atol=1e-5))
    except Exception:  # a module that is not row-wise keeps its padded call
        return False


def _detached(a: Applied) -> Applied:
    return Applied(a.ids.detach(), a.weights.detach(), a.count.detach())
