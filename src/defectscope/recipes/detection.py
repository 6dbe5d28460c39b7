"""Recipe of the ``detection`` task (:mod:`defectscope.engine.detection`): VOC / COCO boxes, the slot
detector (paper 002) or FCOS-lite, their losses and heads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from defectscope.config import BaseRecipe, StrictModel


class DetectionData(StrictModel):
    """Where the boxes are and how images are split.

    Attributes:
        root: a VOC folder (``images/`` + ``annotations/``) or a COCO ``.json`` file.
        image_size: side in pixels the images are resized to (square) for the network.
        test_fraction: held-out share per image class.
        split_seed: seed of the stratified split.
        max_per_class: keep at most this many images per image class (quick runs, tests).
        missing: an image without annotation (or the reverse): ``error`` or ``warn`` (left out, named).
    """

    root: str
    image_size: int = Field(200, ge=32)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    max_per_class: int | None = Field(None, ge=3)
    missing: Literal["error", "warn"] = "error"


class DetectionModelConfig(StrictModel):
    """Model and loss (see the module docstring).

    Attributes:
        name: ``slot_detector`` or ``fcos_lite``.
        loss: ``single`` (III-C), ``padded`` (III-D) or ``hungarian`` (ours); slot_detector only.
        head: ``pooled`` (paper) or ``attention`` (ours); slot_detector only.
        backbone, pretrained, weights: see :func:`defectscope.models.create_backbone`
            (``fcos_lite`` always uses ``efficientnet_lite0``).
        num_slots: ``K``; ``None`` = the most boxes in one training image.
        hidden_dim, num_heads, encoder_layers, decoder_layers, dropout: head sizes.
        extra_level: also feed the backbone's stride-16 map to the attention head (CNN backbones).
        freeze_backbone: train the head on cached backbone features (computed with bf16 autocast).
        backbone_lr_factor: learning-rate factor of the backbone when it is fine-tuned.
        box_weight: weight of the MSE term (single, padded).
        w_class, w_l1, w_giou, eos_coef: Hungarian matching cost and loss weights.
        fpn_channels, head_convs: FCOS pyramid width and head depth.
        score_threshold: detections kept by ``predict``, drawn in the report and paired for box MSE/MAE
            (mAP uses every detection).
        nms_threshold: ``fcos_lite``'s non-maximum suppression IoU (per class; torchvision's default
            0.6): of two same-class detections overlapping more, the lower-scored one is dropped.
            Choose it on the validation split (:func:`nms_sweep`, ``benchmarks/detection_nms.py``).
        grad_clip: gradient norm clipping (0: off).
    """

    name: Literal["slot_detector", "fcos_lite"] = "slot_detector"
    loss: Literal["single", "padded", "hungarian"] = "hungarian"
    head: Literal["pooled", "attention"] = "attention"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    num_slots: int | None = Field(None, ge=1)
    hidden_dim: int = Field(256, ge=8)
    num_heads: int = Field(8, ge=1)
    encoder_layers: int = Field(1, ge=0)
    decoder_layers: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    extra_level: bool = False
    freeze_backbone: bool = False
    backbone_lr_factor: float = Field(1.0, gt=0)
    box_weight: float = Field(5.0, ge=0)
    w_class: float = Field(1.0, ge=0)
    w_l1: float = Field(5.0, ge=0)
    w_giou: float = Field(2.0, ge=0)
    eos_coef: float = Field(0.1, gt=0)
    fpn_channels: int = Field(96, ge=16)
    head_convs: int = Field(3, ge=1)
    score_threshold: float = Field(0.3, ge=0, le=1)
    nms_threshold: float = Field(0.6, gt=0, le=1)
    grad_clip: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "DetectionModelConfig":
        if self.name == "fcos_lite":
            if self.freeze_backbone:
                raise ValueError("fcos_lite trains its whole network; freeze_backbone must be false")
            if self.backbone != "efficientnet_lite0":
                raise ValueError(f"fcos_lite is built on efficientnet_lite0 only, got backbone '{self.backbone}'")
        return self


class DetectionRecipe(BaseRecipe):
    """Recipe of the ``detection`` task; checkpoints are selected (and training stopped early) on
    ``val/map_50``, the COCO mAP@0.5 of the validation images (max)."""

    task: Literal["detection"] = "detection"
    data: DetectionData
    model: DetectionModelConfig = DetectionModelConfig()
