"""Training of the multi-CNN method (paper 003): member fine-tuning and the fusion head.

- :class:`MemberModule`: the LightningModule fine-tuning one single model (RMSprop, exponential
  learning-rate decay, paper-003 online augmentation; checkpoints on ``val/weighted_f1``, max).
- :func:`train_fusion_head`: dropout + linear on cached, concatenated pooled features of the
  frozen members (a few seconds; the best validation epoch is kept).
- :func:`predict_member_probs`, :func:`extract_features`: batched inference of a member and of
  one extractor of :class:`~defectscope.models.multicnn.FeatureFusionClassifier`.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.evaluation.classification import classification_metrics
from defectscope.models.classifier.lightning_model import ImageClassifierModule
from defectscope.models.multicnn.torch_model import FeatureFusionClassifier, resize_to
from defectscope.models.training import exponential_decay, random_flips, to_float


class AugmentSettings(Protocol):
    """What :func:`online_augment` reads (the recipe's ``train.augmentation`` section)."""

    flips: bool
    rotation: float
    brightness: float
    contrast: float
    saturation: float


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each square image of ``[B, C, S, S]`` about its centre by ``angles`` ``[B]`` (radians).

    Bilinear ``grid_sample`` with reflection padding (no black corners).
    """
    cos, sin = angles.cos(), angles.sin()
    theta = torch.zeros(x.shape[0], 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def online_augment(x: torch.Tensor, cfg: AugmentSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image flips, rotation by a random angle and colour change of ``[B, 3, S, S]`` in [0, 1] (paper 003, 2.2).

    Args:
        x: float images ``[B, 3, S, S]`` in [0, 1] (square, for the rotation).
        cfg: :class:`AugmentSettings`: ``flips`` (random h/v flips), ``rotation`` (maximum angle in
            degrees, uniform in [-rotation, rotation]), ``brightness`` / ``contrast`` /
            ``saturation`` (factors uniform in [1 - v, 1 + v]).
        generator: random source (``None``: torch's global one).

    Rotation uses ``affine_grid``/``grid_sample`` (bilinear, reflection padding); colour change
    scales brightness, contrast (around each image's mean) and saturation (around its
    luminance). Returns the augmented ``[B, 3, S, S]`` clamped to [0, 1].
    """
    b = x.shape[0]
    if cfg.flips:
        x = random_flips(x, generator)
    if cfg.rotation > 0:
        x = rotate(x, (torch.rand(b, generator=generator) * 2 - 1) * math.radians(cfg.rotation))

    def factor(v: float) -> torch.Tensor:
        return (1 + (torch.rand(b, generator=generator) * 2 - 1) * v).to(x.dtype).view(b, 1, 1, 1)

    if cfg.brightness:
        x = x * factor(cfg.brightness)
    if cfg.contrast:
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * factor(cfg.contrast) + m
    if cfg.saturation:
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = grey + (x - grey) * factor(cfg.saturation)
    return x.clamp_(0, 1)


class MemberModule(ImageClassifierModule):
    """Fine-tuning of one member (paper 003, 2.4 and Table 1).

    :class:`~defectscope.models.classifier.lightning_model.ImageClassifierModule` (loss,
    weighted-F1 validation, checkpoints on ``val/weighted_f1``, max) with RMSprop, the
    learning rate decaying exponentially from ``lr`` to ``lr_end`` over the run, the
    paper's online augmentation, and inputs resized to the member's own size.

    Args:
        model: a ``classifier`` model (partially frozen) mapping ``[B, 3, S, S]`` in [0, 1] to logits ``[B, K]``.
        num_classes: ``K``.
        image_size: the member's input side ``S``; inputs of another size are resized (bilinear, antialiased).
        lr, lr_end: initial and final RMSprop learning rate.
        rmsprop_alpha: RMSprop smoothing constant (Keras' rho).
        weight_decay: RMSprop weight decay.
        loss, focal_gamma, label_smoothing: see :func:`defectscope.models.training.build_loss`.
        augment: apply :func:`online_augment` with ``augmentation`` to training batches.
        augmentation: :class:`AugmentSettings`.
        channels_last: NHWC layout.

    Batches: ``(x uint8 [B, 3, H, W], y int64 [B])``.
    """

    def __init__(self, model: nn.Module, num_classes: int, image_size: int, lr: float, lr_end: float,
                 rmsprop_alpha: float, weight_decay: float, loss: str, focal_gamma: float, label_smoothing: float,
                 augment: bool, augmentation: AugmentSettings, channels_last: bool) -> None:
        super().__init__(model, num_classes, lr, weight_decay, loss, focal_gamma, label_smoothing, augment, channels_last)
        self.image_size = image_size
        self.lr_end = lr_end
        self.rmsprop_alpha = rmsprop_alpha
        self.augmentation = augmentation

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to(to_float(x), self.image_size)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self._prep(x)
        if self.augment:
            x = online_augment(x, self.augmentation)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        loss = self.loss_fn(self.model(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.RMSprop(params, lr=self.lr, alpha=self.rmsprop_alpha, eps=1e-7, weight_decay=self.weight_decay)
        sched = exponential_decay(opt, int(self.trainer.estimated_stepping_batches), self.lr, self.lr_end)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def predict_member_probs(model: nn.Module, x: np.ndarray, size: int, batch_size: int = 32) -> np.ndarray:
    """Softmax probabilities ``[N, K]`` (float32, eval mode) of a member on uint8 images ``[N, 3, H, W]`` resized to ``size``."""
    model.eval()
    xt = torch.as_tensor(x)
    out = [F.softmax(model(resize_to(to_float(xt[j : j + batch_size]), size)).float(), dim=1)
           for j in range(0, len(xt), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


@torch.no_grad()
def extract_features(model: FeatureFusionClassifier, i: int, x: np.ndarray, batch_size: int = 32) -> torch.Tensor:
    """Pooled features ``[N, C_i]`` (float32, eval mode) of member ``i`` on uint8 images ``[N, 3, H, W]``.

    The same computation as :meth:`FeatureFusionClassifier.member_features`, batched.
    """
    model.eval()
    xt = torch.as_tensor(x)
    out = [model.member_features(i, to_float(xt[j : j + batch_size])) for j in range(0, len(xt), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, model.dims[i])


def train_fusion_head(model: FeatureFusionClassifier, feats: dict[str, torch.Tensor], ys: dict[str, np.ndarray],
                      epochs: int, batch_size: int, lr: float, lr_end: float, seed: int) -> dict:
    """Train ``model.head`` (dropout + linear) on cached concatenated features (paper 003, 3.2).

    RMSprop with the learning rate decaying exponentially from ``lr`` to ``lr_end``,
    cross-entropy. With a validation part, the epoch of the best validation weighted F1
    (ties: the lower validation loss) is kept; without one, the last epoch.

    Args:
        model: the fusion model; only ``head`` is optimised (the extractors are frozen).
        feats: ``{"train": [N, D], "val": [M, D] (optional)}`` concatenated features (float32).
        ys: class indices ``[N]`` / ``[M]`` per part.
        epochs, batch_size: passes over the training features and batch size.
        lr, lr_end: initial and final learning rate.
        seed: shuffling and dropout seed.

    Returns:
        ``{"best_epoch", "epochs", "history": [{epoch, train_loss, val_loss, val_weighted_f1, best}]}``;
        ``model`` is left in eval mode with the kept head.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = feats["train"], torch.as_tensor(ys["train"]).long()
    steps = epochs * math.ceil(len(x_tr) / batch_size)
    opt = torch.optim.RMSprop(model.head.parameters(), lr=lr, alpha=0.9, eps=1e-7)
    sched = exponential_decay(opt, steps, lr, lr_end)
    has_val = "val" in feats and len(feats["val"])
    best, best_state, history = (-1.0, math.inf), None, []
    for epoch in range(epochs):
        model.drop.train()
        order = torch.randperm(len(x_tr), generator=gen)
        total = 0.0
        for j in range(0, len(order), batch_size):
            idx = order[j : j + batch_size]
            loss = F.cross_entropy(model.forward_head(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": epoch + 1, "train_loss": total / len(x_tr)}
        model.drop.eval()
        if has_val:
            with torch.no_grad():
                logits = model.forward_head(feats["val"])
            yv = torch.as_tensor(ys["val"]).long()
            row["val_loss"] = float(F.cross_entropy(logits, yv))
            m = classification_metrics(ys["val"], F.softmax(logits, 1).numpy(), [str(c) for c in range(logits.shape[1])])
            row["val_weighted_f1"] = m["weighted_f1"]
            score = (row["val_weighted_f1"], row["val_loss"])
            if score[0] > best[0] or (score[0] == best[0] and score[1] < best[1]):
                best, best_state, row["best"] = score, {k: v.clone() for k, v in model.head.state_dict().items()}, True
        history.append(row)
    if best_state is not None:
        model.head.load_state_dict(best_state)
    model.eval()
    best_epoch = max((r["epoch"] for r in history if r.get("best")), default=epochs)
    return {"best_epoch": best_epoch, "epochs": epochs, "history": history}
