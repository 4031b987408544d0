"""Record the expert routing a transformers MoE model really used, one forward pass at a time.

:class:`RoutingRecorder` hooks each MoE block once, through the family's row in
:mod:`moescope.capture.adapters`:

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
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from moescope.capture.adapters import FamilySpec, config_value, resolve_adapter
from moescope.capture.lookahead import LookaheadPlan, choice_scores, extend_ranking
from moescope.errors import ConfigError
from moescope.trace import RoutingSpec
from moescope.trace.schema import id_dtype, lookahead_column, missing_id

LOGITS_DTYPES = ("float16", "float32")


def _text_config(config: Any) -> Any:
    """The language-model config of a composite model (Llama4 -> llama4_text), else the config."""
    get = getattr(config, "get_text_config", None)
    text = get() if callable(get) else config
    return text if text is not None else config


def _model_dtype(model: torch.nn.Module | None, config: Any) -> str:
    if model is not None:
        for p in model.parameters():
            if p.is_floating_point():
                return str(p.dtype).removeprefix("torch.")
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dt).removeprefix("torch.") if dt is not None else "float32"


def _find_blocks(model: torch.nn.Module, fam: FamilySpec) -> list[tuple[int, str]]:
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


def routing_spec(model_or_config: Any) -> RoutingSpec:
    """The routing facts of a model or config, without running anything.

    With a model, MoE layers and module paths come from its module names and must agree with the
    family's dense-layer rule; with a config alone, they follow the rule and the usual prefix.
    """
    model = model_or_config if isinstance(model_or_config, torch.nn.Module) else None
    config = _text_config(model.config if model is not None else model_or_config)
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise ConfigError(f"cannot tell the model family: {type(config).__name__} has no model_type")
    fam = resolve_adapter(model_type)
    num_experts = int(config_value(config, fam.num_experts_keys, "the number of routed experts"))
    top_k = int(config_value(config, fam.top_k_keys, "top-k"))
    n_layers = int(config_value(config, ("num_hidden_layers", "n_layers"), "the number of layers"))
    if fam.shared_rule is not None:
        n_shared = fam.shared_rule(config)
    else:
        n_shared = int(config_value(config, fam.shared_keys, "shared experts")) if fam.shared_keys else 0
    rule_layers = [i for i in range(n_layers) if fam.is_moe_layer(config, i)]
    if model is not None:
        blocks = _find_blocks(model, fam)
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
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"{model_type}: config top-k={top_k} is not in 1..num_experts={num_experts}")
    spec = RoutingSpec(
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        family=model_type,
        router_kind=fam.router_kind,
        n_shared_experts=int(n_shared),
        num_hidden_layers=n_layers,
        module_paths=paths,
        dtype=_model_dtype(model, config),
    )
    spec.check()
    return spec


def _arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    if len(args) > pos:
        return args[pos]
    if name in kwargs:
        return kwargs[name]
    return None


def _output(out: Any, index: int | None) -> torch.Tensor:
    return out if index is None else out[index]


@dataclass
class _Collector:
    """Tensors gathered during one forward pass, keyed by MoE-layer position (0..L-1)."""

    ids: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    lookahead: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    suspended: bool = False


_ACTIVE: ContextVar[_Collector | None] = ContextVar("moescope_routing_collector", default=None)


class HookSet:
    """Hooks installed on entering the first ``with`` block and removed when the last one exits.

    Re-entrant and thread-safe; a failed installation removes whatever was installed. Subclasses
    define ``_install`` and ``_remove`` and set ``_depth = 0`` and ``_lock`` in ``__init__``.
    """

    _depth: int
    _lock: threading.Lock

    def _install(self) -> None:
        raise NotImplementedError

    def _remove(self) -> None:
        raise NotImplementedError

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


class RoutingRecorder(HookSet):
    """Context manager that records routing from a loaded transformers MoE model.

    Hooks are installed on entering ``with`` and removed on leaving it (also on error); outside
    an active :meth:`run` they do nothing. :meth:`run` may be called inside or outside ``with``.

    Parameters
    ----------
    model : a transformers causal LM of a family in :mod:`moescope.capture.adapters`, in eval mode.
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
        self._blocks = [model.get_submodule(p) for p in self.spec.module_paths]
        self._routers = [getattr(b, self.family.router) for b in self._blocks]
        self._plan = (
            LookaheadPlan.build(model, self.spec, self.family, self._routers, lookahead)
            if lookahead
            else None
        )
        self.lookahead_columns = self._plan.columns if self._plan else []
        self._handles: list[Any] = []
        self._depth = 0  # nesting of `with` blocks (run() enters one itself)
        self._lock = threading.Lock()
        sig = inspect.signature(model.forward).parameters
        self._pass_positions = "position_ids" in sig
        self._logits_to_keep = "logits_to_keep" in sig

    # -- hook installation ---------------------------------------------------------------------

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _install(self) -> None:
        fam = self.family
        for j, (block, router) in enumerate(zip(self._blocks, self._routers, strict=True)):
            if fam.selection == "experts_call":
                experts = getattr(block, fam.experts, None) if fam.experts else None
                if experts is None:
                    raise ConfigError(f"{self.spec.module_paths[j]}: no {fam.experts!r} module to hook")
                self._handles.append(
                    experts.register_forward_pre_hook(self._experts_hook(j), with_kwargs=True)
                )
            self._handles.append(router.register_forward_hook(self._router_hook(j, block), with_kwargs=True))
        if self._plan is not None:
            self._handles.extend(self._plan.install(self._lookahead_sink))

    def _experts_hook(self, j: int):
        fam = self.family

        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            col = _ACTIVE.get()
            if col is None or col.suspended:
                return
            ids = _arg(args, kwargs, fam.index_arg, fam.index_kwarg)
            weights = _arg(args, kwargs, fam.weights_arg, fam.weights_kwarg)
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
            col = _ACTIVE.get()
            if col is None or col.suspended:
                return
            if self.logits:
                col.logits[j] = _output(out, fam.logits_index).detach()
            if fam.selection != "experts_call":
                ids, weights = decode_router_output(fam, block, out, k)
                col.ids[j], col.weights[j] = ids.detach(), weights.detach()
            if self._plan is not None:
                x = _arg(args, kwargs, 0, "hidden_states")
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
        scores = choice_scores(self.family, router, _output(out, self.family.logits_index))
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
            token = _ACTIVE.set(col)
            try:
                with torch.no_grad():
                    out = self.model(**kwargs)
            finally:
                _ACTIVE.reset(token)
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
        ids_out, w_out = _host(ids.gather(2, order)), _host(w.gather(2, order))
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
    return t.cpu().numpy()


def _check(path: str, what: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    """Captured tensors must match the config's N, k and E (peers have confused E with hidden size)."""
    if tuple(t.shape) != shape:
        raise ConfigError(
            f"{path}: captured {what} has shape {tuple(t.shape)}, expected {shape} (N=batch*seq, then k or E)"
        )


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
        weights, ids = getattr(block, fam.block_route)(_output(out, fam.logits_index))
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
