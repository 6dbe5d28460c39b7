"""Recipe of the ``multicnn`` task (:mod:`defectscope.engine.multicnn`): the members of the ensemble
(paper 003), their fine-tuning and augmentation, the feature-fusion head."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from defectscope.config import BaseRecipe, ClassificationData, StrictModel, TrainConfig


RESERVED_NAMES = ("feature_fusion", "late_fusion")


class MemberConfig(StrictModel):
    """One single model of the ensemble.

    Attributes:
        name: unique name (default: the backbone name); the run folder ``members/<name>``
            (letters, digits, ``_ . -``; not ``feature_fusion`` / ``late_fusion``).
        backbone: registry backbone name.
        pretrained: real ImageNet weights (only EfficientNet-Lite here).
        weights: a local state-dict file for the backbone.
        image_size: the member's input side; images are resized from ``data.image_size``
            inside the model (default: ``data.image_size``).
        freeze: number of stages/layers frozen from the input side (paper 003 section 2.4.2).
        freeze_unit: ``stages`` (timm coarse groups, stem = 1) or ``layers`` (leaf modules).
        dropout: before the member's linear layer (paper 003: 0.5).
        epochs, batch_size: override ``train.epochs`` / ``train.batch_size`` for this member.
    """

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    backbone: str
    pretrained: bool = True
    weights: str | None = None
    image_size: int | None = Field(None, ge=16)
    freeze: int = Field(0, ge=0)
    freeze_unit: Literal["stages", "layers"] = "stages"
    dropout: float = Field(0.5, ge=0, lt=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)

    @property
    def key(self) -> str:
        return self.name or self.backbone


class AugmentConfig(StrictModel):
    """Online augmentation of paper 003 section 2.2 (Fig. 1 d-g), per image.

    Attributes:
        flips: random horizontal and vertical flips.
        rotation: maximum rotation in degrees (uniform in [-rotation, rotation];
            180 = arbitrary angle); borders are filled by reflection.
        brightness, contrast, saturation: colour change, each a factor drawn
            uniformly in [1 - v, 1 + v] (saturation is a no-op on grey images).
    """

    flips: bool = True
    rotation: float = Field(180.0, ge=0, le=180)
    brightness: float = Field(0.2, ge=0, lt=1)
    contrast: float = Field(0.2, ge=0, lt=1)
    saturation: float = Field(0.2, ge=0, lt=1)


class MultiCNNTrainConfig(TrainConfig):
    """Member fine-tuning settings: :class:`TrainConfig` plus the loss, RMSprop and augmentation.

    Each member's checkpoint is selected (and early stopping decided) on ``val/weighted_f1``
    (max) of the validation part. ``epochs`` and ``max_minutes`` apply to each member.

    Attributes:
        lr: initial RMSprop learning rate (paper 003 Table 1: 1e-3).
        lr_end: final learning rate of the exponential decay (paper: 1e-4).
        weight_decay: RMSprop weight decay.
        loss: ``ce`` (paper 003) or ``focal``; ``focal_gamma`` its focusing parameter.
        label_smoothing: for ``ce``.
        rmsprop_alpha: RMSprop smoothing constant (Keras' rho, 0.9).
        augmentation: :class:`AugmentConfig` (used when ``augment`` is true).
    """

    lr: float = Field(1e-3, gt=0)
    lr_end: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: Literal["focal", "ce"] = "ce"
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    rmsprop_alpha: float = Field(0.9, gt=0, lt=1)
    augmentation: AugmentConfig = AugmentConfig()


class FusionConfig(StrictModel):
    """Training of the feature-fusion classifier on cached features (paper 003 section 3.2).

    The epoch with the best validation weighted F1 (ties: lower validation loss) is kept.

    Attributes:
        epochs, batch_size: passes over the cached training features and batch size.
        lr, lr_end: RMSprop learning rate, decaying exponentially (paper: 1e-3 -> 1e-4).
        dropout: before the linear layer (paper: 0.5).
        cache_dir: feature cache folder (default ``RUN/feature_cache``, per fold under
            cross-validation); point several runs at one folder to share entries (keys include
            the model and data fingerprints).
    """

    epochs: int = Field(50, ge=1)
    batch_size: int = Field(40, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_end: float = Field(1e-4, gt=0)
    dropout: float = Field(0.5, ge=0, lt=1)
    cache_dir: str | None = None


class MultiCNNRecipe(BaseRecipe):
    """Recipe of the ``multicnn`` task; members are selected on ``val/weighted_f1`` (max), the
    fusion head on the validation weighted F1 of its epochs. Single process only (``train.devices: 1``)."""

    task: Literal["multicnn"] = "multicnn"
    data: ClassificationData
    members: list[MemberConfig] = Field(min_length=1)
    train: MultiCNNTrainConfig = MultiCNNTrainConfig()
    fusion: FusionConfig = FusionConfig()

    @model_validator(mode="after")
    def _check(self) -> "MultiCNNRecipe":
        keys = [m.key for m in self.members]
        if len(set(keys)) != len(keys):
            raise ValueError(f"members: names must be unique (set 'name' when a backbone repeats), got {keys}")
        reserved = sorted(set(keys) & set(RESERVED_NAMES))
        if reserved:
            raise ValueError(f"members: {reserved} name the fused models' rows; choose another member name")
        if self.train.devices > 1:
            raise ValueError("train.devices: multicnn trains its members one after another in one process; "
                             f"use 1 (got {self.train.devices})")
        return self
