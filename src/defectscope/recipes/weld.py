"""Recipe of the ``weld`` task (:mod:`defectscope.engine.weld`): weld data (images + spectral signals, or the
simulator), the seam U-Net, the model (cross-attention fusion of paper 000, its single-modality baselines
and the closed-form references) and its training."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from defectscope.config import BaseRecipe, StrictModel, TrainConfig


class SimulateConfig(StrictModel):
    """Simulate the data set (no real data needed): ``n_samples`` coupons, ``seed``, ``image_size`` px."""

    n_samples: int = Field(603, ge=14)
    seed: int = 0
    image_size: int = Field(256, ge=64)


class WeldData(StrictModel):
    """Data, split and input preparation.

    Attributes:
        root: a weld data folder (manifest.json); with ``simulate`` it is where the simulated set is
            written (default ``RUN/data``).
        simulate: simulate the set first (the demo); ``None`` reads ``root``.
        seq_len: ``T`` time steps per series (paper 000: 560); ``length_policy`` resample or crop.
        test_fraction, split_seed: the stratified held-out split of a single-split run (paper: 8:2).
        crop_height, crop_width: size (px) each weld crop is resized to for the vision encoder.
        seg_size: side (px) images are resized to for the seam U-Net.
        segmented: blank the background outside the (predicted) seam in the crops (paper's
            "segmented images"); ``False`` feeds raw crops. No effect without a seam U-Net.
    """

    root: str | None = None
    simulate: SimulateConfig | None = None
    seq_len: int = Field(560, ge=16)
    length_policy: Literal["resample", "crop"] = "resample"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    crop_height: int = Field(64, ge=32)
    crop_width: int = Field(256, ge=32)
    seg_size: int = Field(128, ge=32)
    segmented: bool = True


class SegmentationConfig(StrictModel):
    """Seam U-Net (compact, Fig. 7) training.

    ``enabled``: train it when every sample has a seam mask (otherwise, and with ``enabled=False``,
    each weld's crop is a fixed band of the image, see :func:`crop_welds`).
    """

    enabled: bool = True
    base_channels: int = Field(8, ge=2)
    depth: int = Field(3, ge=1, le=5)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)


class WeldModelConfig(StrictModel):
    """Weld model and signal settings.

    Attributes:
        name: ``weld_fusion`` (paper 000), ``weld_vision``, ``weld_dlinear``, ``weld_informer``, ``weld_inverted``;
            the closed-form references ``weld_signal_stats`` (per-channel statistics of the process window ->
            logistic regression, :mod:`defectscope.models.signal_stats`) and ``weld_image_probe`` (logistic
            regression on the frozen backbone's pooled crop features); these two fit in seconds.
        backbone, pretrained, weights: vision encoder (``efficientnet_lite0`` has real ImageNet weights here;
            the paper's ``mobilenetv2_100`` has none on this machine).
        fusion: ``v2s`` | ``s2v`` | ``bidirectional`` | ``add`` | ``concat``.
        embedding: ``inverted`` | ``vanilla``; ``spectral_dim`` its width D (paper: 64/96/128).
        embed_dim, num_heads, num_layers, dropout: fusion/head settings.
        channels: ``select`` (Pearson selection of ``num_channels``), or ``all``.
        freeze_backbone: keep the (ImageNet) vision encoder fixed and train on its cached feature
            maps, computed once; the CPU demo uses it (the paper fine-tunes the encoder).
        num_channels: channels kept by the selection (paper: 4; at most the data's channel count).
        per_band: balance the selection over VIS/NIR (channels with wavelengths, the paper's
            2 + 2) or over the channel groups (e.g. electrical, gas, acoustic) when wavelengths are absent.
    """

    name: Literal["weld_fusion", "weld_vision", "weld_dlinear", "weld_informer", "weld_inverted",
                  "weld_signal_stats", "weld_image_probe"] = "weld_fusion"
    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    fusion: Literal["v2s", "s2v", "bidirectional", "add", "concat"] = "v2s"
    embedding: Literal["inverted", "vanilla"] = "inverted"
    spectral_dim: int = Field(96, ge=4)
    embed_dim: int = Field(128, ge=8)
    num_heads: int = Field(4, ge=1)
    num_layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    freeze_backbone: bool = False
    channels: Literal["select", "all"] = "select"
    num_channels: int = Field(4, ge=1)
    per_band: bool = True


class WeldTrainConfig(TrainConfig):
    """:class:`TrainConfig` plus the classification loss of the weld models.

    Attributes:
        loss: ``focal`` (paper 000, eq. 14) or ``ce`` (cross-entropy).
        focal_gamma: focusing parameter lambda of eq. 14.
        label_smoothing: for ``ce`` only.
        augment, channels_last: always ``false`` here: weld crops are not flipped (the orientation
            of the first crop carries meaning, section 4.2) and the inputs are 5-D.
    """

    epochs: int = Field(10, ge=1)
    lr: float = Field(2e-4, gt=0)
    early_stopping_patience: int = Field(4, ge=0)
    augment: bool = False
    channels_last: bool = False
    loss: Literal["focal", "ce"] = "focal"
    focal_gamma: float = Field(2.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)

    @field_validator("augment", "channels_last")
    @classmethod
    def _not_used(cls, v: bool, info) -> bool:
        if v:
            raise ValueError(f"not a setting of task 'weld' (it would do nothing here): set {info.field_name}: false")
        return v


class WeldRecipe(BaseRecipe):
    """Recipe of the ``weld`` task; checkpoints are selected on ``val/weighted_f1`` (max), early stopping too."""

    task: Literal["weld"] = "weld"
    data: WeldData = WeldData()
    segmentation: SegmentationConfig = SegmentationConfig()
    model: WeldModelConfig = WeldModelConfig()
    train: WeldTrainConfig = WeldTrainConfig()
