"""The export module of classifiers lives with the method: :mod:`defectscope.models.classifier.inference`.

Kept as a module apart from :mod:`defectscope.deploy.adapters.classification` so that answering with
an ONNX classifier (ONNX Runtime, e.g. in an ``inspect`` worker) never imports torch.
"""

from defectscope.models.classifier.inference import ClassifierInference, ClassifierWithProbabilities

__all__ = ["ClassifierInference", "ClassifierWithProbabilities"]
