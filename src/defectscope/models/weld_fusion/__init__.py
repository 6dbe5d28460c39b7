"""Multimodal weld classification models (paper 000): fusion model, baselines, seam U-Net."""

from defectscope.models.weld_fusion.layers import FUSIONS, InvertedEmbedding, VanillaEmbedding, build_fusion, build_seam_unet
from defectscope.models.weld_fusion.torch_model import (
    MODALITIES,
    WeldDLinear,
    WeldFusionNet,
    WeldInformer,
    WeldInvertedEncoder,
    WeldVisionOnly,
)

__all__ = ["FUSIONS", "MODALITIES", "InvertedEmbedding", "VanillaEmbedding", "WeldDLinear", "WeldFusionNet",
           "WeldInformer", "WeldInvertedEncoder", "WeldVisionOnly", "build_fusion", "build_seam_unet"]
