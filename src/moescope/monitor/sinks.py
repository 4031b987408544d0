"""Where reports go outside a trainer's own loggers: CSV, JSON Lines, TensorBoard.

A sink is any object with ``write(report)`` (and optionally ``close()``). Files are appended one
whole report at a time and flushed, so a crash loses at most the report being written and never
an earlier one; an existing file is continued, never truncated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Protocol

from moescope.errors import ConfigError
from moescope.monitor.metrics import LAYER_METRICS, RoutingReport


class Sink(Protocol):
    """Receives every report."""

    def write(self, report: RoutingReport) -> None: ...


def _append(path: Path, text: str) -> None:
    """Append ``text`` in one write and flush it to disk."""
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


class CSVSink:
    """One CSV row per (report, MoE layer): ``step, layer, tokens`` and every per-layer metric.

    Long format, so the number of columns does not depend on the model. An existing file must
    have the same header (else :class:`ConfigError` naming it) and is appended to.
    """

    columns = ("step", "layer", "tokens", *LAYER_METRICS)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            with open(self.path, encoding="utf-8") as fh:
                header = fh.readline().strip().split(",")
            if tuple(header) != self.columns:
                raise ConfigError(
                    f"{self.path}: existing CSV has columns {header}, expected {list(self.columns)}"
                )
        else:
            _append(self.path, ",".join(self.columns) + "\r\n")

    def write(self, report: RoutingReport) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.columns)
        for row in report.rows():
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        _append(self.path, buf.getvalue())


class JSONLSink:
    """One JSON object per report: step, tokens, summary, per-layer metrics, alerts (and per-expert shares when asked)."""

    def __init__(self, path: str | Path, *, per_expert: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.per_expert = per_expert

    def write(self, report: RoutingReport) -> None:
        doc: dict[str, Any] = {
            "step": report.step,
            "tokens": report.tokens,
            "forwards": report.forwards,
            "layers": report.layers,
            "aux_loss_model": report.aux_loss_model,
            "summary": report.summary,
            "per_layer": {m: [_num(v) for v in vals] for m, vals in report.per_layer.items()},
            "alerts": [
                {"rule": a.rule, "layer": a.layer, "experts": list(a.experts), "message": a.message}
                for a in report.alerts
            ],
        }
        if self.per_expert:
            doc["load_share"] = [[_num(v) for v in row] for row in report.load_share]
            doc["first_share"] = [[_num(v) for v in row] for row in report.first_share]
        _append(self.path, json.dumps(doc, allow_nan=False) + "\n")


def _num(v: float) -> float | None:
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None


class TensorBoardSink:
    """Scalars of :meth:`RoutingReport.scalars` to a TensorBoard event file (needs ``tensorboard``)."""

    def __init__(
        self, log_dir: str | Path, *, prefix: str = "moe/", per_layer: bool = True, per_expert: bool = False
    ) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch raises ImportError when tensorboard is missing
            raise ConfigError(
                "TensorBoardSink needs the tensorboard package: pip install 'moescope[monitor]'"
            ) from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.prefix, self.per_layer, self.per_expert = prefix, per_layer, per_expert

    def write(self, report: RoutingReport) -> None:
        scalars = report.scalars(self.prefix, per_layer=self.per_layer, per_expert=self.per_expert)
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, report.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
