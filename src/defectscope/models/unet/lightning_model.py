"""Lightning wrapper of the U-Net segmenter and its training-time data pieces (paper 004, section 2).

- :class:`SegmentationModule`: AdamW + warm-up/cosine schedule, joint flips of image and mask,
  BCE + Dice (:class:`~defectscope.models.unet.losses.BCEDiceLoss`); logs ``train/loss`` and
  ``val/loss`` (checkpoints are selected on ``val/loss``, min).
- :class:`MaskDataset`: images and masks in memory with optional defect-centred crops.
- :class:`DefectOversampler`: each defective image several times per epoch, a draw of good ones.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from defectscope.models.training import random_flips, to_model_input, warmup_cosine
from defectscope.models.unet.losses import BCEDiceLoss


class MaskDataset(Dataset):
    """Images and masks in memory, with optional defect-centred crops.

    Args:
        x: ``uint8 [N, 3, H, W]``; y: ``uint8 [N, K, H, W]``.
        crop_height: crop this many rows (0, or at least ``H``: whole images).

    Crops: a defective image is cropped around a random defect pixel; a good image at one of
    ``ceil(H / h) + 1`` evenly spaced positions whose crops tile it, the first at the top edge and
    the last at the bottom. Uniform random positions would show the image's top and bottom rows
    almost never (chance ``1 / (H - h + 1)``), and a model trained so marks the dark top/bottom
    borders of good KolektorSDD images as defects at test time.

    Items: ``(image uint8 [3, h, W], mask uint8 [K, h, W])``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, crop_height: int = 0) -> None:
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)
        self.crop = crop_height if 0 < crop_height < x.shape[2] else 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x, y = self.x[i], self.y[i]
        if self.crop:
            h = x.shape[1]
            rows = torch.nonzero(y.amax(dim=(0, 2))).flatten()
            if len(rows):
                r = int(rows[torch.randint(len(rows), (1,))])
                lo, hi = max(0, r - self.crop + 1), min(r, h - self.crop)
                top = int(torch.randint(lo, hi + 1, (1,)))
            else:  # one of the evenly spaced crops that tile the image, first and last at the edges
                n = -(-h // self.crop) + 1
                top = round(int(torch.randint(n, (1,))) * (h - self.crop) / (n - 1))
            x, y = x[:, top : top + self.crop], y[:, top : top + self.crop]
        return x, y


class DefectOversampler(Sampler[int]):
    """Per epoch: every defective index ``oversample`` times plus ``good_per_epoch`` random good ones, shuffled.

    Args:
        defective: ``[N]`` bool, image has a non-empty mask.
        oversample: repeats of each defective image per epoch (>= 1).
        good_per_epoch: good images per epoch (``None``: all of them).
        seed: seed of the draw (each epoch draws anew from the same generator).
    """

    def __init__(self, defective: np.ndarray, oversample: int, good_per_epoch: int | None, seed: int) -> None:
        self.pos = np.flatnonzero(defective)
        self.neg = np.flatnonzero(~np.asarray(defective, bool))
        self.oversample = oversample
        self.good = len(self.neg) if good_per_epoch is None else min(good_per_epoch, len(self.neg))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.pos) * self.oversample + self.good

    def __iter__(self):
        idx = np.concatenate([np.tile(self.pos, self.oversample), self.rng.permutation(self.neg)[: self.good]])
        return iter(self.rng.permutation(idx).tolist())


class SegmentationModule(L.LightningModule):
    """Lightning wrapper: AdamW + warm-up cosine, joint flips of image and mask, BCE + Dice.

    Checkpoints are selected on ``val/loss`` (min) when a validation loader is given.

    Args:
        model: maps ``[B, 3, H, W]`` in [0, 1] to logits ``[B, K, H, W]``.
        lr, weight_decay: AdamW settings.
        bce_weight, dice_weight: loss weights (:class:`BCEDiceLoss`).
        augment: random horizontal/vertical flips, the same for image and mask.
        channels_last: NHWC layout for inputs and convolution weights.

    Batches: ``(x uint8 [B, 3, H, W], y uint8 [B, K, H, W])``.

    Raises:
        FloatingPointError: a non-finite training loss (bf16 autocast on the CPU stack).
    """

    monitor, mode = "val/loss", "min"

    def __init__(self, model: nn.Module, lr: float, weight_decay: float, bce_weight: float = 1.0,
                 dice_weight: float = 1.0, augment: bool = True, channels_last: bool = True) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.loss_fn = BCEDiceLoss(bce_weight, dice_weight)
        self.augment, self.channels_last = augment, channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x, self.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.augment:
            both = random_flips(torch.cat([x, y], dim=1))
            x, y = both[:, :3], both[:, 3:]
        loss = self.loss_fn(self.model(self._prep(x)), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} (train.precision="
                f"{self.trainer.precision!r}); bf16 autocast gave NaN in the ResNet18 encoder on this CPU stack: "
                "use train.precision=32")
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", self.loss_fn(self.model(self._prep(x)), y), on_epoch=True, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
