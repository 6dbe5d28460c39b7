"""Grad-MobileNet (paper 001, Xiao et al., Sensors 23, 4563, 2023): input gradients of an overfit network."""

from defectscope.models.grad_mobilenet.torch_model import (
    GradMobileNet,
    GradientFeatureSpec,
    OneClassScorer,
    artificial_landmark,
    blur_maps,
    gradient_features,
    gradient_maps,
    gradient_norm,
    input_gradient,
)

__all__ = [
    "GradMobileNet",
    "GradientFeatureSpec",
    "OneClassScorer",
    "artificial_landmark",
    "blur_maps",
    "gradient_features",
    "gradient_maps",
    "gradient_norm",
    "input_gradient",
]
