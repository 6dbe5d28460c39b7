"""Losses: multi-class focal loss (paper 000, eq. 14)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Softmax focal loss, ``L = -sum_i (1 - p_i)^gamma y_i log p_i`` (paper 000, eq. 14).

    With ``gamma = 0`` it equals cross-entropy.

    Args:
        gamma: focusing parameter (lambda in eq. 14), >= 0.
        weight: optional per-class weights ``[C]`` (the alpha of Lin et al.).
        reduction: ``mean``, ``sum`` or ``none``.

    Forward:
        ``logits``: ``[B, C]``; ``target``: class indices ``[B]`` (int64).
        returns a scalar (or ``[B]`` for ``reduction="none"``).
    """

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be mean, sum or none, got {reduction}")
        self.gamma = gamma
        self.reduction = reduction
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()).clamp_min(0) ** self.gamma) * logp
        if self.weight is not None:
            loss = loss * self.weight[target]
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss
