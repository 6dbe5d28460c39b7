"""Inference of every image classifier (``multiscale``, ``classifier``, ``linear_probe``, the fused
``multicnn_fusion``): logits, temperature-scaled probabilities and optional pooled features.

:class:`ClassifierInference` is the one forward of a trained classifier: the pipeline's test
predictions (:func:`predict_probs`), the drift reference (:func:`pooled_features`), ``defectscope
predict`` / ``evaluate``, the service, ``inspect`` and the ONNX graph all run it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class ClassifierInference(nn.Module):
    """Wraps a classifier ``[B, 3, H, W] -> logits [B, K]`` to also return probabilities (and features).

    Args:
        model: the classifier.
        temperature: ``T`` of temperature scaling (fitted on the validation part at training):
            ``probabilities = softmax(logits / T)``; 1 = plain softmax.
        features: also return the pooled backbone features ``[B, C]`` (the drift monitor's
            input; :func:`pooled_features`).
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
        elif self.features and hasattr(self.model, "logits_and_pooled"):  # multiscale: one backbone pass per scale
            logits, feats = self.model.logits_and_pooled(image)
        else:
            logits = self.model(image)
            feats = self.model.backbone(image).float().mean(dim=(2, 3)) if self.features else None
        probs = torch.softmax(logits.float() / self.temperature, dim=1)
        return (logits, probs, feats) if feats is not None else (logits, probs)


#: the name the deploy adapters used
ClassifierWithProbabilities = ClassifierInference


@torch.no_grad()
def _batches(module: nn.Module, x, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    module.eval()
    xt = torch.as_tensor(x)
    return [module(xt[i : i + batch_size].float() / 255.0) for i in range(0, len(xt), batch_size)]


def predict_probs(model: nn.Module, x, batch_size: int = 32, temperature: float = 1.0) -> np.ndarray:
    """Probabilities ``float32 [N, K]`` of uint8 images ``[N, 3, H, W]`` (fp32, eval mode):
    ``softmax(logits / temperature)`` of :class:`ClassifierInference`."""
    out = _batches(ClassifierInference(model, temperature), x, batch_size)
    return torch.cat([o[1] for o in out]).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def pooled_features(model: nn.Module, x, batch_size: int = 32) -> np.ndarray:
    """Global-average-pooled backbone features ``float32 [N, C]`` of uint8 images ``[N, 3, S, S]`` (the drift
    monitor's features: the ``features`` output of :class:`ClassifierInference`)."""
    out = _batches(ClassifierInference(model, features=True), x, batch_size)
    return torch.cat([o[2] for o in out]).numpy() if out else np.zeros((0, model.backbone.out_channels), np.float32)


__all__ = ["ClassifierInference", "ClassifierWithProbabilities", "pooled_features", "predict_probs"]
