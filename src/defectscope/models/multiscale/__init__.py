"""Multiscale cross-attention classifier (paper 000, section 5.7, Fig. 19, Table 9)."""

from defectscope.models.multiscale.torch_model import MultiscaleCrossAttentionClassifier

__all__ = ["MultiscaleCrossAttentionClassifier"]
