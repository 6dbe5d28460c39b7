"""The export module of classifiers (torch): logits, probabilities and optional pooled features.

Kept apart from :mod:`defectscope.deploy.adapters.classification` so that answering with an ONNX
classifier (ONNX Runtime, e.g. in an ``inspect`` worker) never imports torch.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassifierWithProbabilities(nn.Module):
    """Wraps a classifier ``[B, 3, H, W] -> logits [B, K]`` to also return probabilities (and features).

    Args:
        model: the classifier.
        temperature: ``T`` of temperature scaling (fitted on the validation part at training):
            ``probabilities = softmax(logits / T)``; 1 = plain softmax.
        features: also return the pooled backbone features ``[B, C]`` (the drift monitor's
            input; :func:`defectscope.engine.classification.pooled_features`).
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0, features: bool = False) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)
        self.features = features and hasattr(model, "backbone")

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.features and hasattr(self.model, "forward_features") and hasattr(self.model, "head"):
            feats = self.model.forward_features(image).float()  # pooled backbone features, computed once
            logits = self.model.head(feats)
        else:
            logits = self.model(image)
            feats = self.model.backbone(image).float().mean(dim=(2, 3)) if self.features else None
        probs = torch.softmax(logits.float() / self.temperature, dim=1)
        return (logits, probs, feats) if feats is not None else (logits, probs)


__all__ = ["ClassifierWithProbabilities"]
