"""Calibration on a held-apart split: router-logit samples for ``pvalue``, and ``--match-k``.

``--match-k K`` sets the one free parameter of a strategy (``p`` of topp, ``w`` of threshold,
``alpha`` of pvalue, ``beta`` of skip) so that the mean number of experts per token, averaged over
MoE layers, equals K on the calibration texts; strategies are then compared at equal compute on the
rest. Mean k is monotone in each parameter, so a bisection finds it (on a log scale for alpha).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from moescope.errors import ConfigError
from moescope.strategies import StrategyPlan, StrategyRouter, parse_strategy

#: The free parameter per strategy, its range, whether mean k grows with it, and its scale.
FREE_PARAMETER: dict[str, tuple[str, float, float, bool, bool]] = {
    "topp": ("p", 1e-4, 1.0, True, False),
    "threshold": ("w", 0.0, 1.0, False, False),
    "pvalue": ("alpha", 1e-12, 1.0, True, True),
    "skip": ("beta", 0.0, 1.0, False, False),
}


def _batches(model: Any, tokenizer: Any, texts: Sequence[str], max_len: int, batch_size: int):
    ids = [tokenizer.encode(t)[:max_len] for t in texts if t]
    ids = [i for i in ids if i]
    if not ids:
        raise ConfigError("the calibration split holds no text: raise `calibration` or give more samples")
    for start in range(0, len(ids), batch_size):
        rows = ids[start : start + batch_size]
        T = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        yield batch, mask


def calibration_logits(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_len: int = 512,
    batch_size: int = 8,
    max_points: int = 4000,
    seed: int = 0,
) -> dict[int, np.ndarray]:
    """Router logits ``{decoder layer: (m, E)}`` of the calibration texts under the model's own routing."""
    from moescope.capture.engine import RoutingRecorder

    rec = RoutingRecorder(model, logits=True, logits_dtype="float32")
    parts = []
    for batch, mask in _batches(model, tokenizer, texts, max_len, batch_size):
        parts.append(rec.run(batch, mask)["logits"])
    x = np.concatenate(parts)  # (n, L, E)
    if len(x) > max_points:
        x = x[np.random.default_rng(seed).choice(len(x), max_points, replace=False)]
    return {layer: x[:, j] for j, layer in enumerate(rec.spec.moe_layers)}


def mean_active(
    model: Any,
    tokenizer: Any,
    plan: StrategyPlan,
    texts: Sequence[str],
    *,
    samples: dict[int, np.ndarray] | None = None,
    max_len: int = 512,
    batch_size: int = 8,
) -> float:
    """Mean experts per real token, averaged over MoE layers, of ``plan`` on ``texts``."""
    router = StrategyRouter(model, plan, record=True, samples=samples)
    total, tokens = 0.0, 0
    with torch.no_grad(), router:
        for batch, mask in _batches(model, tokenizer, texts, max_len, batch_size):
            model(batch, attention_mask=mask)
            m = mask.reshape(-1).bool()
            total += sum(
                float(a.count.reshape(-1)[m.to(a.count.device)].float().sum()) for a in router.applied
            )
            tokens += int(m.sum()) * len(router.applied)
    return total / max(tokens, 1)


def match_k(
    model: Any,
    tokenizer: Any,
    spec: str,
    target: float,
    texts: Sequence[str],
    *,
    samples: dict[int, np.ndarray] | None = None,
    iterations: int = 14,
    max_len: int = 512,
    batch_size: int = 8,
) -> tuple[str, float]:
    """``(spec with its free parameter set, achieved mean k)`` so that mean k is closest to ``target``."""
    plan = parse_strategy(spec)
    if plan.is_baseline or len(plan.items) != 1 or plan.items[0][1] is not None:
        raise ConfigError(f"`match_k` needs one strategy for every layer, got {spec!r}")
    strategy = plan.items[0][0]
    if strategy.name not in FREE_PARAMETER:
        raise ConfigError(
            f"`match_k`: strategy {strategy.name} has no free parameter to calibrate;"
            f" calibratable: {', '.join(FREE_PARAMETER)}"
        )
    key, lo, hi, increasing, log = FREE_PARAMETER[strategy.name]
    if log:
        lo, hi = math.log(lo), math.log(hi)

    def measure(x: float) -> tuple[str, float]:
        value = math.exp(x) if log else x
        s = type(strategy)(**{**strategy.get_params(), key: float(f"{value:.6g}")})
        text = s.spec()
        return text, mean_active(
            model,
            tokenizer,
            parse_strategy(text),
            texts,
            samples=samples,
            max_len=max_len,
            batch_size=batch_size,
        )

    best = measure(hi)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        text, k = measure(mid)
        if abs(k - target) < abs(best[1] - target):
            best = (text, k)
        if (k < target) == increasing:
            lo = mid
        else:
            hi = mid
    return best
