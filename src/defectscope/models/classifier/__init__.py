"""Plain backbone classifier (the baseline beside every method) and the image-classifier training wrapper."""

from defectscope.models.classifier.torch_model import BackboneClassifier

__all__ = ["BackboneClassifier"]
