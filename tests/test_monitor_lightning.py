"""The Lightning callback logs the monitor's report through Lightning's own logger."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from moescope.capture.tiny import tiny_model
from moescope.monitor import RoutingMonitor
from moescope.monitor.integrations import lightning_callback

L = pytest.importorskip("lightning.pytorch")


class TinyLM(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        ids, mask = batch
        labels = ids.masked_fill(mask == 0, -100)
        return self.model(input_ids=ids, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


@pytest.mark.slow
def test_lightning_callback_logs_through_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = tiny_model("mixtral").train()
    ids = torch.randint(3, 128, (16, 10))
    mask = torch.ones_like(ids)
    mask[::2, 7:] = 0
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, mask), batch_size=4)
    monitor = RoutingMonitor(model, every=2, alerts=None)
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=CSVLogger(str(tmp_path), name="run"),
        callbacks=[lightning_callback(monitor)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(TinyLM(model), loader)
    metrics = pl.read_csv(next(tmp_path.rglob("metrics.csv")))
    rows = metrics.filter(pl.col("moe/load_cv/mean").is_not_null())
    assert rows["step"].to_list() == [2, 4]
    last = monitor.last_report
    assert last.step == 4 and last.tokens == int(mask[8:].sum())
    assert rows["moe/load_cv/mean"][-1] == pytest.approx(last.summary["load_cv"]["mean"], rel=1e-6)
    assert rows["moe/entropy_bits/layer_01"][-1] == pytest.approx(last.per_layer["entropy_bits"][1], rel=1e-6)
    assert np.isfinite(rows["moe/aux_loss/p90"][-1])
    assert not monitor.hooks._handles  # detached at fit end
