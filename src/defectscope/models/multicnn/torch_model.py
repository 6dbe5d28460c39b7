"""Multi-CNN feature fusion (paper 003, section 3.1, Fig. 5) and late fusion.

Feature fusion: each fine-tuned single model's feature extractor (frozen) maps the
image, resized to the member's input size, to a globally average-pooled vector
``[B, C_i]``; the vectors are concatenated **in member order** (the order of the
``members`` list, i.e. of the recipe) into ``[B, sum_i C_i]`` (paper: 3 x 2048 =
6144), then dropout 0.5 and one linear layer give the logits. Only the
classifier is trained. :meth:`FeatureFusionClassifier.feature_slices` tells which
columns belong to which member.

Late fusion (for comparison): the average of the members' softmax probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.multicnn.freezing import freeze_all
from defectscope.models.registry import register_model


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of ``[B, C, H, W]`` to ``[B, C, size, size]``; no-op if already that size."""
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


@register_model("multicnn_fusion")
class FeatureFusionClassifier(nn.Module):
    """Frozen extractors -> pooled features concatenated in member order -> dropout -> linear.

    Args:
        members: one dict per single model, in fusion order, with ``name`` (unique),
            ``backbone`` (registry name) and ``image_size`` (its input side in pixels).
        num_classes: ``K``.
        dropout: before the linear layer (paper 003: 0.5).
        image_size: nominal input side of the fused model (the data's size).

    The extractors start from random weights: the task loads the fine-tuned members'
    weights into them (:meth:`RunFolder.load_model` loads the saved state dict).

    Forward:
        ``x``: ``[B, 3, H, W]`` in [0, 1]; returns logits ``[B, K]``.

    Raises:
        ValueError: no members, a member without exactly the keys ``name``, ``backbone``,
            ``image_size``, or duplicate member names.
    """

    MEMBER_KEYS = ("name", "backbone", "image_size")

    def __init__(self, members: list[dict], num_classes: int, dropout: float = 0.5, image_size: int = 200) -> None:
        super().__init__()
        if not members:
            raise ValueError("multicnn_fusion: at least one member is needed")
        for i, m in enumerate(members):
            if set(m) != set(self.MEMBER_KEYS):
                raise ValueError(f"multicnn_fusion: members[{i}] must have exactly the keys "
                                 f"{list(self.MEMBER_KEYS)}, got {sorted(m)}")
        names = [m["name"] for m in members]
        if len(set(names)) != len(names):
            raise ValueError(f"multicnn_fusion: member names must be unique, got {names}")
        self.members = [dict(m) for m in members]
        self.image_size = image_size
        self.extractors = nn.ModuleList(create_backbone(m["backbone"], pretrained=False) for m in members)
        freeze_all(self.extractors)
        self.dims = [e.out_channels for e in self.extractors]
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(sum(self.dims), num_classes)

    def feature_slices(self) -> list[tuple[str, int, int]]:
        """``(member name, start column, end column)`` of each member's block in the concatenated features."""
        out, start = [], 0
        for m, d in zip(self.members, self.dims):
            out.append((m["name"], start, start + d))
            start += d
        return out

    def member_features(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, C_i]`` of member ``i`` for images ``[B, 3, H, W]`` in [0, 1]."""
        return self.extractors[i](resize_to(x, int(self.members[i]["image_size"]))).float().mean(dim=(2, 3))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated pooled features ``[B, sum_i C_i]``, members in order."""
        return torch.cat([self.member_features(i, x) for i in range(len(self.extractors))], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]`` from concatenated features ``[B, sum_i C_i]``."""
        return self.head(self.drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def late_fusion(probs: list[np.ndarray]) -> np.ndarray:
    """Average of the members' class probabilities (each ``[N, K]``, rows summing to 1) -> ``[N, K]``.

    Raises:
        ValueError: no members or shapes differ.
    """
    if not probs:
        raise ValueError("late_fusion: no member probabilities")
    shapes = {p.shape for p in probs}
    if len(shapes) != 1:
        raise ValueError(f"late_fusion: member probabilities differ in shape: {sorted(shapes)}")
    return np.mean(np.stack(probs), axis=0)
