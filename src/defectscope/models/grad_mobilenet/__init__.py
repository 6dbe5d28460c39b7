"""Grad-MobileNet (paper 001, Xiao et al., Sensors 23, 4563, 2023): input gradients of an overfit network.

:class:`GradMobileNetDetector` is the method on the anomaly-model contract (registered as ``grad_mobilenet``);
:class:`GradMobileNet` is its network (trunk + bias-free head).
"""

from defectscope.models.grad_mobilenet.torch_model import (
    EXPORT_NOTE,
    GradientFeatureSpec,
    GradMobileNet,
    GradMobileNetArgs,
    GradMobileNetDetector,
    OneClassScorer,
    artificial_landmark,
    blur_maps,
    gradient_features,
    gradient_norm,
    input_gradient,
    log10_gradient_norm,
    log_gradient_features,
    log_gradient_maps,
)

__all__ = [
    "EXPORT_NOTE",
    "GradMobileNet",
    "GradMobileNetArgs",
    "GradMobileNetDetector",
    "GradientFeatureSpec",
    "OneClassScorer",
    "artificial_landmark",
    "blur_maps",
    "gradient_features",
    "gradient_norm",
    "input_gradient",
    "log10_gradient_norm",
    "log_gradient_features",
    "log_gradient_maps",
]
