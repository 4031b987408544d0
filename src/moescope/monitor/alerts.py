"""Alert rules checked on every report: dead experts, imbalance, entropy collapse, sudden change.

Each firing rule logs one warning on the ``moescope.monitor`` logger naming the layer and the
experts involved, and is returned on the report as an :class:`Alert`. The running baseline of the
sudden-change rule is an exponential moving average per layer: fixed size, like the counters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from moescope.errors import ConfigError

logger = logging.getLogger("moescope.monitor")


@dataclass(frozen=True)
class AlertRules:
    """Thresholds; ``None`` switches a rule off.

    Parameters
    ----------
    max_dead_fraction : alert when more than this fraction of a layer's experts is dead.
    max_cv : alert when a layer's load CV exceeds this.
    min_entropy_norm : entropy collapse: alert when a layer's mean routing entropy falls below
        this fraction of log2 E.
    max_change : alert when a layer's load CV or normalised entropy moves by more than this
        (absolute) from its running baseline.
    baseline_decay : weight of the old baseline in the moving average (0.9: about ten reports).
    warmup : reports that only build the baseline before the change rule may fire.
    """

    max_dead_fraction: float | None = 0.25
    max_cv: float | None = 1.0
    min_entropy_norm: float | None = 0.2
    max_change: float | None = 0.5
    baseline_decay: float = 0.9
    warmup: int = 3

    def check(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for name in ("max_dead_fraction", "max_cv", "min_entropy_norm", "max_change"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int | float) and v >= 0):
                raise ConfigError(f"alert rule {name} must be a number >= 0 or None, got {v!r}")
        if not 0 <= self.baseline_decay < 1:
            raise ConfigError(f"alert rule baseline_decay must be in [0, 1), got {self.baseline_decay!r}")
        if self.warmup < 0:
            raise ConfigError(f"alert rule warmup must be >= 0, got {self.warmup!r}")


@dataclass(frozen=True)
class Alert:
    """One fired rule: which rule, layer, metric value, threshold, and the experts involved."""

    rule: str
    step: int
    layer: int
    value: float
    threshold: float
    experts: tuple[int, ...]
    message: str


def _top(share: np.ndarray, n: int = 3) -> tuple[int, ...]:
    return tuple(int(e) for e in np.argsort(-share, kind="stable")[:n])


@dataclass
class AlertState:
    """Checks :class:`AlertRules` against successive reports, keeping the running baselines."""

    rules: AlertRules
    reports: int = 0
    baseline: dict[str, np.ndarray] = field(default_factory=dict)
    last_share: np.ndarray | None = None

    def evaluate(self, report) -> list[Alert]:
        """Alerts for one :class:`~moescope.monitor.metrics.RoutingReport`, logged as warnings."""
        r, alerts = self.rules, []
        share, first = report.load_share, report.first_share  # (L, E)
        E = share.shape[1]
        pl = report.per_layer

        def fire(
            rule: str, i: int, value: float, threshold: float, experts: tuple[int, ...], what: str
        ) -> None:
            layer = report.layers[i]
            msg = f"step {report.step}: MoE layer {layer}: {what} (experts {list(experts)})"
            alerts.append(Alert(rule, report.step, layer, float(value), float(threshold), experts, msg))
            logger.warning(msg)

        for i in range(len(report.layers)):
            if not np.isfinite(pl["load_cv"][i]):
                continue
            dead = np.nonzero(share[i] < report.dead_share)[0]
            if r.max_dead_fraction is not None and len(dead) / E > r.max_dead_fraction:
                frac = len(dead) / E
                fire(
                    "dead_experts",
                    i,
                    frac,
                    r.max_dead_fraction,
                    tuple(int(e) for e in dead),
                    f"{len(dead)}/{E} experts dead ({frac:.0%} > {r.max_dead_fraction:.0%})",
                )
            cv = pl["load_cv"][i]
            if r.max_cv is not None and cv > r.max_cv:
                fire(
                    "load_cv",
                    i,
                    cv,
                    r.max_cv,
                    _top(share[i]),
                    f"load CV {cv:.3f} > {r.max_cv} (most loaded listed)",
                )
            h = pl["entropy_norm"][i]
            if r.min_entropy_norm is not None and np.isfinite(h) and h < r.min_entropy_norm:
                fire(
                    "entropy_collapse",
                    i,
                    h,
                    r.min_entropy_norm,
                    _top(first[i]),
                    f"routing entropy {h:.3f} of log2 E < {r.min_entropy_norm} (top first choices listed)",
                )
        if r.max_change is not None and self.reports >= r.warmup:
            for metric in ("load_cv", "entropy_norm"):
                base = self.baseline.get(metric)
                if base is None:
                    continue
                delta = pl[metric] - base
                for i in np.nonzero(np.isfinite(delta) & (np.abs(delta) > r.max_change))[0]:
                    moved = share[i] - self.last_share[i] if self.last_share is not None else share[i]
                    fire(
                        "sudden_change",
                        int(i),
                        delta[i],
                        r.max_change,
                        _top(np.abs(moved)),
                        f"{metric} moved {delta[i]:+.3f} from its running baseline {base[i]:.3f}"
                        " (experts whose share moved most listed)",
                    )
        self._update(pl, share)
        return alerts

    def _update(self, per_layer: dict[str, np.ndarray], share: np.ndarray) -> None:
        d = self.rules.baseline_decay
        for metric in ("load_cv", "entropy_norm"):
            x = per_layer[metric]
            old = self.baseline.get(metric)
            if old is None:
                self.baseline[metric] = x.copy()
            else:
                new = d * old + (1 - d) * x
                self.baseline[metric] = np.where(np.isfinite(old), np.where(np.isfinite(x), new, old), x)
        self.last_share = share.copy()
        self.reports += 1
