"""Loss of the U-Net segmenter: BCE + Dice (paper 004, section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * Dice`` of per-class mask logits (paper 004, sec. 2).

    The Dice term is segmentation-models-pytorch's ``DiceLoss`` (``multilabel``, from logits):
    ``1 - 2 |P * T| / (|P| + |T|)`` per class on the sigmoid probabilities ``P``, averaged over
    the classes present.

    Args:
        bce_weight, dice_weight: weights of the two terms (>= 0).

    Forward:
        ``logits``: ``[B, K, H, W]``; ``target``: 0/1 masks ``[B, K, H, W]`` (any dtype).
        Returns a scalar, computed in fp32.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight = bce_weight, dice_weight
        self.dice = DiceLoss(mode="multilabel", from_logits=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        return (self.bce_weight * F.binary_cross_entropy_with_logits(logits, target)
                + self.dice_weight * self.dice(logits, target))
