"""How a training run ended (``fit_lightning``'s ``stopped_by`` / ``cut_short``): the fixed schedule,
early stopping on validation, or the ``max_minutes`` safety stop, which marks the run as cut short.

What is tested is the trainer's bookkeeping, not learning, so the module is a linear model on
seeded random tensors whose validation metric the test sets per epoch."""

from __future__ import annotations

import time

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from defectscope.config import TrainConfig
from defectscope.engine.trainer import fit_lightning


class _Linear(L.LightningModule):
    """Linear regression; logs ``val/score`` from a fixed list per epoch (to steer early stopping)
    and sleeps ``sleep_s`` per training step (to make the wall-clock budget fire)."""

    def __init__(self, scores: list[float], sleep_s: float = 0.0) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 1)
        self.scores, self.sleep_s = scores, sleep_s

    def training_step(self, batch, _):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        x, y = batch
        return torch.nn.functional.mse_loss(self.lin(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.lin(x), y))

    def on_validation_epoch_end(self):
        self.log("val/score", self.scores[min(self.current_epoch, len(self.scores) - 1)])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=16)


def _fit(tmp_path, scores, epochs, patience=0, max_minutes=None, sleep_s=0.0):
    cfg = TrainConfig(epochs=epochs, early_stopping_patience=patience, max_minutes=max_minutes,
                      precision="32", logger=["csv"], progress=False, num_threads=1)
    tr, va = _loaders()
    return fit_lightning(_Linear(scores, sleep_s), tr, va, cfg, tmp_path, monitor="val/score", mode="max")


def test_a_completed_schedule(tmp_path):
    info = _fit(tmp_path, [0.1, 0.2, 0.3], epochs=3, patience=2, max_minutes=30)
    assert (info["epochs_run"], info["stopped_by"], info["cut_short"]) == (3, "schedule", False)


def test_early_stopping_before_the_last_epoch(tmp_path):
    info = _fit(tmp_path, [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], epochs=8, patience=2)
    assert info["stopped_by"] == "early_stopping" and info["epochs_run"] < 8 and not info["cut_short"]


def test_patience_running_out_on_the_last_epoch_is_the_schedule(tmp_path):
    """Best at epoch 1, patience 2, 3 epochs: the early-stopping callback fires at the very end;
    every scheduled epoch ran, so the schedule ended the run (FCOS's recipe did this)."""
    info = _fit(tmp_path, [0.5, 0.1, 0.1], epochs=3, patience=2)
    assert (info["epochs_run"], info["stopped_by"], info["cut_short"]) == (3, "schedule", False)


def test_the_wall_clock_budget_marks_the_run_as_cut_short(tmp_path):
    """0.2 s per step, 4 steps per epoch, 50 epochs (40 s) against a 3-second budget."""
    info = _fit(tmp_path, [0.1], epochs=50, max_minutes=0.05, sleep_s=0.2)
    assert info["cut_short"] is True and info["stopped_by"] == "max_minutes" and info["epochs_run"] < 50
