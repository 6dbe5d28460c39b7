"""Lightning wrappers of the weld models (paper 000): the weld classifier and the seam U-Net.

- :class:`WeldModule`: any weld classifier of :mod:`.torch_model` on ``(crops, spectra)`` pairs, focal
  (eq. 14) or cross-entropy loss, AdamW with a warm-up + cosine schedule; checkpoints are selected on
  ``val/weighted_f1`` (max).
- :class:`SeamUNetModule`: the compact seam U-Net (Fig. 7) with BCE + Dice loss, AdamW and a one-cycle
  schedule; no validation (the last weights are kept). :func:`seam_loader` feeds it one fixed-seed
  permutation per epoch, so a seeded run gives the same U-Net every time.

Both are fitted by :func:`defectscope.engine.trainer.fit_lightning`; the helpers :func:`seam_inputs`
and :func:`predict_masks` turn images into U-Net inputs and the U-Net's logits into binary masks,
:func:`cached_features` computes a frozen backbone's feature maps once, :func:`predict_weld_probs`
gives a weld model's probabilities (and fusion attention).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from defectscope.machine import autocast
from defectscope.models.training import build_loss, warmup_cosine


class WeldModule(L.LightningModule):
    """Lightning wrapper of a weld classifier: focal/CE loss, AdamW + warm-up cosine, weighted-F1 validation.

    Checkpoints are selected on ``val/weighted_f1`` (max).

    Args:
        model: a weld model mapping ``(images [B, W, 3, h, w] in [0, 1] (or cached feature maps
            [B, W, C_feat, h', w']), spectra [B, W, C, T])`` to logits ``[B, K]``.
        num_classes: ``K``.
        lr, weight_decay: AdamW settings.
        loss: ``focal`` (paper 000, eq. 14) or ``ce``; ``focal_gamma`` its focusing parameter,
            ``label_smoothing`` for ``ce``.

    Batches: ``(crops uint8 [B, W, 3, h, w] or float features, spectra float [B, W, C, T], labels int64 [B])``.
    """

    monitor, mode = "val/weighted_f1", "max"

    def __init__(self, model: nn.Module, num_classes: int, lr: float, weight_decay: float, loss: str = "focal",
                 focal_gamma: float = 2.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.lr, self.weight_decay = lr, weight_decay
        self.loss_fn = build_loss(loss, focal_gamma, label_smoothing)
        self.val_f1 = MulticlassF1Score(num_classes, average="weighted")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, crops: torch.Tensor, spectra: torch.Tensor) -> torch.Tensor:
        x = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops  # cached features pass through
        return self.model(x, spectra)

    def training_step(self, batch, batch_idx):
        x, s, y = batch
        loss = self.loss_fn(self(x, s), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, s, y = batch
        logits = self(x, s).float()
        self.log("val/loss", self.loss_fn(logits, y), on_epoch=True)
        self.val_f1.update(logits, y)
        self.val_acc.update(logits, y)

    def on_validation_epoch_end(self):
        self.log("val/weighted_f1", self.val_f1.compute(), prog_bar=True)
        self.log("val/accuracy", self.val_acc.compute())
        self.val_f1.reset()
        self.val_acc.reset()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def weld_loader(crops: np.ndarray, spectra: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool) -> DataLoader:
    """Batches ``(crops or features [B, ...], spectra float32 [B, W, C, T], labels int64 [B])`` for :class:`WeldModule`.

    Shuffling draws from torch's global generator (seeded by the pipeline); the last partial batch
    is dropped only when shuffling more samples than one batch.
    """
    ds = TensorDataset(torch.from_numpy(crops), torch.from_numpy(spectra), torch.from_numpy(labels).long())
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0, drop_last=shuffle and len(labels) > batch_size)


# ------------------------------------------------------------------------------------------ seam U-Net


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice loss ``1 - (2|P T| + 1) / (|P| + |T| + 1)`` (mean over the batch).

    Args:
        logits: ``[B, 1, H, W]``; target: ``[B, 1, H, W]`` in {0, 1}.
    """
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


class SeamUNetModule(L.LightningModule):
    """Lightning wrapper of the seam U-Net: BCE + Dice loss, AdamW and a one-cycle learning rate.

    No validation: the weights after the last epoch are kept.

    Args:
        model: the U-Net (``weld_seam_unet``), ``[B, 3, S, S]`` in [0, 1] -> logits ``[B, 1, S, S]``.
        lr: peak learning rate of ``OneCycleLR``.
        total_steps: optimizer steps of the whole run (epochs x batches per epoch).

    Batches: ``(images float [B, 3, S, S] in [0, 1], masks float [B, 1, S, S] in {0, 1})``.
    """

    def __init__(self, model: nn.Module, lr: float, total_steps: int) -> None:
        super().__init__()
        self.model = model
        self.lr, self.total_steps = lr, total_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = dice_bce_loss(self.model(x).float(), y)
        self.log("seam/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class EpochPermutations(Sampler[list[int]]):
    """Batches of one ``torch.randperm`` per epoch from a generator seeded once (``seed``).

    Unlike ``DataLoader(shuffle=True)`` it does not draw from torch's global generator, so training
    the U-Net leaves the global random state as it found it.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        for idx in torch.randperm(self.n, generator=self.generator).split(self.batch_size):
            yield idx.tolist()

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)


def seam_inputs(images: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images (any sizes) -> float ``[N, 3, size, size]`` in [0, 1] (bilinear)."""
    x = [F.interpolate(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255.0,
                       size=(size, size), mode="bilinear", align_corners=False) for im in images]
    return torch.cat(x)


def seam_loader(images: list[np.ndarray], masks: list[np.ndarray], size: int, batch_size: int, seed: int) -> DataLoader:
    """Training batches for :class:`SeamUNetModule`: images and masks resized to ``size`` (nearest for masks).

    Args:
        images: uint8 ``[H, W, 3]`` each; masks: ``[H, W]`` in {0, 1} each (same sizes as the images).
        size: side of the U-Net input (px); batch_size: images per step; seed: shuffling seed.
    """
    x = seam_inputs(images, size)
    y = torch.cat([F.interpolate(torch.from_numpy(np.asarray(m))[None, None].float(), size=(size, size), mode="nearest")
                   for m in masks])
    return DataLoader(TensorDataset(x, y), batch_sampler=EpochPermutations(len(x), batch_size, seed), num_workers=0)


@torch.no_grad()
def predict_masks(model: nn.Module, images: list[np.ndarray], size: int, batch_size: int = 16) -> list[np.ndarray]:
    """Binary seam masks from the U-Net: uint8 ``[H, W]`` in {0, 1} per image, at the image's own size.

    The logits at ``size x size`` are resized bilinearly to each image and thresholded at 0 (p = 0.5).
    """
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        logits = model(seam_inputs(chunk, size))
        for im, lg in zip(chunk, logits):
            up = F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            out.append((up > 0).numpy().astype(np.uint8))
    return out


# ------------------------------------------------------------------------------------------ inference


@torch.no_grad()
def cached_features(backbone: nn.Module, crops: np.ndarray, batch_size: int = 32, precision: str = "auto") -> np.ndarray:
    """Feature maps of a frozen backbone for uint8 crops ``[N, W, 3, h, w]`` -> float32 ``[N, W, C, h', w']``.

    ``precision``: the recipe's ``train.precision``; bf16 autocast only where
    :func:`defectscope.machine.use_bf16` says this CPU computes bf16 natively."""
    backbone.eval()
    out = []
    flat = crops.reshape(-1, *crops.shape[2:])
    for i in range(0, len(flat), batch_size):
        x = torch.from_numpy(flat[i : i + batch_size]).float().div_(255.0).contiguous(memory_format=torch.channels_last)
        with autocast(precision):
            out.append(backbone(x).float())
    f = torch.cat(out).numpy() if out else np.zeros((0, 1, 1, 1), np.float32)
    return f.reshape(crops.shape[0], crops.shape[1], *f.shape[1:])


@torch.no_grad()
def predict_weld_probs(model: nn.Module, crops: np.ndarray, spectra: np.ndarray, batch_size: int = 32,
                       with_attention: bool = False):
    """Softmax probabilities ``[N, K]`` of :class:`~defectscope.models.weld_fusion.inference.WeldInference`
    (and, when asked, the fusion's raw attention weights per head for the report), fp32, eval mode."""
    from defectscope.models.weld_fusion.inference import WeldInference

    model.eval()
    module = WeldInference(model, ("image", "spectra")).eval()
    probs, attns = [], []
    for i in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[i : i + batch_size]).float() / 255.0
        s = torch.from_numpy(spectra[i : i + batch_size])
        if with_attention and hasattr(model, "forward_with_attention"):
            logits, attn = model.forward_with_attention(x, s)
            attns.append({k: v.numpy() for k, v in attn.items()})
            probs.append(module.probabilities(logits).numpy())
        else:
            probs.append(module(x, s)[1].numpy())
    p = np.concatenate(probs) if probs else np.zeros((0, 0), np.float32)
    if not with_attention:
        return p
    merged = {k: np.concatenate([a[k] for a in attns]) for k in (attns[0] if attns else {})}
    return p, merged
