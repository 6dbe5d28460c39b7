"""Recipe of the ``segmentation`` task (:mod:`defectscope.engine.segmentation`): KolektorSDD-layout data, the
U-Net (paper 004), its training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from defectscope.config import BaseRecipe, StrictModel, TrainConfig
from defectscope.evaluation.segmentation import IMAGE_SCORE_METHODS


class SegmentationData(StrictModel):
    """Where the images and masks are, how they are split, the size rule and the sampling of training images.

    Attributes:
        root: KolektorSDD-layout folder (images/, masks/, manifest.csv with id,[split,]defective).
        height, width: network input size (multiples of 32); images are resized to it.
        train_split, test_split: manifest ``split`` values trained on / reported under ``test``
            (the test split is the data's own test set: cross-validation leaves it out).
        test_fraction, split_seed: the stratified held-out share and its seed, used only when the
            manifest has no ``split`` column or no rows of ``test_split``.
        defect_oversample: each defective training image appears this many times per epoch.
        good_per_epoch: good (empty-mask) training images drawn per epoch (``None``: all).
        crop_height: train on crops this tall (full width; 0: whole images); multiple of 32.
        max_images: keep at most this many images per split (quick runs and tests), half defective
            where possible.
    """

    root: str
    height: int = Field(320, ge=32)
    width: int = Field(128, ge=32)
    train_split: str = "train"
    test_split: str = "val"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    defect_oversample: int = Field(3, ge=1)
    good_per_epoch: int | None = Field(None, ge=0)
    crop_height: int = Field(0, ge=0)
    max_images: int | None = Field(None, ge=2)

    @field_validator("height", "width", "crop_height")
    @classmethod
    def _multiple_of_32(cls, v: int) -> int:
        if v % 32:
            raise ValueError(f"must be a multiple of 32 (U-Net size rule); try {v // 32 * 32 or 32} or {(v // 32 + 1) * 32}")
        return v


class SegmentationModelConfig(StrictModel):
    """U-Net settings (paper 004, section 2).

    Attributes:
        name: registered model (``unet``).
        encoder: ``resnet18`` (random init here) or ``efficientnet_lite0`` (real ImageNet weights).
        pretrained: load the encoder's ImageNet weights (EfficientNet-Lite0 only).
        weights: local encoder state dict (any encoder).
        decoder_channels: the five decoder widths.
        bce_weight, dice_weight: loss = bce_weight * BCE + dice_weight * Dice.
        threshold: probability at or above which a pixel is predicted defective; an image is
            predicted defective when its image score reaches it.
        tta: test-time augmentation: average the probabilities of the image and its
            horizontal, vertical and double flips (the flips training uses); 4x inference.
        image_score: how a mask becomes the image-level "defect present" score
            (``max``, ``blur_max``, ``top_mean``; see :func:`defectscope.evaluation.segmentation.image_scores`).
    """

    name: str = "unet"
    encoder: str = "resnet18"
    pretrained: bool = False
    weights: str | None = None
    decoder_channels: list[int] = [128, 64, 32, 16, 16]
    bce_weight: float = Field(1.0, ge=0)
    dice_weight: float = Field(1.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    tta: bool = False
    image_score: Literal[IMAGE_SCORE_METHODS] = "max"


class SegmentationRecipe(BaseRecipe):
    """Recipe of the ``segmentation`` task.

    With ``train.val_fraction > 0`` checkpoints are selected, and training stopped early
    (``train.early_stopping_patience``), on the validation loss ``val/loss`` (BCE + Dice, min);
    with 0 the last weights of the fixed schedule are kept.
    """

    task: str = "segmentation"
    data: SegmentationData
    model: SegmentationModelConfig = SegmentationModelConfig()
    train: TrainConfig = TrainConfig(epochs=12, batch_size=8, lr=1e-3, val_fraction=0.0, early_stopping_patience=0)
