"""Record the expert routing a transformers MoE model really used, one forward pass at a time.

:class:`RoutingRecorder` hooks each MoE block once, through the family's row in
:mod:`moescope.core.families` (hook sites, router decoding: :mod:`moescope.core.routing`):

- ids and weights come from a forward pre-hook on ``<block>.experts``, whose call carries the
  ``top_k_index`` and ``top_k_weights`` the model consumed, after bias correction, group limits and
  scaling (FIELD-NOTES 1). Top-k is never recomputed from logits. Families without an experts
  module are read from the router output the block consumes (Llama4, JetMoE).
- logits come from a forward hook on the router module.
- layers are mapped to decoder-layer indices by module name, never by call order.
- gate lookahead (see :mod:`moescope.capture.lookahead`) applies later layers' routers to this
  layer's router input and to its normalised residual stream.

Hooks do nothing unless a collector is active in this thread's context (a ``ContextVar``), and
they only read tensors, so the model's outputs are unchanged.

Examples
--------
>>> from moescope.capture.tiny import tiny_model
>>> model = tiny_model("mixtral")
>>> rec = RoutingRecorder(model)
>>> ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
>>> mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
>>> out = rec.run(ids, mask)
>>> out["experts"].shape, out["weights"].dtype.name
((7, 4, 2), 'float32')
"""

from __future__ import annotations

import inspect
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moescope.capture.lookahead import LookaheadPlan, extend_ranking
from moescope.core.families import resolve_adapter
from moescope.core.routing import (
    HookSet,
    call_arg,
    choice_scores,
    decode_router_output,
    moe_sites,
    router_logits,
    routing_spec,
)
from moescope.errors import ConfigError
from moescope.trace.schema import id_dtype, lookahead_column, missing_id

LOGITS_DTYPES = ("float16", "float32")


#: The v5 router API (routers return ``(logits, weights, ids)``, experts take the ids) and router
#: logits from DeepSeek-V2/V3 and GLM4-MoE arrive in transformers 5.19 (FIELD-NOTES section 1).
MIN_TRANSFORMERS = "5.19"


def check_transformers_version(version: str | None = None) -> None:
    """Refuse transformers releases older than :data:`MIN_TRANSFORMERS`, saying how to upgrade."""
    import transformers
    from packaging.version import Version

    found = version or transformers.__version__
    if Version(found) < Version(MIN_TRANSFORMERS):
        raise ConfigError(
            f"transformers {found} is too old for capture: moescope needs transformers >= {MIN_TRANSFORMERS} "
            "(the v5 router API; DeepSeek and GLM routers expose logits from 5.19). "
            f"Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


@dataclass
class _Collector:
    """Tensors gathered during one forward pass, keyed by MoE-layer position (0..L-1)."""

    ids: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    lookahead: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    suspended: bool = False


#: The collector of the capture pass in progress (gate lookahead adds its columns to it).
ACTIVE_COLLECTOR: ContextVar[_Collector | None] = ContextVar("moescope_routing_collector", default=None)


class RoutingRecorder(HookSet):
    """Context manager that records routing from a loaded transformers MoE model.

    Hooks are installed on entering ``with`` and removed on leaving it (also on error); outside
    an active :meth:`run` they do nothing. :meth:`run` may be called inside or outside ``with``.

    Parameters
    ----------
    model : a transformers causal LM of a family in :mod:`moescope.core.families`, in eval mode.
    logits : also record router logits ``(n, L, E)``.
    lookahead : largest gate-lookahead distance D (0 = none); distances 1..D are recorded.
    lookahead_m : ids kept per lookahead prediction (>= k; default k).
    logits_dtype : NumPy dtype of the logits arrays (``float16`` or ``float32``).
    token_loss : also return ``token_nll`` ``(n,)``: each token's next-token cross-entropy (nats)
        from the LM head's logits (one log-softmax per position), NaN where the next token is not
        in the same sequence. It makes the LM head compute every position, not only the last.

    Attributes
    ----------
    spec : :class:`RoutingSpec` of the model.
    lookahead_columns : names of the lookahead arrays :meth:`run` returns.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        logits: bool = False,
        lookahead: int = 0,
        lookahead_m: int | None = None,
        logits_dtype: str = "float16",
        token_loss: bool = False,
    ) -> None:
        check_transformers_version()
        self.token_loss = token_loss
        self.model = model
        self.logits = logits
        self.lookahead = lookahead
        self.lookahead_m = lookahead_m
        self.logits_dtype = logits_dtype
        self.spec = routing_spec(model)
        self.family = resolve_adapter(self.spec.family)
        if logits_dtype not in LOGITS_DTYPES:
            raise ConfigError(f"option logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
        if not isinstance(lookahead, int) or lookahead < 0:
            raise ConfigError(f"option lookahead must be an integer >= 0, got {lookahead!r}")
        m = self.spec.top_k if lookahead_m is None else lookahead_m
        if not self.spec.top_k <= m <= self.spec.num_experts:
            raise ConfigError(
                f"option lookahead_m must be in top_k..num_experts = {self.spec.top_k}..{self.spec.num_experts},"
                f" got {lookahead_m}"
            )
        self._m = m
        self._sites = moe_sites(model, self.spec, self.family)
        self._blocks = [site.block for site in self._sites]
        self._routers = [site.router for site in self._sites]
        self._plan = LookaheadPlan.build(model, self.spec, self.family, lookahead) if lookahead else None
        self.lookahead_columns = self._plan.columns if self._plan else []
        self._init_hooks()  # run() enters a `with` block itself
        sig = inspect.signature(model.forward).parameters
        self._pass_positions = "position_ids" in sig
        self._logits_to_keep = "logits_to_keep" in sig

    # -- hook installation ---------------------------------------------------------------------

    def _install(self) -> None:
        for site in self._sites:
            if site.consumer is not None:
                self._handles.append(
                    site.consumer.register_forward_pre_hook(self._experts_hook(site.j), with_kwargs=True)
                )
            self._handles.append(
                site.router.register_forward_hook(self._router_hook(site.j, site.block), with_kwargs=True)
            )
        if self._plan is not None:
            self._handles.extend(self._plan.install(self._lookahead_sink))

    def _experts_hook(self, j: int):
        fam = self.family

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            col = ACTIVE_COLLECTOR.get()
            if col is None or col.suspended:
                return
            ids = call_arg(args, kwargs, fam.index_arg, fam.index_kwarg)
            weights = call_arg(args, kwargs, fam.weights_arg, fam.weights_kwarg)
            if ids is None or weights is None:
                raise ConfigError(
                    f"{self.spec.module_paths[j]}.{fam.experts}: call carries no {fam.index_kwarg}/{fam.weights_kwarg}"
                )
            col.ids[j] = ids.detach()
            col.weights[j] = weights.detach()

        return hook

    def _router_hook(self, j: int, block: torch.nn.Module):
        fam = self.family
        k = self.spec.top_k

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            col = ACTIVE_COLLECTOR.get()
            if col is None or col.suspended:
                return
            if self.logits:
                col.logits[j] = router_logits(fam, out).detach()
            if fam.selection != "experts_call":
                ids, weights = decode_router_output(fam, block, out, k)
                col.ids[j], col.weights[j] = ids.detach(), weights.detach()
            if self._plan is not None:
                x = call_arg(args, kwargs, 0, "hidden_states")
                self._lookahead_sink(col, "gate_input", j, x)

        return hook

    def _lookahead_sink(self, col: _Collector, variant: str, j: int, x: torch.Tensor) -> None:
        """Apply the routers of MoE layers j+1..j+D to ``x`` (already normalised for 'residual')."""
        assert self._plan is not None
        col.suspended = True
        try:
            with torch.no_grad():
                for d in range(1, self.lookahead + 1):
                    t = j + d
                    if t >= self.spec.num_moe_layers:
                        break
                    x_t = self._plan.prepare(variant, j, t, x)
                    col.lookahead[(variant, d, j)] = self.select_top_m(t, x_t)
        finally:
            col.suspended = False

    def select_top_m(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Top-m expert ids ``(N, m)`` that MoE layer ``layer``'s router picks for ``hidden``.

        The first k are the router's own choice (its full selection logic: bias, groups), ordered
        by its selection score; the rest rank the remaining experts by that score (see
        :func:`moescope.capture.lookahead.extend_ranking`).
        """
        router, block = self._routers[layer], self._blocks[layer]
        dev = next(router.parameters()).device
        out = router(hidden.to(dev))
        ids, _ = decode_router_output(self.family, block, out, self.spec.top_k)
        scores = choice_scores(self.family, router, router_logits(self.family, out))
        return extend_ranking(scores, ids, self._m)

    # -- one forward pass ----------------------------------------------------------------------

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """One forward pass (no grad, no cache) over a padded batch; arrays over valid tokens only.

        Rows are the tokens with ``attention_mask == 1``, batch-major (row b, then position).
        Returns ``experts`` (n, L, k) int, ``weights`` (n, L, k) float32, optionally ``logits``
        (n, L, E) and each of :attr:`lookahead_columns` (n, L, m) with ``missing_id(E)`` where
        layer l+d does not exist. Each (ids, weights) row is sorted by weight, largest first.
        """
        if self.model.training:
            raise ConfigError(
                "the model is in training mode (router jitter, sampling); call model.eval() first"
            )
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ConfigError(
                f"input_ids and attention_mask must both be (batch, seq); got {tuple(input_ids.shape)}"
                f" and {tuple(attention_mask.shape)}"
            )
        embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        device = embed.weight.device if embed is not None else next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if self._pass_positions:
            # Left padding keeps each sequence's positions 0..len-1, as when it runs alone.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if self._logits_to_keep and not self.token_loss:
            kwargs["logits_to_keep"] = 1  # the LM head's vocabulary logits are not needed here
        col = _Collector()
        with self:
            token = ACTIVE_COLLECTOR.set(col)
            try:
                with torch.no_grad():
                    out = self.model(**kwargs)
            finally:
                ACTIVE_COLLECTOR.reset(token)
        result = self._assemble(col, attention_mask)
        if self.token_loss:
            result["token_nll"] = _token_nll(out.logits, input_ids, attention_mask)
        return result

    def _assemble(self, col: _Collector, attention_mask: torch.Tensor) -> dict[str, np.ndarray]:
        """Stack every layer's tensors, keep the valid tokens and copy each array to the host once.

        Working on ``(L, n, k)`` stacks keeps the number of device operations and host syncs
        independent of the layer count, which matters on a GPU where one forward pass takes a few
        milliseconds.
        """
        spec = self.spec
        n_all = attention_mask.numel()
        E, k, L = spec.num_experts, spec.top_k, spec.num_moe_layers
        for j, path in enumerate(spec.module_paths):
            if j not in col.ids:
                raise ConfigError(f"{path}: the forward pass recorded no routing for this MoE layer")
            _check(path, "top_k_index", col.ids[j], (n_all, k))
            _check(path, "top_k_weights", col.weights[j], (n_all, k))
        dev = col.ids[0].device
        keep = attention_mask.reshape(-1).to(dev).bool().nonzero().squeeze(1)
        ids = torch.stack([col.ids[j].to(dev) for j in range(L)], 1)[keep].long()  # (n, L, k)
        w = torch.stack([col.weights[j].to(dev) for j in range(L)], 1)[keep].float()
        order = torch.argsort(w, dim=2, descending=True, stable=True)
        ids_out, w_out = _host_many(ids.gather(2, order), w.gather(2, order))
        if len(ids_out):
            lo, hi = ids_out.min(axis=(0, 2)), ids_out.max(axis=(0, 2))
            bad = np.nonzero((lo < 0) | (hi >= E))[0]
            if len(bad):
                j = int(bad[0])
                raise ConfigError(f"{spec.module_paths[j]}: captured expert ids span {lo[j]}..{hi[j]}, E={E}")
        if not np.isfinite(w_out).all():
            raise ConfigError("captured expert weights contain NaN or inf")
        result: dict[str, np.ndarray] = {"experts": ids_out, "weights": w_out}
        if self.logits:
            parts = []
            for j, path in enumerate(spec.module_paths):
                lg = col.logits.get(j)
                if lg is None:
                    raise ConfigError(f"{path}: the router produced no logits")
                lg = lg.reshape(-1, lg.shape[-1]) if lg.dim() == 3 else lg
                _check(path, "router_logits", lg, (n_all, E))
                parts.append(lg.to(dev))
            result["logits"] = _host(torch.stack(parts, 1)[keep].float()).astype(
                self.logits_dtype, copy=False
            )
        if self._plan is not None:
            sentinel, dt = missing_id(E), id_dtype(E)
            for variant in self._plan.variants:
                for d in range(1, self.lookahead + 1):
                    arr = np.full((len(ids_out), L, self._m), sentinel, dtype=dt)
                    if L - d > 0:
                        parts = []
                        for j in range(L - d):
                            pred = col.lookahead.get((variant, d, j))
                            if pred is None:
                                raise ConfigError(
                                    f"lookahead {variant} d={d} was not computed at MoE layer {j}"
                                )
                            _check(spec.module_paths[j], f"lookahead_{variant}_d{d}", pred, (n_all, self._m))
                            parts.append(pred.to(dev))
                        arr[:, : L - d] = _host(torch.stack(parts, 1)[keep]).astype(dt)
                    result[lookahead_column(variant, d)] = arr
        return result


def _token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """``(n,)`` float32 next-token cross-entropy of the valid tokens (row-major), NaN without a next token.

    One sequence at a time, so the float32 log-softmax never holds more than ``T x V`` values.
    """
    B, T = input_ids.shape
    nll = torch.full((B, T), float("nan"), dtype=torch.float32, device=logits.device)
    ids, m = input_ids.to(logits.device), mask.to(logits.device).bool()
    for b in range(B):
        lp = torch.log_softmax(logits[b, :-1].float(), dim=-1)  # (T-1, V)
        tok = -lp.gather(1, ids[b, 1:, None]).squeeze(1)
        ok = m[b, :-1] & m[b, 1:]
        nll[b, :-1] = torch.where(ok, tok, nll[b, :-1])
    return _host(nll.reshape(-1)[m.reshape(-1).nonzero().squeeze(1)])


def _host(t: torch.Tensor) -> np.ndarray:
    """A (device) tensor as a NumPy array: one host copy."""
    return _host_many(t)[0]


def _host_many(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Tensors as NumPy arrays, from a GPU with every copy queued at once and one wait.

    On CUDA each copy goes to a pinned host buffer (torch caches those) with ``non_blocking``, so
    the copies run back to back on the copy engine and the host waits once; on the CPU it is free.
    """
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu().numpy() for t in tensors]
    bufs = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for buf, t in zip(bufs, tensors, strict=True):
        buf.copy_(t, non_blocking=True)
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [buf.numpy() for buf in bufs]


def _check(path: str, what: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    """Captured tensors must match the config's N, k and E (peers have confused E with hidden size)."""
    if tuple(t.shape) != shape:
        raise ConfigError(
            f"{path}: captured {what} has shape {tuple(t.shape)}, expected {shape} (N=batch*seq, then k or E)"
        )
