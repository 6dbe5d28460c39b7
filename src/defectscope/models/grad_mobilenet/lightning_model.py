"""Lightning wrapper of Grad-MobileNet (paper 001, section 4.1): overfit normal images toward ``y = 0``."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.training import random_flips, to_model_input, warmup_cosine


class GradMobileNetModule(L.LightningModule):
    """Cross-entropy toward the fixed target ``y = target`` (eq. 2) on normal images only.

    There is no validation step and no checkpoint selection: the network is meant to overfit
    the normal images, it is trained for the fixed number of epochs and the last weights are
    kept (monitor: none).

    Args:
        model: maps ``[B, 3, H, W]`` in [0, 1] to logits ``[B, K]``.
        target: the fixed class (eq. 2; 0 in the paper).
        lr, weight_decay: AdamW; warm-up + cosine schedule per step.
        augment: random flips (off by default: the model is meant to overfit).
        channels_last: NHWC layout.

    Batches: ``(x uint8 [B, 3, H, W],)`` (normal images, no labels).
    """

    monitor = None

    def __init__(self, model: nn.Module, target: int, lr: float, weight_decay: float, augment: bool = False,
                 channels_last: bool = True) -> None:
        super().__init__()
        self.model, self.target = model, target
        self.lr, self.weight_decay, self.augment, self.channels_last = lr, weight_decay, augment, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        x = to_model_input(x, self.channels_last)
        if self.augment:
            x = random_flips(x)
        logits = self.model(x)
        y = torch.full((x.shape[0],), self.target, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(logits.float(), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
