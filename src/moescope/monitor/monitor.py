"""``RoutingMonitor``: live routing metrics of a MoE model while it trains.

Attach it to a model, let the training loop run, and call :meth:`RoutingMonitor.step` once per
optimizer step; every ``every`` steps it turns its fixed-size counters into a
:class:`~moescope.monitor.metrics.RoutingReport`, sends it to its sinks, checks the alert rules and
starts a new window. The integrations in :mod:`moescope.monitor.integrations` call ``step`` for
the transformers Trainer and PyTorch Lightning.

Examples
--------
>>> from moescope.capture.tiny import tiny_model
>>> model = tiny_model("mixtral").train()
>>> opt = torch.optim.SGD(model.parameters(), lr=1e-3)
>>> with RoutingMonitor(model, every=2, alerts=None) as monitor:
...     for step in range(4):
...         loss = model(torch.tensor([[5, 6, 7, 8]]), labels=torch.tensor([[5, 6, 7, 8]])).loss
...         loss.backward(); opt.step(); opt.zero_grad()
...         report = monitor.step()
>>> report.step, report.tokens, sorted(report.summary)[:2]
(4, 8, ['aux_loss', 'dead_experts'])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moescope.capture.engine import check_transformers_version
from moescope.core.families import resolve_adapter
from moescope.core.routing import routing_spec
from moescope.errors import ConfigError
from moescope.monitor.alerts import AlertRules, AlertState
from moescope.monitor.counters import RoutingCounters
from moescope.monitor.hooks import MonitorHooks
from moescope.monitor.metrics import RoutingReport, layer_metrics, summarise

logger = logging.getLogger("moescope.monitor")


class RoutingMonitor:
    """Accumulate routing over the training steps between two reports, without storing tokens.

    Parameters
    ----------
    model : a transformers MoE causal LM of a family the capture engine supports.
    every : report every this many :meth:`step` calls (optimizer steps).
    dead_share : an expert whose share of a layer's assignments is below this is dead (0.001).
    sinks : objects with ``write(report)`` (:mod:`moescope.monitor.sinks`).
    alerts : :class:`AlertRules`, or None for no alerts.
    per_layer, per_expert : what :meth:`RoutingReport.scalars` includes by default for trackers;
        per-expert series (2 x L x E) only when asked.
    prefix : name prefix of the tracker scalars.
    sample_every, sample_dir : every this many steps, write the last batch's full routing as a
        trace under ``sample_dir`` (:mod:`moescope.monitor.sampling`); off by default.
    train_only : count only forward passes made in training mode (evaluation passes are skipped).
    aux_loss : compute the family's own aux loss (when its modeling file has one).

    Attributes
    ----------
    spec : the model's :class:`~moescope.trace.RoutingSpec`.
    steps : steps seen. reports : reports made. last_report : the latest report.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        every: int = 100,
        dead_share: float = 0.001,
        sinks: Sequence[Any] = (),
        alerts: AlertRules | None = AlertRules(),
        per_layer: bool = True,
        per_expert: bool = False,
        prefix: str = "moe/",
        sample_every: int | None = None,
        sample_dir: str | Path | None = None,
        train_only: bool = True,
        aux_loss: bool = True,
    ) -> None:
        check_transformers_version()
        if not isinstance(every, int) or every < 1:
            raise ConfigError(f"option every must be an integer >= 1, got {every!r}")
        if not 0 <= dead_share < 1:
            raise ConfigError(f"option dead_share must be in [0, 1), got {dead_share!r}")
        if sample_every is not None and (not isinstance(sample_every, int) or sample_every < 1):
            raise ConfigError(f"option sample_every must be an integer >= 1 or None, got {sample_every!r}")
        if (sample_every is None) != (sample_dir is None):
            raise ConfigError("options sample_every and sample_dir go together: give both or neither")
        if alerts is not None:
            alerts.check()
        self.model = model
        self.every = every
        self.dead_share = dead_share
        self.sinks = list(sinks)
        self.alerts = alerts
        self.per_layer = per_layer
        self.per_expert = per_expert
        self.prefix = prefix
        self.sample_every = sample_every
        self.sample_dir = sample_dir
        self.spec = routing_spec(model)
        family = resolve_adapter(self.spec.family)
        device = next(model.parameters()).device
        self.counters = RoutingCounters(self.spec.num_moe_layers, self.spec.num_experts, device)
        self.hooks = MonitorHooks(
            model, self.spec, family, self.counters, train_only=train_only, aux_loss=aux_loss
        )
        self._alert_state = AlertState(alerts) if alerts is not None else None
        self._sampler = None
        if sample_every is not None:
            from moescope.monitor.sampling import SampledCapture

            self._sampler = SampledCapture(model, sample_dir)
            self.hooks.keep_batch = True
        self.steps = 0
        self.reports = 0
        self.last_report: RoutingReport | None = None
        self._attached = False

    # -- attaching -------------------------------------------------------------------------------
    def attach(self) -> RoutingMonitor:
        """Install the hooks (idempotent)."""
        if not self._attached:
            self.hooks.__enter__()
            self._attached = True
        return self

    def detach(self) -> None:
        """Remove the hooks and close the sinks that can be closed."""
        if self._attached:
            self.hooks.__exit__(None, None, None)
            self._attached = False
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> RoutingMonitor:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- the loop --------------------------------------------------------------------------------
    def step(self, step: int | None = None) -> RoutingReport | None:
        """Close one optimizer step; every ``every`` steps return (and emit) a report, else None.

        ``step`` is the loop's own step counter (the Trainer's ``global_step``); by default the
        monitor counts calls.
        """
        self.steps = self.steps + 1 if step is None else int(step)
        if self._sampler is not None and self.steps % self.sample_every == 0:
            self._sample()
        if self.steps % self.every:
            return None
        return self.report()

    def report(self) -> RoutingReport | None:
        """Report the current window now (also when not due), emit it and reset the counters.

        Returns None when no training forward pass was counted since the last report.
        """
        if self.counters.forwards == 0:
            return None
        c = self.counters.host()
        spec = self.spec
        per_layer = layer_metrics(
            c["counts"],
            c["first"],
            c["tokens"],
            c["entropy_sum"],
            c["aux_sum"],
            self.counters.aux_forwards,
            top_k=spec.top_k,
            dead_share=self.dead_share,
        )
        T = c["tokens"][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            load_share = np.where(T > 0, c["counts"] / (spec.top_k * T), np.nan)
            first_share = np.where(T > 0, c["first"] / T, np.nan)
        aux_model = None
        if self.counters.aux_forwards:
            aux_model = float(c["aux_model_sum"]) / self.counters.aux_forwards
        report = RoutingReport(
            step=self.steps,
            layers=list(spec.moe_layers),
            tokens=int(c["tokens"].max()),
            forwards=self.counters.forwards,
            per_layer=per_layer,
            summary={m: s for m, v in per_layer.items() if (s := summarise(v))},
            aux_loss_model=aux_model,
            load_share=load_share,
            first_share=first_share,
            dead_share=self.dead_share,
        )
        self.counters.reset()
        if self._alert_state is not None:
            report.alerts = self._alert_state.evaluate(report)
        for sink in self.sinks:
            sink.write(report)
        self.reports += 1
        self.last_report = report
        return report

    def scalars(self, report: RoutingReport) -> dict[str, float]:
        """The report's tracker scalars with this monitor's prefix and cardinality settings."""
        return report.scalars(self.prefix, per_layer=self.per_layer, per_expert=self.per_expert)

    def _sample(self) -> None:
        batch = self.hooks.last_batch
        if batch is None:
            return
        self.hooks.paused = True
        try:
            path = self._sampler.write(self.steps, *batch)
            logger.info("step %d: sampled routing trace written to %s", self.steps, path)
        except Exception as exc:  # a failed sample must not stop the training run
            logger.warning("step %d: sampled capture failed: %s", self.steps, exc)
        finally:
            self.hooks.paused = False
            self.hooks.last_batch = None

    def state_nbytes(self) -> int:
        """Bytes of accumulated state (counters): constant whatever the number of steps."""
        return self.counters.nbytes()
