"""Recipe of the ``classification`` task (:mod:`defectscope.engine.classification`): labelled images
(:class:`defectscope.config.ClassificationData`, shared with ``multicnn``), the model (multiscale attention,
plain classifier or linear probe) and its training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from defectscope.config import BaseRecipe, ClassificationData, ClassifierTrainConfig, StrictModel


class ClassificationModelConfig(StrictModel):
    """Model choice: ``multiscale`` (paper 000 section 5.7) or ``classifier`` (plain baseline).

    Attributes:
        name: registered model name.
        backbone: registry backbone name.
        pretrained: load real ImageNet weights (only EfficientNet-Lite has them here).
        weights: a local state-dict file for the backbone (any backbone).
        low_res: key/value resolution of the multiscale model.
        embed_dim, num_heads, num_layers, dropout: attention settings.
        linear_probe_reference: also fit a logistic regression (scikit-learn) on the frozen
            backbone's pooled features of the same training images and report it beside the
            model (``reference.linear_probe``) on the same test part or folds, so a run shows
            whether fine-tuning earned its cost. ``name: linear_probe`` makes that probe the
            model itself (seconds to train; a sensible choice for a few dozen images).
    """

    name: Literal["multiscale", "classifier", "linear_probe"] = "multiscale"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    low_res: int = Field(128, ge=16)
    embed_dim: int = Field(256, ge=8)
    num_heads: int = Field(8, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    linear_probe_reference: bool = True


class ClassificationTrainConfig(ClassifierTrainConfig):
    """:class:`ClassifierTrainConfig` with a stronger augmentation option.

    Attributes:
        augment: ``true``: random flips; ``"strong"``: flips, rotations by multiples of 90 degrees
            and grey-level jitter, for images with no "up" (radiographs, strip surfaces; the
            ``finetune_small`` candidate); ``false``: none.
    """

    augment: bool | Literal["strong"] = True


class ClassificationRecipe(BaseRecipe):
    """Recipe of the ``classification`` task; checkpoints are selected on ``val/weighted_f1`` (max)."""

    task: Literal["classification"] = "classification"
    data: ClassificationData
    model: ClassificationModelConfig = ClassificationModelConfig()
    train: ClassificationTrainConfig = ClassificationTrainConfig()
