"""The monitor's hooks: the capture engine's family hook points, read during training.

Ids and weights come from the forward pre-hook on ``<block>.experts`` (the ``top_k_index`` and
``top_k_weights`` the model consumed; FIELD-NOTES 1), logits from a forward hook on the router,
and families whose block consumes the router output directly (Llama4, JetMoE) are decoded with
the engine's :func:`~moescope.capture.engine.decode_router_output`. A pre-hook on the model
itself reads the batch's ``attention_mask`` so padding is never counted, and a post-hook on the
model closes the forward pass (aux loss over all layers).

The hooks count only a forward pass the model makes in training mode (unless told otherwise),
never a gradient-checkpointing recomputation inside backward, and never while paused.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from moescope.core.families import FamilySpec
from moescope.core.routing import HookSet, call_arg, decode_router_output, moe_sites
from moescope.errors import ConfigError
from moescope.monitor.counters import RoutingCounters
from moescope.trace import RoutingSpec


def family_aux_loss(router: torch.nn.Module) -> Any:
    """The family's own ``load_balancing_loss_func`` (from the router's modeling module), or None."""
    module = sys.modules.get(type(router).__module__)
    return getattr(module, "load_balancing_loss_func", None)


def _in_backward() -> bool:
    """True inside autograd's backward (a gradient-checkpointing recomputation)."""
    return torch._C._current_graph_task_id() != -1


class MonitorHooks(HookSet):
    """Installs the monitor's hooks on entering ``with`` (or :meth:`attach`), removes them on exit."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: RoutingSpec,
        family: FamilySpec,
        counters: RoutingCounters,
        *,
        train_only: bool = True,
        aux_loss: bool = True,
    ) -> None:
        self.model = model
        self.spec = spec
        self.family = family
        self.counters = counters
        self.train_only = train_only
        self.paused = False
        self.keep_batch = False  # remember the last batch (for sampled capture)
        sites = moe_sites(model, spec, family)
        self._blocks = [site.block for site in sites]
        self._routers = [site.router for site in sites]
        self.aux_fn = family_aux_loss(self._routers[0]) if aux_loss else None
        self._init_hooks()
        self._active = False  # inside a counted forward pass of the model
        self._mask: torch.Tensor | None = None  # (N,) float64 on the routing device
        self._attention_mask: torch.Tensor | None = None  # (B, S) as the model got it
        self._logits: list[torch.Tensor | None] = []
        self.last_batch: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # -- installation ----------------------------------------------------------------------------
    def _install(self) -> None:
        fam = self.family
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._model_post, always_call=True))
        for j, (block, router) in enumerate(zip(self._blocks, self._routers, strict=True)):
            if fam.selection == "experts_call":
                experts = getattr(block, fam.experts, None) if fam.experts else None
                if experts is None:
                    raise ConfigError(f"{self.spec.module_paths[j]}: no {fam.experts!r} module to hook")
                self._handles.append(
                    experts.register_forward_pre_hook(self._experts_hook(j), with_kwargs=True)
                )
            self._handles.append(router.register_forward_hook(self._router_hook(j, block), with_kwargs=True))

    def _remove(self) -> None:
        super()._remove()
        self._active = False

    # -- the model's forward -----------------------------------------------------------------------
    def _model_pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active or _in_backward():
            return  # a nested call of the same model counts as part of the outer forward
        if self.paused or (self.train_only and not module.training):
            return
        self._active = True
        input_ids = call_arg(args, kwargs, 0, "input_ids")
        attention_mask = call_arg(args, kwargs, 1, "attention_mask")
        mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            mask = attention_mask
        self._attention_mask = mask
        self._mask = None
        self._logits = [None] * self.spec.num_moe_layers
        if self.keep_batch and isinstance(input_ids, torch.Tensor):
            self.last_batch = (input_ids, mask)

    def _model_post(self, module: torch.nn.Module, args: tuple, out: Any) -> None:
        if not self._active:
            return
        self._active = False
        logits = self._logits
        self._logits = []
        self.counters.forwards += 1
        if self.aux_fn is not None and all(lg is not None for lg in logits):
            mask = self._attention_mask
            n = logits[0].reshape(-1, logits[0].shape[-1]).shape[0]
            if mask is not None and mask.numel() != n:
                mask = None
            with torch.no_grad():
                self.counters.add_aux(self.aux_fn, logits, self.spec.top_k, mask)

    def _flat_mask(self, n: int, device: torch.device) -> torch.Tensor | None:
        """The batch's attention mask as (N,) float64 on ``device``, or None when it does not fit N."""
        if self._mask is None and self._attention_mask is not None and self._attention_mask.numel() == n:
            self._mask = self._attention_mask.reshape(-1).to(device=device, dtype=torch.float64)
        return self._mask

    # -- the MoE blocks ----------------------------------------------------------------------------
    def _experts_hook(self, j: int):
        fam = self.family

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not self._active:
                return
            ids = call_arg(args, kwargs, fam.index_arg, fam.index_kwarg)
            weights = call_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg)
            if ids is None or weights is None:
                raise ConfigError(
                    f"{self.spec.module_paths[j]}.{fam.experts}: call carries no {fam.index_kwarg}/{fam.weights_kwarg}"
                )
            self._selection(j, ids.detach(), weights.detach())

        return hook

    def _selection(self, j: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.counters.to(ids.device)
        with torch.no_grad():
            self.counters.add_selection(
                j, ids, weights, self._flat_mask(ids.reshape(-1, ids.shape[-1]).shape[0], ids.device)
            )

    def _router_hook(self, j: int, block: torch.nn.Module):
        fam = self.family
        k = self.spec.top_k

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if not self._active:
                return
            logits = (out if fam.logits_index is None else out[fam.logits_index]).detach()
            if fam.selection != "experts_call":
                with torch.no_grad():
                    ids, weights = decode_router_output(fam, block, out, k)
                self._selection(j, ids.detach(), weights.detach())
            flat = logits.reshape(-1, logits.shape[-1])
            self.counters.to(flat.device)
            with torch.no_grad():
                self.counters.add_logits(
                    j, flat, self.spec.router_kind, self._flat_mask(flat.shape[0], flat.device)
                )
            if self._logits:
                self._logits[j] = logits

        return hook
