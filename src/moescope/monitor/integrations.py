"""The monitor in the loops people use: the transformers Trainer and PyTorch Lightning.

Both call :meth:`RoutingMonitor.step` once per optimizer step and send the report's scalars
through the loop's own logging, so whatever that loop reports to (TensorBoard, Weights & Biases,
MLflow, CSV) receives them. The plain-PyTorch integration is :meth:`RoutingMonitor.step` itself.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from moescope.errors import ConfigError
from moescope.monitor.monitor import RoutingMonitor


class RoutingMonitorCallback(TrainerCallback):
    """``transformers`` callback: attach at train start, report through ``trainer.log``.

    At train end the last, partial window is reported too, and the hooks are removed.

    ``Trainer.log`` appends to ``state.log_history`` and calls every reporter callback
    (``report_to``: TensorBoard, W&B, ...), so the scalars land wherever the Trainer logs.

    Examples
    --------
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds)  # doctest: +SKIP
    >>> monitor = RoutingMonitor(trainer.model, every=10)  # doctest: +SKIP
    >>> trainer.add_callback(RoutingMonitorCallback(monitor, trainer))  # doctest: +SKIP
    """

    def __init__(self, monitor: RoutingMonitor, trainer: Any) -> None:
        self.monitor = monitor
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor.attach()

    def on_step_end(self, args, state, control, **kwargs):
        report = self.monitor.step(state.global_step)
        if report is not None:
            self.trainer.log(self.monitor.scalars(report))

    def on_train_end(self, args, state, control, **kwargs):
        report = self.monitor.report()  # the last, partial window (None when it is empty)
        if report is not None:
            self.trainer.log(self.monitor.scalars(report))
        self.monitor.detach()


def lightning_callback(monitor: RoutingMonitor):
    """A PyTorch Lightning ``Callback`` that sends each report to the Trainer's own loggers.

    Each of ``trainer.loggers`` (TensorBoard, W&B, CSVLogger, ...) gets ``log_metrics(scalars,
    step=global_step)``, once per report (``LightningModule.log`` would repeat the last value at
    every later logging step). Raises
    :class:`ConfigError` when Lightning is not installed.
    """
    try:
        import lightning.pytorch as pl
    except ImportError as exc:
        raise ConfigError("the Lightning callback needs lightning: pip install 'moescope[monitor]'") from exc

    class RoutingMonitorLightning(pl.Callback):
        """Attach at fit start; one monitor step per optimizer step (after gradient accumulation)."""

        def __init__(self) -> None:
            self.monitor = monitor

        def on_fit_start(self, trainer, pl_module):
            monitor.attach()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % max(1, trainer.accumulate_grad_batches):
                return
            report = monitor.step(trainer.global_step)
            if report is not None:
                scalars = monitor.scalars(report)
                for logger in trainer.loggers:
                    logger.log_metrics(scalars, step=trainer.global_step)

        def on_fit_end(self, trainer, pl_module):
            report = monitor.report()  # the last, partial window (None when it is empty)
            if report is not None:
                for logger in trainer.loggers:
                    logger.log_metrics(monitor.scalars(report), step=trainer.global_step)
            monitor.detach()

    return RoutingMonitorLightning()
