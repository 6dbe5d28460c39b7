"""Recipe of the ``anomaly`` task (:mod:`defectscope.engine.anomaly`): data and protocol, one registered
anomaly model (validated by that model's own ``Args``), its network training, the optional clustering study.

Recipe (``configs/ksdd_patchcore.yaml``, ``configs/ksdd_padim.yaml``, ``configs/ksdd_gradmobilenet.yaml``)::

    task: anomaly
    data:  {root: ../shared/datasets/kolektorsdd, image_size: [1248, 512], calibration_fraction: 0.15}
    model: {name: patchcore, backbone: efficientnet_lite0, layers: [2, 4], bank_mib: 16}   # or padim, grad_mobilenet
    train: {epochs: 5, batch_size: 16, lr: 1.0e-3}        # network training (Grad-MobileNet only)
    clustering: {enabled: false}                          # paper 001's defect-type study, only when asked
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, field_validator

from defectscope.config import BaseRecipe, StrictModel, TrainConfig
from defectscope.models.anomaly import AnomalyArgs, anomaly_model_class


class AnomalyData(StrictModel):
    """KolektorSDD-style data and the protocol.

    Attributes:
        root: folder with ``images/``, ``masks/``, ``manifest.csv`` (``layout: kolektor``), or an
            MVTec AD category folder ``train/good``, ``test/<defect>``, ``ground_truth/<defect>``
            (``layout: mvtec``; good test images have no mask, pixel metrics use the defect masks).
        image_size: ``[H, W]`` every image is resized to; the models see this size (whole, or in
            ``model.tile`` windows) and their maps come back at it. KolektorSDD images are about
            1250 x 500 (H x W): ``[1248, 512]`` is full resolution, ``[384, 160]`` 0.31 of it.
        calibration_fraction: share of the good train images kept out of model fitting (the decision
            threshold, or Grad-MobileNet's one-class SVM, is fitted on them); 0 = fit on all.
        max_fit, max_test: keep at most this many fitting / test images of the protocol (quick
            runs and tests; the test subset keeps defective and good images in proportion). They
            act when the images are read, so cross-validation runs on the kept train-split images.
    """

    root: str = "../shared/datasets/kolektorsdd"
    layout: Literal["kolektor", "mvtec"] = "kolektor"
    image_size: tuple[int, int] = (384, 160)
    calibration_fraction: float = Field(0.15, ge=0, lt=1)
    max_fit: int | None = Field(None, ge=2)
    max_test: int | None = Field(None, ge=2)


class ClusteringConfig(StrictModel):
    """Defect-type clustering (paper 001, section 4.4.2) on a multi-class source; off unless asked.

    Attributes:
        enabled: run it (single-split runs only).
        source: a key of :data:`CLUSTERING_SOURCES` (``neu``; ``weld_sim`` once the weld
            simulator has landed).
        root: data folder of the source (required when enabled).
        reference_class: the class held as "normal" (trains the network, fits the SVM).
        fit_images: reference images used to train; ``per_class`` held-out images of each
            class (the reference too) are embedded and the defect classes clustered.
        image_size: square input side.
        epochs: training epochs of this second network (batch size, lr from ``train``).
        perplexity: t-SNE perplexity.
    """

    enabled: bool = False
    source: str = "neu"
    root: str | None = None
    reference_class: str = "crazing"
    fit_images: int = Field(200, ge=4)
    per_class: int = Field(60, ge=2)
    image_size: int = Field(200, ge=32)
    epochs: int = Field(8, ge=1)
    perplexity: float = Field(30.0, gt=1)


class AnomalyTrainConfig(TrainConfig):
    """:class:`TrainConfig` of the network training of models that train one (Grad-MobileNet).

    No validation part and no early stopping: the network is trained for ``epochs`` to overfit
    the normal images and its last weights are kept (the checkpoint monitor is none), so
    ``val_fraction`` and ``early_stopping_patience`` are 0 and any other value is refused.
    """

    val_fraction: float = 0.0
    early_stopping_patience: int = 0

    @field_validator("val_fraction", "early_stopping_patience")
    @classmethod
    def _no_validation_part(cls, v: float) -> float:
        if v != 0:
            raise ValueError("must be 0 for task 'anomaly': no validation part or checkpoint selection "
                             "(data.calibration_fraction holds good images out for the decision threshold)")
        return v


class AnomalyRecipe(BaseRecipe):
    """Recipe of the ``anomaly`` task: data, one registered anomaly model, its training, the optional clustering study."""

    task: Literal["anomaly"] = "anomaly"
    data: AnomalyData = AnomalyData()
    model: SerializeAsAny[AnomalyArgs] = Field(default_factory=lambda: anomaly_model_class("patchcore").Args())
    clustering: ClusteringConfig = ClusteringConfig()
    train: AnomalyTrainConfig = AnomalyTrainConfig(epochs=8, lr=1e-3, augment=False)

    @field_validator("model", mode="before")
    @classmethod
    def _model_schema(cls, v: Any) -> Any:
        """Validate the block by the registered model's own schema (``model.name`` picks it)."""
        if isinstance(v, AnomalyArgs):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"expected a mapping with 'name', got {type(v).__name__}")
        name = v.get("name", "patchcore")
        try:
            args_cls = anomaly_model_class(str(name)).Args
        except KeyError as exc:
            raise ValueError(str(exc).strip("'\"")) from None
        from pydantic import ValidationError

        try:
            return args_cls(**{**v, "name": name})
        except ValidationError as exc:
            known = ", ".join(sorted(args_cls.model_fields))
            bad = "; ".join(f"model.{'.'.join(str(p) for p in e['loc'])}: "
                            + ("not a setting of this model" if e["type"] == "extra_forbidden" else e["msg"])
                            for e in exc.errors())
            raise ValueError(f"{bad} (model '{name}' knows: {known})") from None
