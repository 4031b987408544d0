"""Parse strategy specs: ``name:key=val,...``, per-layer with ``@LAYERS``, several joined by ``;``.

Grammar (layers are decoder-layer indices, as in ``moescope ablate``)::

    spec  := item (';' item)*
    item  := name [':' key=val (',' key=val)*] ['@' layers]
           | 'mask:' LAYER ':' E ('+' E)*
    layers:= N | N-M, comma separated

An item without ``@`` covers every MoE layer no other item names; later items win on the layers
they name. ``baseline``, ``none`` and the seed documents' ``topk_baseline`` mean the model's own
routing. Examples: ``topp:p=0.7``, ``topk:k=1@0-2;topp:p=0.9``, ``mask:3:1+5;mask:4:0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moescope.errors import ConfigError
from moescope.strategies.base import BaseStrategy, ModelFacts
from moescope.strategies.rules import STRATEGIES, Mask, PValue

#: Spec names meaning "no strategy" (the model's own routing).
BASELINE_NAMES = ("baseline", "none", "topk_baseline")


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _layers(text: str, where: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(
                f"strategy {where!r}: layers {text!r} must be N or N-M, comma separated"
            ) from None
    return out


def parse_item(text: str) -> tuple[BaseStrategy, list[int] | None]:
    """One ``name:params[@layers]`` item as an unfitted strategy and its layers (``None``: all)."""
    body, _, at = text.partition("@")
    body = body.strip()
    layers = _layers(at, text) if at.strip() else None
    name, _, params = body.partition(":")
    name = name.strip().lower()
    if name == "mask":
        layer, sep, experts = params.partition(":")
        if not sep or not experts.strip():
            raise ConfigError(f"strategy {text!r}: mask is written mask:LAYER:E[+E..], e.g. mask:3:1+5")
        try:
            ids = tuple(int(e) for e in experts.split("+"))
        except ValueError:
            raise ConfigError(f"strategy {text!r}: mask experts must be integers joined by '+'") from None
        return Mask(experts=ids), _layers(layer, text)
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown strategy {name!r} in {text!r}; known: {', '.join(STRATEGIES)}, {', '.join(BASELINE_NAMES)}"
        )
    kwargs: dict[str, Any] = {}
    for pair in filter(None, (p.strip() for p in params.split(","))):
        key, eq, val = pair.partition("=")
        if not eq:
            raise ConfigError(f"strategy {text!r}: parameter {pair!r} must be key=value")
        kwargs[key.strip()] = _value(val)
    return cls().set_params(**kwargs), layers


@dataclass
class StrategyPlan:
    """Which strategy runs at which decoder layer; layers not in :attr:`by_layer` keep their routing."""

    spec: str
    items: list[tuple[BaseStrategy, list[int] | None]] = field(default_factory=list)
    by_layer: dict[int, BaseStrategy] = field(default_factory=dict)

    @property
    def is_baseline(self) -> bool:
        return not self.items

    def fit(self, facts: ModelFacts, samples: dict[int, np.ndarray] | None = None) -> StrategyPlan:
        """Fit each item's strategy and assign it to layers; layer numbers are checked."""
        self.by_layer = {}
        masks: dict[int, set[int]] = {}
        for strategy, layers in self.items:
            bad = [layer for layer in layers or () if layer not in facts.moe_layers]
            if bad:
                raise ConfigError(
                    f"strategy {self.spec!r}: layer(s) {bad} are not MoE layers; MoE layers: {list(facts.moe_layers)}"
                )
            if isinstance(strategy, Mask):
                for layer in layers or facts.moe_layers:
                    masks.setdefault(layer, set()).update(strategy.experts)
            elif isinstance(strategy, PValue):
                strategy.fit(facts, samples)
            else:
                strategy.fit(facts)
        rules = [(s, layers) for s, layers in self.items if not isinstance(s, Mask)]
        for strategy, layers in [r for r in rules if r[1] is None] + [r for r in rules if r[1] is not None]:
            for layer in layers or facts.moe_layers:
                self.by_layer[layer] = strategy
        for layer, ids in masks.items():
            if layer in self.by_layer:
                raise ConfigError(
                    f"strategy {self.spec!r}: layer {layer} has both a mask and {self.by_layer[layer].name};"
                    " give one strategy per layer"
                )
            self.by_layer[layer] = Mask(experts=tuple(sorted(ids))).fit(facts)
        return self

    def needs_calibration(self) -> bool:
        """True when a ``pvalue`` item has no density file and needs calibration logits."""
        return any(isinstance(s, PValue) and s.density is None for s, _ in self.items)


def parse_strategy(spec: str | None) -> StrategyPlan:
    """Parse a spec (see the module docstring); errors name the item at fault.

    Examples
    --------
    >>> plan = parse_strategy("topk:k=1@0-1;topp:p=0.9")
    >>> [(s.name, layers) for s, layers in plan.items]
    [('topk', [0, 1]), ('topp', None)]
    """
    text = (spec or "").strip()
    plan = StrategyPlan(spec=text or "baseline")
    if not text or text.lower() in BASELINE_NAMES:
        return plan
    for item in text.split(";"):
        if not item.strip():
            continue
        if item.strip().lower() in BASELINE_NAMES:
            raise ConfigError(f"strategy {text!r}: {item.strip()!r} cannot be combined with other items")
        plan.items.append(parse_item(item))
    return plan
