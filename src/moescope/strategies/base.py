"""What a routing strategy sees and returns: one layer's routing, the model's facts, the base class.

A strategy is a small scikit-learn style estimator: ``__init__`` only stores its keyword arguments,
:meth:`BaseStrategy.fit` validates them against the model (E, k, MoE layers) and sets the learned
attributes (ending in ``_``), and :meth:`BaseStrategy.select` maps one layer's routing to a boolean
``(N, E)`` mask of the experts each token uses. Turning that mask into the ids and weights the
family's block consumes is the applier's job (:mod:`moescope.strategies.apply`), so every strategy
works on every family.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch

from moescope.errors import ConfigError


@dataclass(frozen=True)
class ModelFacts:
    """The routing facts a strategy is fitted against (from :class:`moescope.trace.RoutingSpec`)."""

    num_experts: int
    top_k: int
    family: str
    moe_layers: tuple[int, ...]
    router_kind: str = "softmax"


class Routing:
    """One MoE layer's routing for ``N`` tokens, as the block was about to consume it.

    Parameters
    ----------
    logits : ``(N, E)`` router logits.
    ids, weights : ``(N, k)`` the model's own choice and weights (after bias, groups, scaling).
    scores : ``(N, E)`` the score the router selects with (probability transform plus correction
        bias), used to rank experts beyond the model's own choice.
    router_kind : ``softmax``, ``sigmoid`` or ``sparsemixer``: how logits become probabilities.
    layer : decoder-layer index of this MoE layer.
    """

    def __init__(
        self,
        logits: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        scores: torch.Tensor,
        router_kind: str,
        layer: int,
    ) -> None:
        self.logits = logits.reshape(-1, logits.shape[-1]).float()
        self.ids = ids.long()
        self.weights = weights
        self.scores = scores
        self.router_kind = router_kind
        self.layer = layer

    @property
    def n(self) -> int:
        return self.logits.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits.shape[1]

    @cached_property
    def probs(self) -> torch.Tensor:
        """``(N, E)`` routing probabilities summing to 1: softmax, or sigmoid scores normalised."""
        if self.router_kind == "sigmoid":
            s = self.logits.sigmoid()
            return s / s.sum(-1, keepdim=True)
        return self.logits.softmax(-1)

    @cached_property
    def model_mask(self) -> torch.Tensor:
        """``(N, E)`` bool: the experts the model itself chose."""
        return torch.zeros(self.logits.shape, dtype=torch.bool, device=self.logits.device).scatter(
            1, self.ids, True
        )

    @cached_property
    def logit_sort(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits sorted in descending order (stable) and the order, computed once per layer call.

        Without ties every sort gives the stable order, so the cheaper unstable sort is tried
        first and the stable one runs only when two sorted logits of a token are equal.
        """
        values, order = self.logits.sort(dim=1, descending=True)
        if bool((values[:, 1:] == values[:, :-1]).any()):
            return self.logits.sort(dim=1, descending=True, stable=True)
        return values, order

    @cached_property
    def prob_sort(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:attr:`probs` in descending order and the order: that of the logits, as probs rise with them."""
        order = self.logit_sort[1]
        return self.probs.gather(1, order), order

    @cached_property
    def top1(self) -> torch.Tensor:
        """``(N, 1)`` the most probable expert of each token."""
        if "logit_sort" in self.__dict__:
            return self.logit_sort[1][:, :1]
        return self.probs.argmax(1, keepdim=True)

    @cached_property
    def ranking(self) -> torch.Tensor:
        """``(N, E)`` every expert id, the model's own choice first (by selection score), then by score.

        One stable sort of the scores suffices when the model chose exactly its first k experts
        with no tie among them (plain top-k routers); it is :attr:`logit_sort` when the scores are
        the logits. Otherwise the choice and the rest are sorted apart.
        """
        chosen = self.ids
        k = chosen.shape[1]
        if torch.equal(self.scores, self.logits):
            ss, order = self.logit_sort
        else:
            ss, order = self.scores.sort(dim=1, descending=True, stable=True)
        if torch.equal(order[:, :k], chosen):  # the model's slots are the order's first k (top-k routers)
            return order
        ok = self.model_mask.gather(1, order[:, :k]).all()
        if k > 1:
            ok = ok & (ss[:, 1:k] < ss[:, : k - 1]).all()
        if bool(ok):
            return order
        sub = torch.argsort(self.scores.gather(1, chosen), dim=1, descending=True, stable=True)
        first = chosen.gather(1, sub)
        chosen_last = torch.argsort(self.model_mask.gather(1, order).to(torch.int8), dim=1, stable=True)
        rest = order.gather(1, chosen_last)[:, : self.num_experts - k]  # the others, by score
        return torch.cat([first, rest], dim=1)

    def top_ranked(self, k: torch.Tensor | int) -> torch.Tensor:
        """``(N, E)`` bool mask of the first ``k`` experts of :attr:`ranking` (``k`` per token or one int)."""
        return self.prefix_mask(self.ranking, k)

    def prefix_mask(self, order: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        """``(N, E)`` bool mask of the first ``count`` experts of ``order`` (per token or one int)."""
        E = self.num_experts
        k_t = torch.as_tensor(count, device=self.logits.device).reshape(-1, 1)
        keep = torch.arange(E, device=self.logits.device).reshape(1, E) < k_t
        return torch.zeros_like(keep.expand(self.n, E)).scatter(1, order, keep.expand(self.n, E))


class BaseStrategy:
    """Base of every routing strategy: parameters in ``__init__``, :meth:`fit`, :meth:`select`.

    Class attributes
    ----------------
    name : the registry key (``topk``, ``topp``, ...).
    reweight : ``True``: the chosen set is weighted by the family's own rule from the router's
        logits; ``False``: kept experts keep the model's weights and nothing is renormalised (the
        ablation's ``drop``), so the set must be a subset of the model's own choice.
    min_experts : the fewest experts a token may keep (``mask`` may drop them all, as ablation does).
    nonempty : ``True`` when :meth:`select` always keeps at least ``min_experts`` experts itself, so
        the applier need not add the most probable expert to empty rows.
    """

    name: ClassVar[str] = ""
    reweight: ClassVar[bool] = True
    min_experts: ClassVar[int] = 1
    nonempty: ClassVar[bool] = False

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """The constructor's arguments, as stored."""
        return {p: getattr(self, p) for p in self._param_names()}

    def set_params(self, **params: Any) -> BaseStrategy:
        """Set constructor arguments (unknown names are refused, naming the strategy)."""
        names = self._param_names()
        for key, value in params.items():
            if key not in names:
                raise ConfigError(
                    f"strategy {self.name}: unknown parameter {key!r}; parameters: {', '.join(names) or 'none'}"
                )
            setattr(self, key, value)
        return self

    def fit(self, facts: ModelFacts) -> BaseStrategy:
        """Check the parameters against the model; learned attributes end in ``_``. Returns ``self``."""
        self.facts_ = facts
        return self

    def select(self, routing: Routing) -> torch.Tensor:
        """``(N, E)`` bool: the experts each token uses."""
        order, count = self.select_prefix(routing)
        return routing.model_mask if order is None else routing.prefix_mask(order, count)

    def select_prefix(self, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order (N, E), count (N,))``: the experts each token uses are the first ``count`` of ``order``.

        Optional: a strategy whose set is a prefix of an ordering (top-k, top-p, threshold,
        entropy) defines this and :meth:`select` follows; when ``order`` is the routing's
        :attr:`~Routing.ranking` the applier takes the ids straight from it, with no mask;
        ``order`` ``None`` means the model's own choice, unchanged.
        """
        raise NotImplementedError(f"strategy {self.name} defines neither select nor select_prefix")

    @classmethod
    def has_prefix(cls) -> bool:
        """Whether the strategy defines :meth:`select_prefix`."""
        return cls.select_prefix is not BaseStrategy.select_prefix

    def spec(self) -> str:
        """The ``name:key=val,...`` text that rebuilds this strategy (defaults left out)."""
        defaults = {
            p.name: p.default
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self"
        }
        parts = [f"{k}={_fmt(v)}" for k, v in self.get_params().items() if v != defaults.get(k)]
        return self.name + (":" + ",".join(parts) if parts else "")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self) -> ModelFacts:
        facts = getattr(self, "facts_", None)
        if facts is None:
            raise ConfigError(f"strategy {self.name} is not fitted: call fit(facts) first")
        return facts


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(int(value))
    return str(value)
