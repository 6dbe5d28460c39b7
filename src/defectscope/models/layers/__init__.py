"""Building blocks shared by several methods (attention, losses)."""

from defectscope.models.layers.attention import CrossAttentionFusion, SelfAttentionHead
from defectscope.models.layers.losses import FocalLoss

__all__ = ["CrossAttentionFusion", "SelfAttentionHead", "FocalLoss"]
