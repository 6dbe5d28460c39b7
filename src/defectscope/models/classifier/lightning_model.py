"""Lightning wrapper of every image classifier (plain ``classifier``, ``multiscale``, multi-CNN members)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from defectscope.models.training import build_loss, random_flips, strong_augment, to_model_input, warmup_cosine


class ImageClassifierModule(L.LightningModule):
    """AdamW + warm-up/cosine schedule, random flips, focal or CE loss, weighted-F1 validation.

    Checkpoints are selected on ``val/weighted_f1`` (max).

    Args:
        model: any ``nn.Module`` mapping ``[B, 3, H, W]`` in [0, 1] to logits ``[B, K]``.
        num_classes: ``K``.
        lr, weight_decay: AdamW settings.
        loss: ``focal`` (paper 000, eq. 14) or ``ce``; ``focal_gamma`` its focusing parameter.
        label_smoothing: for ``ce``.
        augment: random horizontal/vertical flips on training batches; ``"strong"``: flips, rotations
            by multiples of 90 degrees and grey-level jitter (:func:`~defectscope.models.training.strong_augment`).
        channels_last: NHWC layout for inputs and convolution weights.
        class_weight: optional per-class loss weights ``[K]`` (class-balanced loss).

    Batches: ``(x uint8 [B, 3, H, W], y int64 [B])``.
    """

    monitor, mode = "val/weighted_f1", "max"

    def __init__(self, model: nn.Module, num_classes: int, lr: float, weight_decay: float, loss: str = "focal",
                 focal_gamma: float = 2.0, label_smoothing: float = 0.0, augment: bool | str = True,
                 channels_last: bool = True, class_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.loss_fn = build_loss(loss, focal_gamma, label_smoothing, class_weight)
        self.augment = augment
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.val_f1 = MulticlassF1Score(num_classes, average="weighted")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._prep(x)
        if self.augment == "strong":
            x = strong_augment(x)
        elif self.augment:
            x = random_flips(x)
        loss = self.loss_fn(self.model(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(self._prep(x))
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True, prog_bar=False, sync_dist=True)
        self.val_f1.update(logits.float(), y)
        self.val_acc.update(logits.float(), y)

    def on_validation_epoch_end(self):
        self.log("val/weighted_f1", self.val_f1.compute(), prog_bar=True, sync_dist=False)
        self.log("val/accuracy", self.val_acc.compute(), sync_dist=False)
        self.val_f1.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
