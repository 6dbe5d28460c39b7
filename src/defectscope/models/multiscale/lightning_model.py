"""Training wrapper of the multiscale cross-attention classifier (paper 000, section 5.7).

The model ends in class logits like any image classifier, so it trains with the shared
:class:`~defectscope.models.classifier.lightning_model.ImageClassifierModule` (AdamW,
warm-up + cosine, flips, focal loss eq. 14, checkpoint on ``val/weighted_f1``).
"""

from defectscope.models.classifier.lightning_model import ImageClassifierModule

MultiscaleModule = ImageClassifierModule

__all__ = ["MultiscaleModule"]
