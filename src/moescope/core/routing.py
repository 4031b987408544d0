"""The torch side of the family table: where each MoE block's routing is hooked, read and weighted.

:mod:`moescope.core.families` says *what* each family looks like; this module turns a loaded model
and its row into the objects every routing tool works on, so capture
(:class:`~moescope.capture.engine.RoutingRecorder`), ablation
(:class:`~moescope.ablate.hooks.ExpertAblator`) and future routing strategies share one reading:

- :func:`routing_spec`: the :class:`~moescope.trace.RoutingSpec` of a model or config;
- :func:`moe_sites`: per MoE layer ``j``, the block, its router and the module whose call carries
  the routing the block consumes (the experts module, or the router for Llama4/JetMoE);
- :class:`HookSet`: hooks installed on entering the first ``with`` and removed when the last exits;
- :func:`decode_router_output` / :func:`encode_router_output`: a router's output as ``(ids, weights)``
  and back, for families whose block consumes the router output directly;
- :func:`rewrite_experts_call` / :func:`rewrite_router_output`: the hook bodies that edit the
  routing a block consumes (ablation and routing strategies both use them);
- :func:`choice_scores` (the score a router ranks experts by) and :func:`rule_weights` (the weights
  the family gives a chosen set).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moescope.core.families import FamilySpec, config_facts, resolve_adapter, text_config
from moescope.core.family_rules import WeightRule
from moescope.errors import ConfigError
from moescope.trace import RoutingSpec


def model_dtype(model: torch.nn.Module | None, config: Any) -> str:
    """The floating dtype a model's parameters are in (else the config's), as a NumPy-style name."""
    if model is not None:
        for p in model.parameters():
            if p.is_floating_point():
                return str(p.dtype).removeprefix("torch.")
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dt).removeprefix("torch.") if dt is not None else "float32"


def find_blocks(model: torch.nn.Module, fam: FamilySpec) -> list[tuple[int, str]]:
    """(decoder layer, module path) of every MoE block, matched by name and router class."""
    pattern = fam.block_pattern()
    found = []
    for name, module in model.named_modules():
        m = pattern.match(name)
        if not m:
            continue
        router = getattr(module, fam.router, None)
        if router is None or type(router).__name__ not in fam.router_classes:
            continue  # a dense MLP at a MoE block's path
        found.append((int(m.group(1)), name))
    found.sort()
    return found


def routing_spec(model_or_config: Any) -> RoutingSpec:
    """The routing facts of a model or config, without running anything.

    With a model, MoE layers and module paths come from its module names and must agree with the
    family's dense-layer rule; with a config alone, they follow the rule and the usual prefix.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = text_config(model.config if model is not None else model_or_config)
    facts = config_facts(config)
    model_type = facts.model_type
    fam = resolve_adapter(model_type)
    rule_layers = list(facts.moe_layers)
    if model is not None:
        blocks = find_blocks(model, fam)
        moe_layers = [i for i, _ in blocks]
        paths = [p for _, p in blocks]
        if moe_layers != rule_layers:
            raise ConfigError(
                f"{model_type}: MoE blocks found at decoder layers {moe_layers} but the config's dense-layer"
                f" rule gives {rule_layers}; the adapter does not fit this model"
            )
    else:
        moe_layers = rule_layers
        paths = [f"{fam.prefix}{fam.layers}.{i}.{fam.block}" for i in moe_layers]
    if not moe_layers:
        raise ConfigError(
            f"{model_type}: the model has no MoE layer (no {fam.layers}.<i>.{fam.block}.{fam.router})"
        )
    if not 1 <= facts.top_k <= facts.num_experts:
        raise ConfigError(
            f"{model_type}: config top-k={facts.top_k} is not in 1..num_experts={facts.num_experts}"
        )
    spec = RoutingSpec(
        num_experts=facts.num_experts,
        top_k=facts.top_k,
        moe_layers=moe_layers,
        family=model_type,
        router_kind=facts.router_kind,
        n_shared_experts=facts.n_shared_experts,
        num_hidden_layers=facts.num_hidden_layers,
        module_paths=paths,
        dtype=model_dtype(model, config),
    )
    spec.check()
    return spec


@dataclass(frozen=True)
class MoeSite:
    """MoE layer ``j`` of a loaded model: its block, router, and the module whose call carries the routing.

    ``consumer`` is the experts module for ``experts_call`` families (a forward pre-hook on it sees
    ``top_k_index``/``top_k_weights``), else ``None``: the block consumes the router output, so a
    forward hook on ``router`` reads or rewrites it.
    """

    j: int
    path: str
    block: torch.nn.Module
    router: torch.nn.Module
    consumer: torch.nn.Module | None


def moe_sites(model: torch.nn.Module, spec: RoutingSpec, fam: FamilySpec) -> list[MoeSite]:
    """One :class:`MoeSite` per MoE layer of ``spec``, in order; a missing experts module is an error."""
    sites = []
    for j, path in enumerate(spec.module_paths):
        block = model.get_submodule(path)
        router = getattr(block, fam.router)
        consumer = None
        if fam.selection == "experts_call":
            consumer = getattr(block, fam.experts, None) if fam.experts else None
            if consumer is None:
                raise ConfigError(f"{path}: no {fam.experts!r} module to hook")
        sites.append(MoeSite(j, path, block, router, consumer))
    return sites


class HookSet:
    """Hooks installed on entering the first ``with`` block and removed when the last one exits.

    Re-entrant and thread-safe; a failed installation removes whatever was installed. Subclasses
    call :meth:`_init_hooks` in ``__init__``, define ``_install`` (appending each handle to
    ``self._handles``) and may extend ``_remove``.
    """

    _depth: int
    _lock: threading.Lock
    _handles: list[Any]

    def _init_hooks(self) -> None:
        self._depth = 0  # nesting of `with` blocks
        self._lock = threading.Lock()
        self._handles = []

    def _install(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                try:
                    self._install()
                except BaseException:
                    self._remove()
                    raise
            self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._remove()


def call_arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    """Argument ``pos`` / ``name`` of a hooked call, or ``None`` when it was not passed."""
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name)


def replace_arg(args: tuple, kwargs: dict, pos: int, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a hooked call with argument ``pos`` / ``name`` replaced by ``value``."""
    if len(args) > pos:
        return (*args[:pos], value, *args[pos + 1 :]), kwargs
    return args, {**kwargs, name: value}


def router_logits(fam: FamilySpec, out: Any) -> torch.Tensor:
    """The logits in a router's output (the output itself when the family's row says so)."""
    return out if fam.logits_index is None else out[fam.logits_index]


def decode_router_output(
    fam: FamilySpec, block: torch.nn.Module, out: Any, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids (N, k), weights (N, k))`` a router's output stands for, per the family's row.

    Used for families whose block consumes the router output directly (Llama4, JetMoE), and by
    gate lookahead, which needs a router's choice without running its block.
    """
    if fam.router_ids is not None:
        return out[fam.router_ids], out[fam.router_ids - 1]
    if fam.block_route is not None:
        weights, ids = getattr(block, fam.block_route)(router_logits(fam, out))
        return ids, weights
    if fam.selection == "router_dense_scores":
        scores = out[0]  # (N, E), zero outside the chosen experts
        weights, ids = torch.topk(scores, k, dim=-1)
        if ((scores != 0).sum(-1) > k).any():
            raise ConfigError(f"{fam.family}: router scores have more than k={k} non-zero entries per token")
        return ids, weights
    if fam.selection == "router_sorted":
        index_sorted, _, batch_gates, expert_size, _ = out
        sizes = torch.as_tensor(expert_size, device=index_sorted.device)
        sorted_experts = torch.repeat_interleave(torch.arange(len(sizes), device=sizes.device), sizes)
        flat_ids = torch.empty_like(index_sorted)
        flat_ids[index_sorted] = sorted_experts
        flat_w = torch.empty_like(batch_gates)
        flat_w[index_sorted] = batch_gates
        return flat_ids.view(-1, k), flat_w.view(-1, k)
    raise ConfigError(f"{fam.family}: adapter row gives no way to read the router's choice")


def encode_router_output(
    fam: FamilySpec, out: Any, ids: torch.Tensor, w: torch.Tensor, num_experts: int
) -> Any:
    """The router output a block consumes, rebuilt from edited ``ids``/``w`` (N, k) (inverse of decode)."""
    if fam.selection == "router_dense_scores":  # Llama4: (scores (N, E), logits); repeated ids add
        scores = torch.zeros_like(out[0]).scatter_add(1, ids.long(), w.to(out[0].dtype))
        return (scores, *tuple(out[1:]))
    if fam.selection == "router_sorted":  # JetMoE: ScatterMoE layout, as JetMoeTopKGating builds it
        k = ids.shape[1]
        flat = ids.reshape(-1)
        _, index_sorted = flat.sort(0)
        batch_index = index_sorted.div(k, rounding_mode="trunc")
        batch_gates = w.reshape(-1)[index_sorted].to(out[2].dtype)
        expert_size = torch.bincount(flat, minlength=num_experts).tolist()
        return (index_sorted, batch_index, batch_gates, expert_size, *tuple(out[4:]))
    raise ConfigError(f"{fam.family}: selection {fam.selection!r} has no router-output encoding")


#: ``(ids, weights) -> (ids, weights)``: an edit of the routing a block consumes; returning the very
#: tensors it was given means "unchanged".
RoutingEdit = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rewrite_experts_call(
    fam: FamilySpec, path: str, args: tuple, kwargs: dict, edit: RoutingEdit
) -> tuple[tuple, dict] | None:
    """Forward pre-hook body on an experts module: the call with ``edit`` applied, ``None`` if unchanged."""
    ids = call_arg(args, kwargs, fam.index_arg, fam.index_kwarg)
    w = call_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg)
    if ids is None or w is None:
        raise ConfigError(f"{path}.{fam.experts}: call carries no {fam.index_kwarg}/{fam.weights_kwarg}")
    new_ids, new_w = edit(ids, w)
    if new_ids is ids and new_w is w:
        return None
    args, kwargs = replace_arg(args, kwargs, fam.index_arg, fam.index_kwarg, new_ids)
    return replace_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg, new_w)


def rewrite_router_output(
    fam: FamilySpec,
    block: torch.nn.Module,
    out: Any,
    spec: RoutingSpec,
    edit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Any:
    """Forward hook body on a router whose output the block consumes (Llama4, JetMoE).

    ``edit(ids, weights, logits)`` returns the new routing; the router output is rebuilt from it,
    or ``None`` (keep the output) when ``edit`` returned its inputs.
    """
    ids, w = decode_router_output(fam, block, out, spec.top_k)
    new_ids, new_w = edit(ids, w, router_logits(fam, out))
    if new_ids is ids and new_w is w:
        return None
    return encode_router_output(fam, out, new_ids, new_w, spec.num_experts)


def choice_scores(fam: FamilySpec, router: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The score a router ranks experts by: transform(logits) + selection bias, ``(N, E)`` float32."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if fam.choice_score == "softmax":
        scores = logits.softmax(dim=-1)
    elif fam.choice_score == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits
    if fam.choice_bias:
        bias = router.get_submodule(fam.choice_bias.rsplit(".", 1)[0]) if "." in fam.choice_bias else router
        bias = getattr(bias, fam.choice_bias.rsplit(".", 1)[-1])
        scores = scores + bias.reshape(-1).to(scores)
    return scores


def rule_weights(
    rule: WeightRule,
    logits: torch.Tensor,
    ids: torch.Tensor,
    excluded: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weights ``(n, k)`` float32 the family gives the chosen ``ids`` (n, k), from router ``logits`` (n, E).

    ``excluded`` (E,) bool marks disabled experts; only the sparsemixer uses it (its masked softmax
    spans experts near the chosen logit, and a disabled one must not sit among them). ``valid``
    (n, k) bool marks the slots a token really uses when tokens choose different numbers of
    experts: the others get weight 0 and take no part in the normalisation (not for sparsemixer).
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()  # (n, E)
    ids = ids.long()
    if valid is not None and rule.score == "sparsemixer":
        raise ConfigError("rule_weights: the sparsemixer rule takes no valid mask; weight each count apart")
    if rule.score == "softmax":
        w = logits.softmax(dim=-1).gather(1, ids)
    elif rule.score == "sigmoid":
        w = logits.sigmoid().gather(1, ids)
    elif rule.score == "softmax_chosen":
        chosen = logits.gather(1, ids)
        w = (chosen if valid is None else chosen.masked_fill(~valid, float("-inf"))).softmax(dim=-1)
    elif rule.score == "sparsemixer":
        return _sparsemixer_weights(logits, ids, excluded, rule.jitter_eps)
    else:
        raise ConfigError(
            f"weight rule score {rule.score!r} is not one of softmax, sigmoid, softmax_chosen, sparsemixer"
        )
    if valid is not None:
        w = torch.where(valid, w, 0.0)
    if rule.norm_p is not None:
        norm = (
            w.sum(-1, keepdim=True)
            if rule.norm_p == 1
            else torch.linalg.vector_norm(w, ord=rule.norm_p, dim=-1, keepdim=True)
        )
        w = w / (norm + rule.norm_eps).clamp(min=rule.norm_floor)
    return w * rule.scale if rule.scale != 1.0 else w


def _sparsemixer_weights(
    logits: torch.Tensor, ids: torch.Tensor, excluded: torch.Tensor | None, jitter_eps: float
) -> torch.Tensor:
    """PhiMoE's eval-mode sparsemixer multipliers for the given experts (transformers ``sparsemixer``).

    Slot i takes the i-th best of ``ids`` by logit; its weight is a softmax over the experts whose
    logit lies within ``2 * jitter_eps`` (relative) of it, earlier slots and ``excluded`` left out.
    """
    scores = logits if excluded is None else logits.masked_fill(excluded.to(logits.device), float("-inf"))
    order = torch.argsort(logits.gather(1, ids), dim=1, descending=True, stable=True)
    ranked = ids.gather(1, order)  # (n, k), best logit first
    w_ranked = torch.empty(ranked.shape, dtype=logits.dtype, device=logits.device)
    masked = scores
    for i in range(ranked.shape[1]):
        e = ranked[:, i : i + 1]
        top = scores.gather(1, e)  # (n, 1)
        factor = scores.abs().clamp(min=top)
        far = ((top - scores) / factor) > (2 * jitter_eps)
        w_ranked[:, i : i + 1] = masked.masked_fill(far, float("-inf")).softmax(dim=-1).gather(1, e)
        masked = masked.scatter(1, e, float("-inf"))
    return torch.empty_like(w_ranked).scatter(1, order, w_ranked)
