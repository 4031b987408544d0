"""Sampled capture: every M steps, one batch's full routing as a moescope trace.

The batch is the last one the model trained on. It is run once more through the capture engine
(:class:`~moescope.capture.engine.RoutingRecorder`, eval mode, no grad, after the optimizer step),
so each trace holds the routing of the weights at that step, with ids, weights and logits, and
every offline analysis, the report and ``moescope diff`` work on it across checkpoints (router
saturation over training, OLMoE arXiv 2409.02060). Each sample is its own trace directory
``<directory>/step-<step:08d>``, written by :class:`~moescope.trace.writer.TraceWriter`
(shards, then manifest), so an interrupted write never leaves a trace that reads as complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moescope.capture.engine import RoutingRecorder
from moescope.capture.runner import config_fingerprint
from moescope.trace.schema import default_columns
from moescope.trace.writer import TraceWriter


class SampledCapture:
    """Writes one batch's routing to ``directory/step-<step>`` when called.

    Parameters
    ----------
    model : the monitored model.
    directory : parent directory of the sample traces.
    max_rows : batch rows kept (the first ones), to keep samples small.
    """

    def __init__(self, model: torch.nn.Module, directory: str | Path, *, max_rows: int = 8) -> None:
        self.model = model
        self.directory = Path(directory)
        self.max_rows = max_rows
        self.recorder = RoutingRecorder(model, logits=True, logits_dtype="float32")
        self.count = 0  # samples written
        self.last: Path | None = None

    def write(self, step: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Path:
        """Capture ``input_ids`` (B, S) and write the trace; returns its directory."""
        ids = input_ids[: self.max_rows].detach()
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[: self.max_rows].detach()
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.recorder.run(ids, mask)
        finally:
            self.model.train(was_training)
        m = mask.cpu().numpy().astype(bool)  # (B, S)
        rows = np.nonzero(m)
        position = (np.cumsum(m, axis=1) - 1)[rows]
        target = self.directory / f"step-{step:08d}"
        cfg = self.model.config
        columns = default_columns(weights=True, logits=True, logits_dtype="float32")
        writer = TraceWriter.create(
            target,
            self.recorder.spec,
            columns=columns,
            model={
                "id": getattr(cfg, "_name_or_path", "") or type(self.model).__name__,
                "model_type": getattr(cfg, "model_type", None),
                "config_sha256": config_fingerprint(cfg),
                "dtype": self.recorder.spec.dtype,
            },
            capture={"tool": "moescope monitor", "step": int(step), "train_rows": int(ids.shape[0])},
            source={"tool": "moescope monitor", "step": int(step)},
        )
        with writer:
            writer.append(
                doc_id=rows[0].astype(np.int64),
                position=position,
                token_id=ids.cpu().numpy()[rows],
                label=f"step-{step}",
                experts=out["experts"],
                weights=out["weights"],
                logits=out["logits"],
            )
            writer.commit(int(rows[0].max()) if len(rows[0]) else 0)
        self.count += 1
        self.last = target
        return target
