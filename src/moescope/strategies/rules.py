"""The routing strategies, one small class each, and their registry.

Every rule reads one layer's :class:`~moescope.strategies.base.Routing` and returns the experts each
token uses; probabilities are the router's (softmax, or sigmoid scores normalised to sum 1), and
"ranked" means the model's own choice first, then the other experts by the router's selection score.

=============  ======================================================================================
``topk``       the first ``k`` ranked experts; at the model's own k this is the model's own choice
``topp``       the smallest set of most probable experts whose probability reaches ``p``
               (Huang et al. 2024 dynamic routing), clipped to ``min..max`` experts
``threshold``  experts whose probability reaches ``w``; at least the most probable one
``pvalue``     experts whose logit is significantly high under a per-expert null (Gaussian KDE of
               the expert's logits, from a ``moescope analyze`` density model or fitted on a
               calibration sample), corrected over the E tests per token (``bh``, ``bonferroni``,
               ``none``); at least the most probable one
``skip``       NAEE dynamic skipping: drop a lower-ranked expert of the model's own choice whose
               weight is below ``beta`` times the first; the others keep their weights
``entropy``    entropy-guided dynamic k: ``k = low + round((high - low) * H / log E)``, H the
               entropy of the routing probabilities (confident tokens get fewer experts)
``mask``       the ablation's ``drop`` as a strategy: listed experts lose their slot and weight
``random``     ``k`` experts drawn uniformly per token (a control)
=============  ======================================================================================
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import special

from moescope.errors import ConfigError, DataError
from moescope.strategies.base import BaseStrategy, ModelFacts, Routing

CORRECTIONS = ("bh", "bonferroni", "none")


def _number(strategy: str, key: str, value: Any, kind: type) -> Any:
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"strategy {strategy}: parameter {key}={value!r} is not a{'n integer' if kind is int else ' number'}"
        ) from None
    if kind is int and isinstance(value, float) and value != out:
        raise ConfigError(f"strategy {strategy}: parameter {key}={value!r} is not an integer")
    if kind is float and not math.isfinite(out):
        raise ConfigError(f"strategy {strategy}: parameter {key}={value!r} is not finite")
    return out


def _argmax_mask(r: Routing) -> torch.Tensor:
    return torch.zeros_like(r.model_mask).scatter(1, r.top1, True)


class TopK(BaseStrategy):
    """The first ``k`` ranked experts (default: the model's own k), for any k in 1..E.

    Examples
    --------
    >>> TopK(k=1).fit(ModelFacts(8, 2, "mixtral", (0, 1))).k_
    1
    """

    name = "topk"
    nonempty = True

    def __init__(self, k: int | None = None) -> None:
        self.k = k

    def fit(self, facts: ModelFacts) -> TopK:
        k = facts.top_k if self.k is None else _number(self.name, "k", self.k, int)
        if not 1 <= k <= facts.num_experts:
            raise ConfigError(f"strategy topk: k={k} is outside 1..E={facts.num_experts} for this model")
        self.k_ = k
        return super().fit(facts)

    def select(self, r: Routing) -> torch.Tensor:
        self._check_fitted()
        if self.k_ == r.ids.shape[1]:
            return r.model_mask
        return r.top_ranked(self.k_)

    def select_prefix(self, r: Routing) -> tuple[torch.Tensor | None, torch.Tensor]:
        self._check_fitted()
        count = torch.full((r.n,), self.k_, dtype=torch.long, device=r.logits.device)
        return (None if self.k_ == r.ids.shape[1] else r.ranking), count  # None: the model's own


class TopP(BaseStrategy):
    """The smallest set of most probable experts whose probability reaches ``p``, ``min..max`` experts."""

    name = "topp"
    nonempty = True

    def __init__(self, p: float = 0.9, min: int = 1, max: int | None = None) -> None:
        self.p = p
        self.min = min
        self.max = max

    def fit(self, facts: ModelFacts) -> TopP:
        p = _number(self.name, "p", self.p, float)
        if not 0 < p <= 1:
            raise ConfigError(f"strategy topp: p={p} is outside (0, 1]")
        lo = _number(self.name, "min", self.min, int)
        hi = facts.num_experts if self.max is None else _number(self.name, "max", self.max, int)
        if not 1 <= lo <= hi <= facts.num_experts:
            raise ConfigError(f"strategy topp: need 1 <= min={lo} <= max={hi} <= E={facts.num_experts}")
        self.p_, self.min_, self.max_ = p, lo, hi
        return super().fit(facts)

    def select_prefix(self, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        probs, order = r.prob_sort
        if self.p_ < 1:
            before = probs.cumsum(1) - probs  # mass of the better experts
            count = (before < self.p_).sum(1)
        else:
            count = torch.full((r.n,), r.num_experts, device=probs.device)
        return order, count.clamp(self.min_, self.max_)


class Threshold(BaseStrategy):
    """Experts whose routing probability reaches ``w`` (at least the most probable one)."""

    name = "threshold"
    nonempty = True

    def __init__(self, w: float = 0.1) -> None:
        self.w = w

    def fit(self, facts: ModelFacts) -> Threshold:
        w = _number(self.name, "w", self.w, float)
        if not 0 <= w <= 1:
            raise ConfigError(f"strategy threshold: w={w} is outside [0, 1]")
        self.w_ = w
        return super().fit(facts)

    def select_prefix(self, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities rise with the logits, so the experts reaching ``w`` lead the logit order."""
        self._check_fitted()
        order = r.logit_sort[1]
        return order, (r.probs >= self.w_).sum(1).clamp(min=1)


class ExpertNull:
    """Per layer and expert, the upper-tail probability of a logit under a 1-D Gaussian KDE.

    Built from a sample of logit vectors ``{decoder layer: (m, E)}`` (the ``raw`` sample a
    ``moescope analyze`` density model keeps, or a calibration pass); Scott bandwidth. The survival
    function is tabulated on a grid at the kernel's scale and interpolated at run time.
    """

    def __init__(self, samples: dict[int, np.ndarray], grid: int = 512) -> None:
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, x in samples.items():
            x = np.asarray(x, np.float64)
            if x.ndim != 2 or len(x) < 2:
                raise DataError(
                    f"layer {layer}: need at least 2 logit vectors for a p-value null, got {x.shape}"
                )
            h = np.maximum(x.std(0), 1e-6) * len(x) ** (-0.2)  # (E,)
            lo, hi = (x.min(0) - 6 * h).min(), (x.max(0) + 6 * h).max()
            g = np.linspace(lo, hi, grid)
            sf = np.stack(
                [special.ndtr((x[:, e][None, :] - g[:, None]) / h[e]).mean(1) for e in range(x.shape[1])]
            )
            self.tables[layer] = (torch.from_numpy(g).float(), torch.from_numpy(sf).float())  # (G,), (E, G)

    @property
    def layers(self) -> list[int]:
        return sorted(self.tables)

    def p_values(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        """``(N, E)`` one-sided p-values ``P(L_e >= x_e)`` of the logits ``(N, E)``."""
        g, sf = self.tables[layer]
        g, sf = g.to(logits.device), sf.to(logits.device)
        x = logits.float().clamp(float(g[0]), float(g[-1]))
        pos = torch.searchsorted(g, x.T.contiguous()).clamp(1, len(g) - 1)  # (E, N)
        g0, g1 = g[pos - 1], g[pos]
        s0, s1 = sf.gather(1, pos - 1), sf.gather(1, pos)
        t = (x.T - g0) / (g1 - g0)
        return (s0 + t * (s1 - s0)).T.clamp(0, 1)


def adjust(p: torch.Tensor, alpha: float, correction: str) -> torch.Tensor:
    """``(N, E)`` bool: which of each row's E tests are rejected at level ``alpha``."""
    E = p.shape[1]
    if correction == "none":
        return p <= alpha
    if correction == "bonferroni":
        return p * E <= alpha
    sp, order = p.sort(dim=1)  # Benjamini-Hochberg step-up
    ok = sp <= alpha * torch.arange(1, E + 1, device=p.device, dtype=p.dtype) / E
    last = torch.where(ok, torch.arange(1, E + 1, device=p.device), 0).amax(1, keepdim=True)  # (N, 1)
    ranks = torch.arange(1, E + 1, device=p.device).reshape(1, -1) <= last
    return torch.zeros_like(ranks).scatter(1, order, ranks)


class PValue(BaseStrategy):
    """Experts whose logit is significantly high under a per-expert null, corrected per token.

    ``density`` is a ``moescope analyze`` density model (``.json`` + ``.npz``); without it, call
    :meth:`fit` with ``samples`` (calibration logits ``{decoder layer: (m, E)}``).
    """

    name = "pvalue"
    nonempty = True

    def __init__(self, alpha: float = 0.05, correction: str = "bh", density: str | None = None) -> None:
        self.alpha = alpha
        self.correction = correction
        self.density = density

    def fit(self, facts: ModelFacts, samples: dict[int, np.ndarray] | None = None) -> PValue:
        alpha = _number(self.name, "alpha", self.alpha, float)
        if not 0 < alpha <= 1:
            raise ConfigError(f"strategy pvalue: alpha={alpha} is outside (0, 1]")
        correction = "none" if self.correction is None else str(self.correction).lower()
        if correction not in CORRECTIONS:
            raise ConfigError(
                f"strategy pvalue: correction={self.correction!r} is not one of {', '.join(CORRECTIONS)}"
            )
        self.correction_ = correction
        if self.density is not None:
            samples = self._load_density(facts)
        elif samples is None:
            raise ConfigError(
                "strategy pvalue: give density=FILE (a `moescope analyze` density model) or calibration logits"
            )
        missing = [layer for layer in facts.moe_layers if layer not in samples]
        if missing:
            raise ConfigError(f"strategy pvalue: the null has no logits for MoE layer(s) {missing}")
        bad = {layer: np.shape(x) for layer, x in samples.items() if np.shape(x)[-1] != facts.num_experts}
        if bad:
            raise ConfigError(
                f"strategy pvalue: null logits have the wrong width {bad}, E={facts.num_experts}"
            )
        self.alpha_ = alpha
        self.null_ = ExpertNull({layer: samples[layer] for layer in facts.moe_layers})
        return super().fit(facts)

    def _load_density(self, facts: ModelFacts) -> dict[int, np.ndarray]:
        from moescope.analysis.density import LogitDensity

        path = Path(str(self.density))
        model = LogitDensity.load(path)
        if model.num_experts != facts.num_experts:
            raise ConfigError(
                f"strategy pvalue: density={path} was fitted on a model with E={model.num_experts},"
                f" this model has E={facts.num_experts}"
            )
        missing = [layer for layer in facts.moe_layers if layer not in model.raw]
        if missing:
            raise ConfigError(
                f"strategy pvalue: density={path} has layers {model.layers}, not this model's MoE layer(s) {missing}"
            )
        return model.raw

    def select(self, r: Routing) -> torch.Tensor:
        self._check_fitted()
        p = self.null_.p_values(r.layer, r.logits)
        return adjust(p, self.alpha_, self.correction_) | _argmax_mask(r)


class Skip(BaseStrategy):
    """NAEE dynamic skipping: drop ranked expert i > 0 of the model's choice if ``w_i < beta * w_0``."""

    name = "skip"
    nonempty = True
    reweight = False

    def __init__(self, beta: float = 0.5) -> None:
        self.beta = beta

    def fit(self, facts: ModelFacts) -> Skip:
        beta = _number(self.name, "beta", self.beta, float)
        if not 0 <= beta <= 1:
            raise ConfigError(f"strategy skip: beta={beta} is outside [0, 1]")
        self.beta_ = beta
        return super().fit(facts)

    def select(self, r: Routing) -> torch.Tensor:
        self._check_fitted()
        w = r.weights.float()
        first = w.max(1, keepdim=True).values
        keep = (w >= self.beta_ * first) | (w == first)
        return torch.zeros_like(r.model_mask).scatter(1, r.ids, keep)


class Entropy(BaseStrategy):
    """Entropy-guided k: ``low + round((high - low) * H / log E)`` ranked experts per token."""

    name = "entropy"
    nonempty = True

    def __init__(self, low: int = 1, high: int | None = None) -> None:
        self.low = low
        self.high = high

    def fit(self, facts: ModelFacts) -> Entropy:
        lo = _number(self.name, "low", self.low, int)
        hi = facts.num_experts if self.high is None else _number(self.name, "high", self.high, int)
        if not 1 <= lo <= hi <= facts.num_experts:
            raise ConfigError(f"strategy entropy: need 1 <= low={lo} <= high={hi} <= E={facts.num_experts}")
        self.low_, self.high_ = lo, hi
        return super().fit(facts)

    def k_of(self, r: Routing) -> torch.Tensor:
        """``(N,)`` experts per token."""
        p = r.probs
        h = -(p * p.clamp_min(1e-30).log()).sum(1) / math.log(r.num_experts)
        return (self.low_ + torch.round((self.high_ - self.low_) * h.clamp(0, 1))).long()

    def select_prefix(self, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        return r.ranking, self.k_of(r)


class Mask(BaseStrategy):
    """The ablation's ``drop``: the listed experts lose their weight, nothing is renormalised."""

    name = "mask"
    reweight = False
    min_experts = 0

    def __init__(self, experts: tuple[int, ...] = ()) -> None:
        self.experts = experts

    def fit(self, facts: ModelFacts) -> Mask:
        ids = sorted({_number(self.name, "experts", e, int) for e in self.experts})
        bad = [e for e in ids if not 0 <= e < facts.num_experts]
        if bad:
            raise ConfigError(f"strategy mask: expert ids {bad} are outside 0..{facts.num_experts - 1}")
        self.off_ = torch.zeros(facts.num_experts, dtype=torch.bool)
        self.off_[ids] = True
        return super().fit(facts)

    def select(self, r: Routing) -> torch.Tensor:
        self._check_fitted()
        return r.model_mask & ~self.off_.to(r.logits.device)


class Random(BaseStrategy):
    """``k`` experts per token drawn uniformly (default: the model's k); a control for the others."""

    name = "random"
    nonempty = True

    def __init__(self, k: int | None = None, seed: int = 0) -> None:
        self.k = k
        self.seed = seed

    def fit(self, facts: ModelFacts) -> Random:
        k = facts.top_k if self.k is None else _number(self.name, "k", self.k, int)
        if not 1 <= k <= facts.num_experts:
            raise ConfigError(f"strategy random: k={k} is outside 1..E={facts.num_experts} for this model")
        self.k_ = k
        self.generator_ = torch.Generator().manual_seed(_number(self.name, "seed", self.seed, int))
        return super().fit(facts)

    def select(self, r: Routing) -> torch.Tensor:
        self._check_fitted()
        u = torch.rand(r.logits.shape, generator=self.generator_).to(r.logits.device)
        pick = u.topk(self.k_, dim=1).indices
        return torch.zeros_like(r.model_mask).scatter(1, pick, True)


#: The registry: strategy name -> class.
STRATEGIES: dict[str, type[BaseStrategy]] = {
    cls.name: cls for cls in (TopK, TopP, Threshold, PValue, Skip, Entropy, Mask, Random)
}
