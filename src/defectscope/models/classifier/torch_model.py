"""Plain backbone classifier: feature map, global average pooling, linear layer.

The baseline beside every method (and the vision-only baseline of paper 000, Table 6).
"""

from __future__ import annotations

import torch
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.registry import register_model


@register_model("classifier")
class BackboneClassifier(nn.Module):
    """``create_backbone(backbone)`` + global average pooling + dropout + linear.

    Args:
        backbone: registry name (see :func:`defectscope.models.list_backbones`).
        num_classes: number of classes ``K``.
        pretrained / weights: see :func:`defectscope.models.create_backbone`.
        dropout: before the linear layer.
        image_size: nominal input side in pixels (recorded for export; any size >= the
            backbone's minimum works).

    Forward:
        ``x``: ``[B, 3, H, W]`` in [0, 1]; returns logits ``[B, K]``.
    """

    def __init__(self, backbone: str, num_classes: int, pretrained: bool = False, weights: str | None = None,
                 dropout: float = 0.2, image_size: int = 224) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.image_size = image_size
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.backbone.out_channels, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, C]``."""
        return self.backbone(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.forward_features(x)))
