"""Defect localization task (paper 002): class + box heads on backbone features, and a reference detector.

Recipe (``task: detection``)::

    data:  {root: ../shared/datasets/neu-det, image_size: 200, test_fraction: 0.2, split_seed: 0}
    model: {name: slot_detector, loss: hungarian, head: attention, backbone: efficientnet_lite0, pretrained: true}
    train: {epochs: 60, batch_size: 32, lr: 3.0e-4}

Models (``model.name`` / ``model.loss``):

- ``slot_detector`` + ``single`` (paper 002, section III-C): one class and one box per image.
  The target box is the image's **largest** box (by area; first in annotation order on ties)
  and the target class is that box's class.
- ``slot_detector`` + ``padded`` (section III-D): ``K`` slots (``K`` = most boxes in one
  training image unless ``model.num_slots`` is set), true boxes in annotation order, the rest
  padded with "no defect" and zero boxes; loss CE + MSE.
- ``slot_detector`` + ``hungarian`` (ours): the same ``K`` slots trained with Hungarian
  matching, CE + L1 + GIoU (invariant to slot order).
- ``fcos_lite``: torchvision FCOS on an EfficientNet-Lite0 FPN, the reference row.

``model.head`` picks the paper's pooled dense head or our attention head.
``model.freeze_backbone: true`` computes the backbone features once (for the 4 flip variants
of every training image: none, horizontal, vertical, both) and trains only the head; the time
to compute them is counted in ``train_seconds``.

Protocol (the shared pipeline, :mod:`defectscope.engine.pipeline`): samples are the annotated
images, stratified on the image's class (the NEU file-name prefix, :func:`image_class`);
``test_fraction`` is held out with ``split_seed`` and used once after training; a stratified
``train.val_fraction`` of the rest (seed ``seed``) selects the checkpoint by validation mAP@0.5
(``val/map_50``, max; also early stopping). ``--folds K`` runs stratified K-fold
cross-validation on the same image classes instead (pooled metrics: mAP etc. over all
out-of-fold images). Images are resized to ``image_size``; boxes are kept in normalised
coordinates and mapped back to each image's own pixels for the metrics and for ``predict``.

The Lightning wrapper and the training-only helpers (feature cache, flips, box dataset) live in
:mod:`defectscope.models.box_heads.lightning_model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader

from defectscope.config import BaseRecipe, ConfigError, StrictModel, resolve_path
from defectscope.data.boxes import BoxFormatError, ImageBoxes, image_class, read_boxes, write_coco
from defectscope.data.images import expand_inputs, iter_images, load_image, resize_uint8
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks, crossval_table
from defectscope.engine.run import RunError, RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, report_training_curves, resolved_precision, set_threads
from defectscope.evaluation.detection import detection_metrics, per_image_quality
from defectscope.evaluation.detection_plots import draw_boxes_pil, plot_box_cases
from defectscope.evaluation.report import Report
from defectscope.models import create_model
from defectscope.models.box_heads.lightning_model import (  # noqa: F401  (flip_target, single_targets: re-exported)
    BoxDataset,
    DetectionModule,
    cache_features,
    collate,
    flip_target,
    single_targets,
)
from defectscope.models.training import to_float
from defectscope.utils.io import atomic_path


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


# ---------------------------------------------------------------------------------------------- data


@dataclass
class BoxSplits:
    """Records, resized uint8 images ``[N, 3, S, S]``, normalised targets and image classes per split."""

    class_names: list[str]
    records: dict[str, list[ImageBoxes]]
    x: dict[str, np.ndarray]
    targets: dict[str, list[dict]]
    image_labels: dict[str, np.ndarray]


def to_target(record: ImageBoxes, class_names: list[str]) -> dict:
    """``{"boxes": [M, 4] float32 normalised xyxy, "labels": [M] long}`` of one record.

    Raises:
        BoxFormatError: a label not in ``class_names``.
    """
    try:
        labels = [class_names.index(n) for n in record.labels]
    except ValueError:
        bad = next(n for n in record.labels if n not in class_names)
        raise BoxFormatError(f"{record.source}: class '{bad}' is not among {class_names}") from None
    return {"boxes": torch.as_tensor(record.normalised(), dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.long)}


def load_record_images(records: list[ImageBoxes], size: int) -> np.ndarray:
    """Decode and resize the images of ``records`` to ``[N, 3, size, size]`` uint8.

    Raises:
        ImageReadError: an unreadable image (named).
        BoxFormatError: an image whose pixel size differs from its annotation's width/height.
    """
    out = np.empty((len(records), 3, size, size), dtype=np.uint8)
    for i, r in enumerate(records):
        img = load_image(r.image)
        if img.shape[0] != r.height or img.shape[1] != r.width:
            raise BoxFormatError(f"{r.source}: size says {r.width}x{r.height} (width x height) but image {r.image} "
                                 f"is {img.shape[1]}x{img.shape[0]}")
        out[i] = resize_uint8(img, size).transpose(2, 0, 1)
    return out


def read_box_records(data: DetectionData, class_names: list[str] | None = None
                     ) -> tuple[list[ImageBoxes], list[str], np.ndarray]:
    """The annotated images of ``data.root`` (subset by ``max_per_class``), their class names and image classes.

    Returns:
        ``(records, class_names, image_labels [N] int)``; the image class is
        :func:`~defectscope.data.boxes.image_class` (NEU: the file-name prefix).

    Raises:
        DatasetError / BoxFormatError: bad annotations (named), or none at all.
    """
    records, names = read_boxes(resolve_path(data.root), class_names, data.missing)
    if not records:
        raise BoxFormatError(f"{data.root}: no annotated images")
    labels = np.array([image_class(r, names) for r in records])
    if data.max_per_class:
        rng = np.random.default_rng(data.split_seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: data.max_per_class]
                                       for c in range(len(names))]))
        records, labels = [records[i] for i in keep], labels[keep]
    return records, names, labels


def load_box_samples(data: DetectionData, class_names: list[str] | None = None) -> Samples:
    """The pipeline's :class:`Samples` of a detection data set: one sample per annotated image.

    ``ids`` are the image files, ``labels`` the image classes (stratification of the split and
    of the folds), ``data`` is ``{"records": [ImageBoxes], "x": uint8 [N, 3, S, S],
    "targets": [{"boxes": [M, 4] normalised xyxy, "labels": [M]}]}``.

    Raises:
        DatasetError / BoxFormatError / ImageReadError: bad annotations or images (named).
    """
    records, names, labels = read_box_records(data, class_names)
    x = load_record_images(records, data.image_size)
    targets = [to_target(r, names) for r in records]
    n_boxes = sum(len(r.labels) for r in records)
    return Samples([str(r.image) for r in records], labels, names, {"records": records, "x": x, "targets": targets},
                   description=f"{data.root} ({len(records)} images, {n_boxes} boxes, {len(names)} classes)")


def _read_split_list(path: Path) -> list[str]:
    return [line.rsplit(",", 1)[0] for line in path.read_text().splitlines() if line.strip()]


def box_splits_from_run(run_dir: str | Path, class_names: list[str] | None = None) -> BoxSplits:
    """The train / val / test images of a detection run, as listed in ``RUN/split/*.txt``.

    The annotations are read again from the run's ``config.yaml`` data root, and only the
    listed images are decoded (at the run's ``data.image_size``), so the parts are exactly the
    ones the run trained, selected its checkpoint and was tested on (also for a fold folder
    ``RUN/folds/<k>`` of a cross-validation).

    Raises:
        RunError: no config or split lists, or a listed image the data no longer hold.
        DatasetError / BoxFormatError / ImageReadError: bad annotations or images (named).
    """
    run = RunFolder(run_dir)
    recipe = DetectionRecipe(**run.read_config())
    records, names = read_boxes(resolve_path(recipe.data.root), class_names, recipe.data.missing)
    by_path = {Path(r.image).resolve(): r for r in records}
    out = BoxSplits(names, {}, {}, {}, {})
    for part in ("train", "val", "test"):
        f = run.split_dir / f"{part}.txt"
        if not f.is_file():
            if part == "val":
                continue
            raise RunError(f"{f}: not found; is {run.path} a detection run folder?")
        recs = []
        for line_no, name in enumerate(_read_split_list(f), 1):
            r = by_path.get(Path(name).resolve())
            if r is None:
                raise RunError(f"{f}, line {line_no}: {name} is not an annotated image of {recipe.data.root}")
            recs.append(r)
        out.records[part] = recs
        out.x[part] = load_record_images(recs, recipe.data.image_size)
        out.targets[part] = [to_target(r, names) for r in recs]
        out.image_labels[part] = np.array([image_class(r, names) for r in recs], dtype=int)
    return out


# ------------------------------------------------------------------------------------- model, metrics


def model_kwargs_from(recipe: DetectionRecipe, num_classes: int, num_slots: int) -> dict:
    """Arguments for :func:`create_model` that rebuild the architecture without loading weights."""
    m = recipe.model
    if m.name == "fcos_lite":
        return {"num_classes": num_classes, "image_size": recipe.data.image_size, "fpn_channels": m.fpn_channels,
                "head_convs": m.head_convs, "nms_thresh": m.nms_threshold}
    return {"backbone": m.backbone, "num_classes": num_classes, "num_slots": num_slots,
            "mode": "single" if m.loss == "single" else "slots", "head": m.head, "hidden_dim": m.hidden_dim,
            "num_heads": m.num_heads, "encoder_layers": m.encoder_layers, "decoder_layers": m.decoder_layers,
            "dropout": m.dropout, "image_size": recipe.data.image_size, "extra_level": m.extra_level}


@torch.no_grad()
def predict_normalised(model: nn.Module, x: np.ndarray, batch_size: int = 32) -> list[dict]:
    """Detections of uint8 images ``[N, 3, S, S]`` (fp32, eval mode): normalised xyxy ``boxes``, ``scores``, ``labels``."""
    model.eval()
    xt = torch.from_numpy(x)
    out: list[dict] = []
    for i in range(0, len(xt), batch_size):
        out += [{k: v.cpu() for k, v in d.items()} for d in model.detect(to_float(xt[i : i + batch_size]))]
    return out


def to_pixels(dets: list[dict], records: list[ImageBoxes]) -> list[dict]:
    """Normalised detections to each record's own pixel coordinates (numpy)."""
    out = []
    for d, r in zip(dets, records):
        scale = np.array([r.width, r.height, r.width, r.height], dtype=np.float64)
        out.append({"boxes": d["boxes"].double().numpy().reshape(-1, 4) * scale,
                    "scores": d["scores"].double().numpy().reshape(-1), "labels": d["labels"].numpy().reshape(-1)})
    return out


def targets_in_pixels(records: list[ImageBoxes], class_names: list[str]) -> list[dict]:
    """Ground truth per record: pixel xyxy ``boxes`` and class-index ``labels`` (numpy)."""
    return [{"boxes": r.boxes, "labels": np.array([class_names.index(n) for n in r.labels], dtype=np.int64)}
            for r in records]


def load_detector(run_dir: Path) -> tuple[nn.Module, dict]:
    """Rebuild a trained box model from ``RUN/model.ckpt``; returns ``(model in eval mode, payload)``.

    Raises:
        RunError: missing or foreign checkpoint, or weights that do not fit.
    """
    return RunFolder(run_dir).load_model()


def evaluate_records(model: nn.Module, records: list[ImageBoxes], x: np.ndarray, class_names: list[str],
                     image_labels: list[int], score_threshold: float) -> tuple[dict, list[dict], list[dict], float]:
    """Predict ``x`` and compute :func:`detection_metrics`; returns ``(metrics, preds, targets, images_per_second)``."""
    start = time.perf_counter()
    dets = predict_normalised(model, x)
    ips = len(x) / max(1e-9, time.perf_counter() - start)
    preds = to_pixels(dets, records)
    targets = targets_in_pixels(records, class_names)
    metrics = detection_metrics(preds, targets, [(r.width, r.height) for r in records], list(image_labels),
                                class_names, score_threshold)
    return metrics, preds, targets, ips


def nms_sweep(model: nn.Module, splits: BoxSplits, thresholds: list[float], score_threshold: float = 0.3,
              split_names: tuple[str, ...] = ("val", "test")) -> list[dict]:
    """COCO mAP@0.5 and mAP@[.5:.95] per split for each NMS IoU threshold of an ``fcos_lite`` model.

    Choose the threshold on ``val`` (:func:`choose_on_validation`), then read ``test`` at it.
    The model's own threshold is restored afterwards.

    Args:
        model: a trained :class:`~defectscope.models.box_heads.LiteFCOS` (eval mode).
        splits: the run's parts (:func:`box_splits_from_run`).
        thresholds: NMS IoU thresholds in (0, 1].

    Returns:
        one dict per threshold: ``nms_threshold``, ``<split>_map_50``, ``<split>_map`` for each split present.

    Raises:
        ValueError: the model has no torchvision NMS stage (slot heads), or a threshold outside (0, 1].
    """
    det = getattr(model, "det", None)
    if det is None or not hasattr(det, "nms_thresh"):
        raise ValueError(f"nms_sweep: {type(model).__name__} has no NMS stage; only fcos_lite models have one")
    bad = [t for t in thresholds if not 0 < t <= 1]
    if bad:
        raise ValueError(f"nms_sweep: NMS IoU thresholds must be in (0, 1], got {bad}")
    old, rows = det.nms_thresh, []
    try:
        for thr in thresholds:
            det.nms_thresh = float(thr)
            row: dict = {"nms_threshold": float(thr)}
            for name in split_names:
                if name in splits.x:
                    m, *_ = evaluate_records(model, splits.records[name], splits.x[name], splits.class_names,
                                             list(splits.image_labels[name]), score_threshold)
                    row[f"{name}_map_50"], row[f"{name}_map"] = m["map_50"], m["map"]
            rows.append(row)
    finally:
        det.nms_thresh = old
    return rows


def choose_on_validation(rows: list[dict]) -> dict:
    """The row of :func:`nms_sweep` with the highest ``val_map_50`` (first on ties).

    Raises:
        ValueError: no row has a validation figure.
    """
    rows = [r for r in rows if r.get("val_map_50") is not None]
    if not rows:
        raise ValueError("choose_on_validation: no validation split in the sweep (train.val_fraction = 0?)")
    return max(rows, key=lambda r: r["val_map_50"])


def write_detection_report(run: RunFolder, title: str, metrics: dict, info: dict, records: list[ImageBoxes],
                           preds: list[dict], targets: list[dict], class_names: list[str], score_threshold: float,
                           prefix: str = "", cases: int = 8) -> None:
    """Report: metrics, per-class AP, best and worst held-out images with true (green) and predicted (red) boxes.

    ``info["crossval"]`` (from the pipeline) adds the fold table (mean +- std, pooled); the
    metrics are then those of the pooled out-of-fold predictions.
    """
    rep = Report(title)
    info = dict(info)
    cv = info.pop("crossval", None)
    rep.kv("Run", info)
    keys = ("n", "n_boxes", "map_50", "map", "map_75", "mar_100", "accuracy",
            "box_mse", "box_mae", "mean_matched_iou", "box_pairs", "box_unmatched")
    if cv:
        rep.table("Cross-validation: held-out figures per fold", crossval_table(
            {**cv, "pooled": metrics}, ["n", "map_50", "map", "accuracy", "box_mae"]))
    rep.kv("Pooled out-of-fold metrics" if cv else "Test metrics", {k: metrics[k] for k in keys})
    rep.table("Per class AP (COCO, pycocotools)",
              [{"class": n, "AP@0.5": metrics["per_class_ap50"][n], "AP@[.5:.95]": metrics["per_class_ap"][n]}
               for n in class_names], ["class", "AP@0.5", "AP@[.5:.95]"])
    rep.text("box_mse / box_mae: normalised xyxy coordinates; each true box is paired one-to-one with a detection "
             f"of score >= {score_threshold} by maximum total IoU (unpaired true boxes: box_unmatched).")
    quality = np.array([per_image_quality(p, t, score_threshold) for p, t in zip(preds, targets)])
    order = np.argsort(-quality, kind="stable")
    k = min(cases, len(order))
    what = "out-of-fold" if cv else "held-out"
    for name, idx in (("best", order[:k]), ("worst", order[::-1][:k])):
        imgs = [load_image(records[i].image) for i in idx]
        titles = [f"{Path(records[i].image).name}  q={quality[i]:.2f}" for i in idx]
        plot_box_cases(imgs, [preds[i] for i in idx], [targets[i] for i in idx], class_names, titles,
                       run.plots / f"{prefix}{name}_cases.png", score_threshold,
                       suptitle=f"{name} {k} {what} images (green: true, red dashed: predicted, score >= {score_threshold})")
        rep.image(f"plots/{prefix}{name}_cases.png",
                  f"The {k} {name} {what} images by q = mean IoU of same-class one-to-one pairs "
                  f"(misses and extra detections count 0)")
    if not cv:
        report_training_curves(rep, run, "Training losses and validation mAP per epoch")
    rep.write(run.report_path)


# ---------------------------------------------------------------------------------------------- task


class DetectionTask(TaskHooks):
    """The ``detection`` task (registered as such): hooks of the shared pipeline.

    Samples are the annotated images, stratified (split and folds) on the image class. The
    out-of-fold table has ``pred`` (class of the top-scoring detection, empty when none),
    ``n_boxes`` (detections with score >= ``model.score_threshold``), ``top_score`` and
    ``quality`` (mean IoU of same-class one-to-one pairs, :func:`per_image_quality`); pooled
    metrics are :func:`detection_metrics` over all out-of-fold images together.
    """

    name = "detection"
    recipe = DetectionRecipe
    monitor = DetectionModule.monitor
    summary_keys = ("map_50", "map", "accuracy", "box_mae")
    predict_options = ("save_images",)
    default_predict_out = "boxes.json"

    def load_samples(self, recipe: DetectionRecipe, run_dir: Path | None = None) -> Samples:
        return load_box_samples(recipe.data)

    def split_info(self, recipe: DetectionRecipe) -> dict:
        return {"seed": recipe.data.split_seed, "test_fraction": recipe.data.test_fraction,
                "stratified_on": "image class (file-name prefix)"}

    def fit_model(self, recipe: DetectionRecipe, samples: Samples, parts: dict[str, np.ndarray],
                  run: RunFolder) -> Fitted | None:
        t, m = recipe.train, recipe.model
        set_threads(t)
        names, x, targets = samples.class_names, samples.data["x"], samples.data["targets"]
        tr, va = parts["train"], parts.get("val")
        has_val = va is not None and len(va) > 0
        most = max(len(targets[i]["labels"]) for i in tr)
        k = m.num_slots or most
        if m.name == "slot_detector" and m.loss != "single" and k < most:
            raise ConfigError(f"model.num_slots={k} is fewer than the {most} boxes of one training image")
        kwargs = model_kwargs_from(recipe, len(names), k)
        model = create_model(m.name, **kwargs, pretrained=m.pretrained, weights=m.weights)
        weights_source = model.weights_source if m.name == "fcos_lite" else model.backbone.weights_source
        loss = "fcos" if m.name == "fcos_lite" else m.loss
        frozen = m.freeze_backbone
        start = time.perf_counter()
        if frozen:  # frozen-backbone inference: bf16 autocast where this CPU computes bf16 natively (defectscope.machine)
            if t.channels_last:
                model.to(memory_format=torch.channels_last)
            train_in: torch.Tensor | list = cache_features(model, x[tr], (0, 1, 2, 3) if t.augment else (0,),
                                                           precision="auto", channels_last=t.channels_last)
            val_in = cache_features(model, x[va], (0,), precision="auto", channels_last=t.channels_last) if has_val else None
        else:
            train_in = torch.from_numpy(x[tr])
            val_in = torch.from_numpy(x[va]) if has_val else None
        cache_seconds = time.perf_counter() - start
        model.train()
        module = DetectionModule(model, loss, t.lr, t.weight_decay, frozen, t.channels_last, box_weight=m.box_weight,
                                 w_class=m.w_class, w_l1=m.w_l1, w_giou=m.w_giou, eos_coef=m.eos_coef,
                                 backbone_lr_factor=m.backbone_lr_factor, grad_clip=m.grad_clip)
        n_train = len(tr)
        train_loader = DataLoader(BoxDataset(train_in, [targets[i] for i in tr], t.augment), batch_size=t.batch_size,
                                  shuffle=True, num_workers=0, collate_fn=collate, drop_last=n_train > t.batch_size)
        val_loader = DataLoader(BoxDataset(val_in, [targets[i] for i in va], False), batch_size=max(32, t.batch_size),
                                shuffle=False, num_workers=0, collate_fn=collate) if has_val else None
        info = fit_lightning(module, train_loader, val_loader, t, run.path, self.monitor, DetectionModule.mode)
        if info is None:
            return None
        train_seconds = time.perf_counter() - start
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        epochs = info["epochs_run"]
        info.update(num_slots=k, train_seconds=round(train_seconds, 1), feature_cache_seconds=round(cache_seconds, 1),
                    train_images_per_second=round(n_train * max(1, epochs) / max(1e-9, train_seconds - cache_seconds), 1),
                    precision=resolved_precision(t), channels_last=t.channels_last, threads=torch.get_num_threads())
        ckpt = {"model_name": m.name, "model_kwargs": kwargs, "state_dict": model.state_dict(), "class_names": names,
                "image_size": recipe.data.image_size, "score_threshold": m.score_threshold, "loss": loss,
                "normalisation": "inside model: input RGB in [0, 1]", "weights_source": weights_source,
                "box_format": "normalised xyxy inside the model; COCO [x, y, w, h] pixels in files"}
        return Fitted(model, ckpt, info)

    def run_info(self, recipe: DetectionRecipe, fitted: Fitted) -> dict:
        m = recipe.model
        return {"model": m.name, "loss": fitted.checkpoint["loss"], "head": m.head if m.name == "slot_detector" else "fcos",
                "backbone": m.backbone, "weights": fitted.checkpoint["weights_source"], "freeze_backbone": m.freeze_backbone}

    def predict_samples(self, recipe: DetectionRecipe, fitted: Fitted, samples: Samples, idx: np.ndarray) -> Predictions:
        """Pixel detections of the images ``idx``; also sets ``fitted.info["test_images_per_second"]``."""
        start = time.perf_counter()
        dets = predict_normalised(fitted.model, samples.data["x"][idx])
        fitted.info["test_images_per_second"] = round(len(idx) / max(1e-9, time.perf_counter() - start), 1)
        records = [samples.data["records"][i] for i in idx]
        preds = to_pixels(dets, records)
        targets = targets_in_pixels(records, samples.class_names)
        thr = recipe.model.score_threshold
        table: dict[str, list] = {"pred": [], "n_boxes": [], "top_score": [], "quality": []}
        for p, tgt in zip(preds, targets):
            top = int(p["scores"].argmax()) if len(p["scores"]) else None
            table["pred"].append("" if top is None else samples.class_names[int(p["labels"][top])])
            table["n_boxes"].append(int((p["scores"] >= thr).sum()))
            table["top_score"].append(0.0 if top is None else float(p["scores"][top]))
            table["quality"].append(per_image_quality(p, tgt, thr))
        return Predictions(table, preds)

    def compute_metrics(self, recipe: DetectionRecipe, samples: Samples, idx: np.ndarray, preds: Predictions) -> dict:
        records = [samples.data["records"][i] for i in idx]
        return detection_metrics(preds.raw, targets_in_pixels(records, samples.class_names),
                                 [(r.width, r.height) for r in records], [int(v) for v in samples.labels[idx]],
                                 samples.class_names, recipe.model.score_threshold)

    def write_report(self, run: RunFolder, recipe: DetectionRecipe, samples: Samples, idx: np.ndarray,
                     preds: Predictions, metrics: dict, info: dict) -> None:
        m = recipe.model
        loss = "fcos" if m.name == "fcos_lite" else m.loss
        records = [samples.data["records"][i] for i in idx]
        head = {"model": m.name, "loss": loss, "head": m.head if m.name == "slot_detector" else "fcos",
                "backbone": m.backbone, "frozen backbone": m.freeze_backbone}
        write_detection_report(run, f"defectscope {self.name}: {m.name} ({loss}) on {Path(recipe.data.root).name}",
                               metrics, {**head, **info}, records, preds.raw, targets_in_pixels(records, samples.class_names),
                               samples.class_names, m.score_threshold)

    def evaluate(self, run_dir: Path, data: Path, out: Path | None = None) -> dict:
        """Evaluate a trained run on every annotated image of ``data`` (VOC folder or COCO .json).

        Writes ``out`` (default ``RUN/evaluations/<data name>``): metrics.json, report.html, plots/.
        """
        model, payload = load_detector(run_dir)
        names = payload["class_names"]
        records, _ = read_boxes(data, names)
        if not records:
            raise BoxFormatError(f"{data}: no annotated images")
        x = load_record_images(records, payload["image_size"])
        labels = [image_class(r, names) for r in records]
        metrics, preds, targets, ips = evaluate_records(model, records, x, names, labels, payload["score_threshold"])
        out = Path(out) if out else Path(run_dir) / "evaluations" / Path(data).stem
        ev = RunFolder(out).create()
        ev.write_metrics({"task": self.name, "run": str(run_dir), "data": str(data), "images_per_second": round(ips, 1),
                          "test": metrics})
        write_detection_report(ev, f"defectscope evaluate: {Path(run_dir).name} on {Path(data).name}", metrics,
                               {"run": str(run_dir), "data": str(data), "images": len(records)}, records, preds, targets,
                               names, payload["score_threshold"])
        return metrics

    def predict(self, run_dir: Path, inputs: list[Path], out: Path, save_images: bool = False,
                score_threshold: float | None = None, **options) -> dict:
        """Detect defects in image files (folders are expanded); unreadable files are skipped and reported.

        Writes ``out`` (default ``boxes.json``) as COCO JSON: ``images`` (full paths, own sizes),
        ``categories`` and ``annotations`` with ``bbox`` = ``[x, y, w, h]`` pixels of the image's
        own size and a ``score``; only detections with ``score >= score_threshold`` (default: the
        run's). ``info`` lists skipped files. With ``save_images``, images with the boxes drawn go
        to ``<out without suffix>_images/``.

        Raises:
            ConfigError: an option this task does not support.
            RunError: no usable ``model.ckpt`` in ``run_dir``.
            FileNotFoundError: an input path does not exist.
        """
        self.check_predict_options(options)
        model, payload = load_detector(run_dir)
        names, size = payload["class_names"], payload["image_size"]
        thr = payload["score_threshold"] if score_threshold is None else score_threshold
        files = expand_inputs(inputs)
        records, arrays, skipped, originals = [], [], [], []
        for f, img, err in iter_images(files):
            if err:
                skipped.append((f, err))
                continue
            arrays.append(resize_uint8(img, size).transpose(2, 0, 1))
            records.append(ImageBoxes(Path(f).resolve(), img.shape[1], img.shape[0], np.zeros((0, 4)), []))
            if save_images:
                originals.append(img)
        dets = to_pixels(predict_normalised(model, np.stack(arrays)), records) if arrays else []
        for r, d in zip(records, dets):
            keep = d["scores"] >= thr
            order = np.argsort(-d["scores"][keep], kind="stable")
            r.boxes = d["boxes"][keep][order]
            r.labels = [names[int(i)] for i in d["labels"][keep][order]]
            r.scores = d["scores"][keep][order]
        info = {"description": f"defectscope predict with {run_dir}", "score_threshold": thr,
                "skipped": [{"file": str(f), "error": e} for f, e in skipped]}
        write_coco(out, records, names, info=info)
        if save_images:
            folder = Path(out).with_suffix("")
            folder = folder.parent / f"{folder.name}_images"
            folder.mkdir(parents=True, exist_ok=True)
            for r, img in zip(records, originals):
                with atomic_path(folder / f"{Path(r.image).stem}.png") as tmp:
                    draw_boxes_pil(img, r.boxes, r.labels, r.scores).save(tmp, format="PNG")
        return {"predicted": len(records), "skipped": skipped, "out": str(out),
                "boxes": int(sum(len(r.labels) for r in records))}


register_task(DetectionTask())
