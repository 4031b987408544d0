"""Disable experts at run time by editing the routing a MoE model consumes, for every family.

No weight is touched. Hooks sit where each family's block consumes the routing (read off the
family table in :mod:`moescope.core.families`, through :func:`moescope.core.routing.moe_sites`):

- ``experts_call`` families: a forward pre-hook on ``<block>.experts`` rewrites the
  ``(top_k_index, top_k_weights)`` it is called with; a forward hook on the router keeps the
  router's logits of the same call for re-routing. The ids are the ones the model really chose,
  after correction bias and group limits, so bias-selected routers (DeepSeek-V3, GLM4-MoE,
  Ernie4.5) are edited where their indices are consumed, never by masking logits.
- ``router_dense_scores`` (Llama4) and ``router_sorted`` (JetMoE): a forward hook on the router
  decodes its output, edits it and encodes it back in the layout the block consumes.

Two modes:

``drop``
    the disabled expert keeps its slot but its weight is set to 0, nothing is renormalised: the
    block output is exactly the unablated output minus that expert's weighted contribution.
``reroute``
    each slot holding a disabled expert goes to the best expert that is neither disabled nor
    already chosen, ranked by the score the router selects with (its probability transform plus
    its correction bias, :func:`moescope.core.routing.choice_scores`); group limits
    (DeepSeek/GLM ``n_group``/``topk_group``) are not re-applied to the refill. The new set is then
    weighted by the family's own rule (:class:`moescope.core.family_rules.WeightRule`, applied by :func:`moescope.core.routing.rule_weights`) from the
    router's unchanged scores: Mixtral renormalises the softmax over the new pair, DeepSeek-V3 takes
    the unbiased sigmoid scores, normalises and scales them, Jamba keeps raw probabilities, and so on.
    Only tokens that chose a disabled expert change; every other token keeps its exact ids and weights.

Hooks are installed when the :class:`ExpertAblator` is entered and removed when it exits (also on
error); with nothing disabled they pass the routing through untouched, so outputs are bit-identical.

Examples
--------
>>> from moescope.capture.tiny import tiny_model
>>> model = tiny_model("mixtral")
>>> x = torch.tensor([[5, 6, 7, 8, 9]])
>>> with ablate(model, {1: [3]}, mode="reroute"):
...     changed = model(x).logits
>>> bool((model(x).logits == changed).all())
False
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from moescope.core.families import FamilySpec, resolve_adapter, text_config
from moescope.core.family_rules import WeightRule
from moescope.core.routing import (
    HookSet,
    choice_scores,
    moe_sites,
    rewrite_experts_call,
    rewrite_router_output,
    router_logits,
    routing_spec,
    rule_weights,
)
from moescope.errors import ConfigError

#: How a disabled expert is taken out of a token's top-k.
MODES = ("reroute", "drop")


# --------------------------------------------------------------------------- routing arithmetic
def reroute(
    fam: FamilySpec,
    rule: WeightRule,
    router: torch.nn.Module,
    logits: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    off: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every disabled expert in ``ids`` (N, k) by the next best allowed one; reweight those rows.

    ``off`` (E,) bool marks the disabled experts; ``logits`` (N, E) are the router's for the same
    tokens. Rows without a disabled expert are returned unchanged (same values).
    """
    hit = off[ids]  # (N, k)
    rows = hit.any(dim=1).nonzero().squeeze(1)  # (n,)
    if rows.numel() == 0:
        return ids, weights
    logits = logits.reshape(-1, logits.shape[-1])
    if logits.shape[0] != ids.shape[0]:
        raise ConfigError(
            f"{fam.family}: router logits cover {logits.shape[0]} tokens but the experts call {ids.shape[0]}"
        )
    r_ids, r_hit, r_logits = ids[rows].long(), hit[rows], logits[rows]
    score = choice_scores(fam, router, r_logits)  # (n, E) float32
    score = score.masked_fill(off, float("-inf")).scatter(1, r_ids, float("-inf"))
    k = ids.shape[1]
    cand = torch.topk(score, k, dim=1).indices  # (n, k), best first
    slot = (r_hit.long().cumsum(dim=1) - 1).clamp(min=0)  # i-th removed slot takes the i-th candidate
    new = torch.where(r_hit, cand.gather(1, slot), r_ids)
    w = rule_weights(rule, r_logits, new, off)
    ids_out, w_out = ids.clone(), weights.clone()
    ids_out[rows] = new.to(ids.dtype)
    w_out[rows] = w.to(weights.dtype)
    return ids_out, w_out


def drop(ids: torch.Tensor, weights: torch.Tensor, off: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the weight of every disabled expert in ``ids`` (N, k) to 0; nothing is renormalised."""
    hit = off[ids]
    if not bool(hit.any()):
        return ids, weights
    return ids, weights.masked_fill(hit, 0)


# --------------------------------------------------------------------------- the hooks
class ExpertAblator(HookSet):
    """Context manager that hooks every MoE block once; :meth:`set` chooses which experts are off.

    Parameters
    ----------
    model : a transformers causal LM of a family in :mod:`moescope.core.families`.
    mode : ``"reroute"`` or ``"drop"`` (see the module docstring).
    record : keep the expert ids each MoE layer consumed in the last forward pass
        (:attr:`routing`, after the edit), to measure how routing changed downstream.

    Attributes
    ----------
    spec : :class:`~moescope.trace.RoutingSpec` of the model (``moe_layers`` are decoder indices).
    routing : per MoE layer, the ``(N, k)`` ids consumed in the last forward (``record=True``).

    Examples
    --------
    >>> from moescope.capture.tiny import tiny_model
    >>> model = tiny_model("deepseek_v3")
    >>> with ExpertAblator(model, mode="drop") as abl:
    ...     abl.set({2: [0, 5]})
    ...     _ = model(torch.tensor([[3, 4, 5]]))
    ...     abl.set(None)  # everything back on, hooks still installed
    """

    def __init__(self, model: torch.nn.Module, *, mode: str = "reroute", record: bool = False) -> None:
        self.model = model
        self.mode = mode
        self.record = record
        self.spec = routing_spec(model)
        self.family = resolve_adapter(self.spec.family)
        self._check_mode(mode)
        self.config = text_config(model.config)
        self._rule = self.family.weight_rule(self.config) if self.family.weight_rule else None
        self._sites = moe_sites(model, self.spec, self.family)
        self._routers = [site.router for site in self._sites]
        L = self.spec.num_moe_layers
        self._off: list[torch.Tensor | None] = [None] * L
        self._logits: list[torch.Tensor | None] = [None] * L
        self.routing: list[torch.Tensor | None] = [None] * L
        self._init_hooks()

    def _check_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"option mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "reroute" and self.family.weight_rule is None:
            raise ConfigError(
                f"{self.spec.family}: the adapter row has no weight_rule, so re-routed experts cannot be"
                " weighted; use mode 'drop'"
            )

    # -- what is disabled -------------------------------------------------------------------

    def set(self, disabled: Mapping[int, Iterable[int]] | None, *, mode: str | None = None) -> None:
        """Disable ``{decoder_layer: expert ids}`` from the next forward on (``None``: nothing)."""
        if mode is not None:
            self._check_mode(mode)
            self.mode = mode
        off: list[torch.Tensor | None] = [None] * self.spec.num_moe_layers
        E, k = self.spec.num_experts, self.spec.top_k
        for layer, experts in (disabled or {}).items():
            j = self.position(layer)
            ids = sorted({int(e) for e in experts})
            if not ids:
                continue
            bad = [e for e in ids if not 0 <= e < E]
            if bad:
                raise ConfigError(f"expert ids {bad} at layer {layer} are outside 0..{E - 1}")
            if self.mode == "reroute" and E - len(ids) < k:
                raise ConfigError(
                    f"disabling {len(ids)} of {E} experts at layer {layer} leaves fewer than top_k={k} to re-route to"
                )
            device = next(self._routers[j].parameters()).device
            mask = torch.zeros(E, dtype=torch.bool, device=device)
            mask[ids] = True
            off[j] = mask
        self._off = off

    def position(self, layer: int) -> int:
        """Index among the MoE layers (0..L-1) of decoder layer ``layer``; dense layers are refused."""
        try:
            return self.spec.moe_layers.index(int(layer))
        except ValueError:
            raise ConfigError(
                f"layer {layer} is not a MoE layer of this {self.spec.family} model; MoE layers: {self.spec.moe_layers}"
            ) from None

    @property
    def disabled(self) -> dict[int, list[int]]:
        """The experts currently off, as ``{decoder_layer: ids}``."""
        return {
            self.spec.moe_layers[j]: m.nonzero().squeeze(1).tolist()
            for j, m in enumerate(self._off)
            if m is not None
        }

    # -- installation ---------------------------------------------------------------------------

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with self._lock:
            if self._depth == 0:
                self._logits = [None] * self.spec.num_moe_layers

    def _install(self) -> None:
        for site in self._sites:
            j = site.j
            if site.consumer is not None:
                # prepend: a RoutingRecorder hooked on the same module then records the edited routing
                self._handles.append(
                    site.consumer.register_forward_pre_hook(
                        self._experts_hook(j), with_kwargs=True, prepend=True
                    )
                )
                self._handles.append(site.router.register_forward_hook(self._logits_hook(j), prepend=True))
            else:
                self._handles.append(
                    site.router.register_forward_hook(self._router_hook(j, site.block), prepend=True)
                )

    def _edit(self, j: int, ids: torch.Tensor, w: torch.Tensor, logits: torch.Tensor | None):
        off = self._off[j]
        if off is None:
            return ids, w
        if self.mode == "drop":
            return drop(ids, w, off)
        if logits is None:
            raise ConfigError(f"{self.spec.module_paths[j]}: no router logits seen before the experts call")
        assert self._rule is not None
        return reroute(self.family, self._rule, self._routers[j], logits, ids, w, off)

    def _logits_hook(self, j: int):
        fam = self.family

        def hook(module: torch.nn.Module, args: tuple, out: Any) -> None:
            self._logits[j] = router_logits(fam, out)

        return hook

    def _experts_hook(self, j: int):
        path = self.spec.module_paths[j]

        def edit(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            new_ids, new_w = self._edit(j, ids, w, self._logits[j])
            self._logits[j] = None
            if self.record:
                self.routing[j] = new_ids.detach()
            return new_ids, new_w

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict):
            return rewrite_experts_call(self.family, path, args, kwargs, edit)

        return hook

    def _router_hook(self, j: int, block: torch.nn.Module):
        def edit(ids: torch.Tensor, w: torch.Tensor, logits: torch.Tensor):
            new_ids, new_w = self._edit(j, ids, w, logits)
            if self.record:
                self.routing[j] = new_ids.detach()
            return new_ids, new_w

        def hook(module: torch.nn.Module, args: tuple, out: Any):
            if self._off[j] is None and not self.record:
                return None
            return rewrite_router_output(self.family, block, out, self.spec, edit)

        return hook


@contextmanager
def ablate(
    model: torch.nn.Module, disabled: Mapping[int, Iterable[int]], *, mode: str = "reroute"
) -> Iterator[ExpertAblator]:
    """Disable ``{decoder_layer: expert ids}`` inside a ``with`` block; the model is untouched after it."""
    ablator = ExpertAblator(model, mode=mode)
    ablator.set(disabled)
    with ablator:
        yield ablator
