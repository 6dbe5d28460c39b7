"""Defect localization task (paper 002): class + box heads on backbone features, and a reference detector.

Recipe (``task: detection``)::

    data:  {root: ../shared/datasets/neu-det, image_size: 200, test_fraction: 0.2, split_seed: 0}
    model: {name: slot_detector, loss: hungarian, head: attention, backbone: efficientnet_lite0, pretrained: true}
    train: {epochs: 60, batch_size: 32, lr: 3.0e-4}

Schema: :class:`defectscope.recipes.detection.DetectionRecipe`; report:
:mod:`defectscope.evaluation.detection_report`. This module holds the task's hooks and the
validation-split helpers of ``benchmarks/detection_nms.py``.

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

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from defectscope.config import ConfigError, resolve_path
from defectscope.data.boxes import BoxFormatError, ImageBoxes, image_class, load_record_images, read_boxes  # noqa: F401
from defectscope.engine.pipeline import Fitted, Predictions, Samples, TaskHooks
from defectscope.engine.run import RunError, RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import fit_lightning, resolved_precision, set_threads
from defectscope.evaluation.detection import detection_metrics, per_image_quality
from defectscope.evaluation.detection_report import write_detection_report  # noqa: F401 (re-exported)
from defectscope.models import create_model
from defectscope.models.box_heads.lightning_model import (  # noqa: F401  (flip_target, single_targets: re-exported)
    BoxDataset,
    DetectionModule,
    cache_features,
    collate,
    flip_target,
    single_targets,
)
from defectscope.models.box_heads.inference import detect_normalised
from defectscope.recipes.detection import DetectionData, DetectionRecipe


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


def predict_normalised(model: nn.Module, x: np.ndarray, batch_size: int = 32, nms_iou: float | None = None) -> list[dict]:
    """Detections of uint8 images ``[N, 3, S, S]`` (fp32): normalised xyxy ``boxes``, ``scores``, ``labels`` (NumPy).

    The method's one inference (:func:`~defectscope.models.box_heads.inference.detect_normalised`: the
    export-ready forward, then the NumPy selection), as ``predict``, the service and the ONNX graph run
    it; ``nms_iou`` overrides an ``fcos_lite`` model's NMS IoU threshold (the sweep).
    """
    return detect_normalised(model, x, batch_size, nms_iou)


def to_pixels(dets: list[dict], records: list[ImageBoxes]) -> list[dict]:
    """Normalised detections to each record's own pixel coordinates (numpy)."""
    out = []
    for d, r in zip(dets, records):
        scale = np.array([r.width, r.height, r.width, r.height], dtype=np.float64)
        out.append({"boxes": np.asarray(d["boxes"], np.float64).reshape(-1, 4) * scale,
                    "scores": np.asarray(d["scores"], np.float64).reshape(-1),
                    "labels": np.asarray(d["labels"]).reshape(-1)})
    return out


def targets_in_pixels(records: list[ImageBoxes], class_names: list[str]) -> list[dict]:
    """Ground truth per record: pixel xyxy ``boxes`` and class-index ``labels`` (numpy)."""
    return [{"boxes": r.boxes, "labels": np.array([class_names.index(n) for n in r.labels], dtype=np.int64)}
            for r in records]


def evaluate_records(model: nn.Module, records: list[ImageBoxes], x: np.ndarray, class_names: list[str],
                     image_labels: list[int], score_threshold: float, nms_iou: float | None = None
                     ) -> tuple[dict, list[dict], list[dict], float]:
    """Predict ``x`` and compute :func:`detection_metrics`; returns ``(metrics, preds, targets, images_per_second)``."""
    start = time.perf_counter()
    dets = predict_normalised(model, x, nms_iou=nms_iou)
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
    The model is not changed (the threshold is an argument of the selection).

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
    rows = []
    for thr in thresholds:
        row: dict = {"nms_threshold": float(thr)}
        for name in split_names:
            if name in splits.x:
                m, *_ = evaluate_records(model, splits.records[name], splits.x[name], splits.class_names,
                                         list(splits.image_labels[name]), score_threshold, nms_iou=float(thr))
                row[f"{name}_map_50"], row[f"{name}_map"] = m["map_50"], m["map"]
        rows.append(row)
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
        info = fit_lightning(module, train_loader, val_loader, t, run.path, self.monitor, DetectionModule.mode,
                             resume=run.resume)
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


register_task(DetectionTask())
