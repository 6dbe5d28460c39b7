"""Multiscale cross-attention classifier for image-only data (paper 000, section 5.7, Fig. 19).

The same image is seen twice through one shared backbone: at high resolution
(NEU: 200 x 200) it gives the queries, rescaled to low resolution (NEU:
128 x 128) it gives the keys and values. Both token sets are projected to
``embed_dim``; then cross-attention with residual + LayerNorm (eq. 5-8), a
self-attention head with LayerNorm + FFN (eq. 12), global average pooling and a
linear classifier (eq. 13).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.layers.attention import CrossAttentionFusion, SelfAttentionHead, feature_map_to_tokens
from defectscope.models.registry import register_model


@register_model("multiscale")
class MultiscaleCrossAttentionClassifier(nn.Module):
    """High-resolution queries attend to low-resolution keys/values of the same image.

    Args:
        backbone: registry name of the shared feature extractor.
        num_classes: number of classes ``K``.
        image_size: high-resolution side ``S_hi`` (queries), pixels. Inputs of another
            size are resized to it.
        low_res: low-resolution side ``S_lo`` (keys/values), pixels.
        embed_dim: token width ``d`` after the 1x1 projection of backbone features.
        num_heads: heads of cross- and self-attention (``d`` divisible by it).
        num_layers: self-attention encoder layers in the head.
        dropout: dropout in attention, FFN and before the classifier.
        pretrained / weights: see :func:`defectscope.models.create_backbone`.

    Forward:
        ``x``: ``[B, 3, H, W]`` in [0, 1]; returns logits ``[B, K]``.
        :meth:`forward_with_attention` also returns the cross-attention weights
        ``[B, heads, N_hi, N_lo]`` with ``N = ceil(S / reduction)^2`` tokens.
    """

    def __init__(self, backbone: str, num_classes: int, image_size: int = 200, low_res: int = 128,
                 embed_dim: int = 256, num_heads: int = 8, num_layers: int = 1, dropout: float = 0.1,
                 pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        if low_res >= image_size:
            raise ValueError(f"low_res ({low_res}) must be smaller than image_size ({image_size})")
        self.image_size, self.low_res = int(image_size), int(low_res)
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        c = self.backbone.out_channels
        self.proj_q = nn.Linear(c, embed_dim)
        self.proj_kv = nn.Linear(c, embed_dim)
        self.fusion = CrossAttentionFusion(embed_dim, embed_dim, num_heads, dropout)
        self.head = SelfAttentionHead(embed_dim, num_classes, num_heads, num_layers, dropout=dropout)

    def _resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        if x.shape[-2] == size and x.shape[-1] == size:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, K]`` and cross-attention weights ``[B, heads, N_hi, N_lo]``."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(x.shape)}")
        hi = self._resize(x, self.image_size)
        lo = self._resize(x, self.low_res)
        q = self.proj_q(feature_map_to_tokens(self.backbone(hi)))
        kv = self.proj_kv(feature_map_to_tokens(self.backbone(lo)))
        fused, attn = self.fusion(q, kv)
        return self.head(fused), attn

    def logits_and_pooled(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[B, K]`` and the global-average-pooled high-resolution backbone features
        ``[B, C]`` (the drift monitor's input) from one pass: the backbone runs once per resolution."""
        hi = self._resize(x, self.image_size)
        lo = self._resize(x, self.low_res)
        fmap = self.backbone(hi)
        q = self.proj_q(feature_map_to_tokens(fmap))
        kv = self.proj_kv(feature_map_to_tokens(self.backbone(lo)))
        fused, _ = self.fusion(q, kv)
        return self.head(fused), fmap.float().mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]
