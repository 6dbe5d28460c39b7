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

Protocol: stratified split on the image's class (the NEU file-name prefix), ``test_fraction``
held out with ``split_seed`` and used once after training; ``train.val_fraction`` of the rest
selects the checkpoint by validation mAP@0.5 (and stops early). Images are resized to
``image_size``; boxes are kept in normalised coordinates and mapped back to each image's own
pixels for the metrics and for ``predict``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from defectscope.config import BaseRecipe, ConfigError, StrictModel
from defectscope.data.boxes import BoxFormatError, ImageBoxes, image_class, read_boxes, write_coco
from defectscope.data.images import iter_images, load_image, resize_uint8
from defectscope.data.splits import stratified_split, write_file_list
from defectscope.engine.classification import expand_inputs, to_float, warmup_cosine
from defectscope.engine.run import RunFolder
from defectscope.engine.tasks import register_task
from defectscope.engine.trainer import build_trainer, report_training_curves, set_threads
from defectscope.evaluation.detection import coco_map, detection_metrics, per_image_quality
from defectscope.evaluation.detection_plots import draw_boxes_pil, plot_box_cases
from defectscope.evaluation.report import Report
from defectscope.models import create_model
from defectscope.models.box_heads.losses import SetCriterion, padded_slot_loss, single_loss
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
    """Recipe of the ``detection`` task."""

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


def prepare_box_splits(data: DetectionData, val_fraction: float, run: RunFolder | None,
                       class_names: list[str] | None = None) -> BoxSplits:
    """Read the annotations, subset, split (test, then val from train), write file lists, decode images.

    Raises:
        DatasetError / BoxFormatError / ImageReadError: bad annotations or images (named).
    """
    from defectscope.config import resolve_path

    records, names = read_boxes(resolve_path(data.root), class_names, data.missing)
    if not records:
        raise BoxFormatError(f"{data.root}: no annotated images")
    labels = np.array([image_class(r, names) for r in records])
    if data.max_per_class:
        rng = np.random.default_rng(data.split_seed)
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: data.max_per_class]
                                       for c in range(len(names))]))
        records, labels = [records[i] for i in keep], labels[keep]
    trainval, test = stratified_split(labels, data.test_fraction, data.split_seed)
    parts = {"test": test}
    if val_fraction > 0:
        tr, va = stratified_split(labels[trainval], val_fraction, data.split_seed)
        parts["train"], parts["val"] = trainval[tr], trainval[va]
    else:
        parts["train"] = trainval
    recs = {k: [records[i] for i in v] for k, v in parts.items()}
    if run is not None:
        for k, v in parts.items():
            write_file_list(run.split_dir / f"{k}.txt", [r.image for r in recs[k]], [names[c] for c in labels[v]])
    return BoxSplits(names, recs, {k: load_record_images(v, data.image_size) for k, v in recs.items()},
                     {k: [to_target(r, names) for r in v] for k, v in recs.items()},
                     {k: labels[v] for k, v in parts.items()})


def flip_target(t: dict, hflip: bool, vflip: bool) -> dict:
    """Normalised xyxy boxes of an image flipped left-right and/or up-down."""
    b = t["boxes"].clone()
    if hflip:
        b[:, [0, 2]] = 1 - t["boxes"][:, [2, 0]]
    if vflip:
        b[:, [1, 3]] = 1 - b[:, [3, 1]]
    return {"boxes": b, "labels": t["labels"]}


def flip_images(x: torch.Tensor, variant: int) -> torch.Tensor:
    """Flip variant ``0..3`` (bit 0: left-right, bit 1: up-down) of ``[..., H, W]``."""
    if variant & 1:
        x = x.flip(-1)
    if variant & 2:
        x = x.flip(-2)
    return x


class BoxDataset(Dataset):
    """Images (uint8 ``[N, 3, S, S]``) or cached feature variants with their targets.

    Args:
        inputs: uint8 images ``[N, 3, S, S]``, or cached features: per flip variant (1 or 4) a list of
            feature levels ``[N, D, h, w]`` (as :func:`cache_features` returns them).
        targets: normalised targets per item.
        augment: draw a random flip variant per item (images are flipped here, features are looked up).
    """

    def __init__(self, inputs: torch.Tensor | list[torch.Tensor], targets: list[dict], augment: bool) -> None:
        self.inputs, self.targets, self.augment = inputs, targets, augment

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        v = int(torch.randint(0, 4, ()).item()) if self.augment else 0
        if isinstance(self.inputs, list):
            x = tuple(level[i] for level in self.inputs[v])
        else:
            x = flip_images(self.inputs[i], v)
        return x, flip_target(self.targets[i], bool(v & 1), bool(v & 2))


def collate(batch):
    """Stack inputs, keep targets as a list."""
    xs, ts = zip(*batch)
    if isinstance(xs[0], tuple):
        return tuple(torch.stack(level) for level in zip(*xs)), list(ts)
    return torch.stack(xs), list(ts)


@torch.no_grad()
def cache_features(model: nn.Module, x: np.ndarray, variants: tuple[int, ...], batch_size: int = 64,
                   bf16: bool = True, channels_last: bool = True) -> list[list[torch.Tensor]]:
    """Backbone feature maps of uint8 images ``[N, 3, S, S]`` for each flip variant.

    Returns:
        Per variant, the list of feature levels, each a bf16 tensor ``[N, D, h, w]`` (bf16 storage
        halves the memory; NEU-DET's 1296 training images x 4 variants take about 0.6 GB with
        EfficientNet-Lite0's last map at 200 px).
    """
    model.eval()
    xt = torch.from_numpy(x)
    out = []
    for v in variants:
        parts = []
        for i in range(0, len(xt), batch_size):
            b = flip_images(to_float(xt[i : i + batch_size]), v)
            if channels_last:
                b = b.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                parts.append([f.to(torch.bfloat16).contiguous() for f in model.forward_features(b)])
        out.append([torch.cat(level) for level in zip(*parts)])
    return out


# ------------------------------------------------------------------------------------------- training


class DetectionModule(L.LightningModule):
    """Lightning wrapper of a box model: loss per ``loss`` kind, AdamW + warm-up/cosine, val mAP@0.5.

    Args:
        model: :class:`~defectscope.models.box_heads.SlotDetector` or :class:`~defectscope.models.box_heads.LiteFCOS`.
        loss: ``single``, ``padded``, ``hungarian`` or ``fcos``.
        cfg: the model section (loss weights, lr factor, clipping).
        lr, weight_decay: AdamW settings.
        features: inputs are cached backbone features (frozen backbone) instead of uint8 images.
        channels_last: NHWC layout for images and convolutions.
    """

    def __init__(self, model: nn.Module, loss: str, cfg: DetectionModelConfig, lr: float, weight_decay: float,
                 features: bool, channels_last: bool) -> None:
        super().__init__()
        self.model, self.loss_kind, self.cfg = model, loss, cfg
        self.lr, self.weight_decay = lr, weight_decay
        self.features, self.channels_last = features, channels_last
        self.criterion = SetCriterion(model.num_classes, cfg.w_class, cfg.w_l1, cfg.w_giou, cfg.eos_coef) \
            if loss == "hungarian" else None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if features:
            self.model.backbone.requires_grad_(False)
        self._val_preds: list[dict] = []
        self._val_targets: list[dict] = []

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _outputs(self, x: torch.Tensor) -> dict:
        if self.features:
            return self.model.forward_head([f.float() for f in x])
        return self.model(self._images(x))

    def compute_loss(self, x: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        """Loss of one batch (inputs as the dataset gives them, normalised targets)."""
        if self.loss_kind == "fcos":
            s = x.shape[-1]
            imgs = list(self._images(x))
            tt = [{"boxes": t["boxes"] * s, "labels": t["labels"]} for t in targets]
            parts = self.model(imgs, tt)
            return sum(parts.values()), {k: v.detach() for k, v in parts.items()}
        out = self._outputs(x)
        if self.loss_kind == "single":
            lab, box = single_targets(targets)
            dev = out["logits"].device
            return single_loss(out["logits"][:, 0], out["boxes"][:, 0], lab.to(dev), box.to(dev), self.cfg.box_weight)
        if self.loss_kind == "padded":
            return padded_slot_loss(out["logits"], out["boxes"], targets, self.cfg.box_weight)
        loss, parts = self.criterion(out["logits"], out["boxes"], targets)
        for logits, boxes in out.get("aux", []):  # auxiliary decoder outputs, same set loss
            loss = loss + self.criterion(logits, boxes, targets)[0]
        return loss, parts

    def training_step(self, batch, batch_idx):
        x, targets = batch
        loss, parts = self.compute_loss(x, targets)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets))
        for k, v in parts.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch, batch_idx):
        x, targets = batch
        if self.loss_kind == "fcos":
            dets = self.model.detect(self._images(x))
        else:
            dets = self.model.postprocess(self._outputs(x))
        self._val_preds += [{k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in dets]
        self._val_targets += targets

    def on_validation_epoch_end(self):
        if self._val_preds:
            m = coco_map(self._val_preds, self._val_targets, self.model.num_classes)
            self.log("val/map_50", float(m["map_50"] or 0.0), prog_bar=True)
            self.log("val/map", float(m["map"] or 0.0))
        self._val_preds, self._val_targets = [], []

    def on_before_optimizer_step(self, optimizer):
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.cfg.grad_clip)

    def configure_optimizers(self):
        backbone = self.model.backbone if hasattr(self.model, "backbone") else self.model.det.backbone
        bb_ids = {id(p) for p in backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in bb_ids]
        groups = [{"params": head, "lr": self.lr}]
        bb = [p for p in backbone.parameters() if p.requires_grad]
        if bb:
            groups.append({"params": bb, "lr": self.lr * self.cfg.backbone_lr_factor})
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def single_targets(targets: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Section III-C targets: per image the largest box (first on ties) and its class.

    Returns:
        ``(labels [B], boxes [B, 4])`` normalised xyxy.

    Raises:
        ValueError: an image without boxes.
    """
    labels, boxes = [], []
    for i, t in enumerate(targets):
        if len(t["labels"]) == 0:
            raise ValueError(f"image {i} of the batch has no box; the single-defect model needs one per image")
        b = t["boxes"]
        j = int(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).argmax())
        labels.append(t["labels"][j])
        boxes.append(b[j])
    return torch.stack(labels), torch.stack(boxes)


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
        RunError: missing or foreign checkpoint.
    """
    payload = RunFolder(run_dir).load_model_payload()
    model = create_model(payload["model_name"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


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
        splits: from :func:`prepare_box_splits` with the run's split settings.
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
    """Report: metrics, per-class AP, best and worst held-out images with true (green) and predicted (red) boxes."""
    rep = Report(title)
    rep.kv("Run", info)
    rep.kv("Test metrics", {k: metrics[k] for k in ("n", "n_boxes", "map_50", "map", "map_75", "mar_100", "accuracy",
                                                      "box_mse", "box_mae", "mean_matched_iou", "box_pairs", "box_unmatched")})
    rep.table("Per class AP (COCO, pycocotools)",
              [{"class": n, "AP@0.5": metrics["per_class_ap50"][n], "AP@[.5:.95]": metrics["per_class_ap"][n]}
               for n in class_names], ["class", "AP@0.5", "AP@[.5:.95]"])
    rep.text("box_mse / box_mae: normalised xyxy coordinates; each true box is paired one-to-one with a detection "
             f"of score >= {score_threshold} by maximum total IoU (unpaired true boxes: box_unmatched).")
    quality = np.array([per_image_quality(p, t, score_threshold) for p, t in zip(preds, targets)])
    order = np.argsort(-quality, kind="stable")
    k = min(cases, len(order))
    for name, idx in (("best", order[:k]), ("worst", order[::-1][:k])):
        imgs = [load_image(records[i].image) for i in idx]
        titles = [f"{Path(records[i].image).name}  q={quality[i]:.2f}" for i in idx]
        plot_box_cases(imgs, [preds[i] for i in idx], [targets[i] for i in idx], class_names, titles,
                       run.plots / f"{prefix}{name}_cases.png", score_threshold,
                       suptitle=f"{name} {k} held-out images (green: true, red dashed: predicted, score >= {score_threshold})")
        rep.image(f"plots/{prefix}{name}_cases.png",
                  f"The {k} {name} held-out images by q = mean IoU of same-class one-to-one pairs "
                  f"(misses and extra detections count 0)")
    report_training_curves(rep, run, "Training losses and validation mAP per epoch")
    rep.write(run.report_path)


class DetectionTask:
    """The ``detection`` task (registered as such)."""

    name = "detection"
    recipe = DetectionRecipe

    def fit(self, recipe: DetectionRecipe, run_dir: Path, source: Path | None = None) -> dict | None:
        t, m = recipe.train, recipe.model
        set_threads(t)
        L.seed_everything(recipe.seed, workers=True, verbose=False)
        run = RunFolder(run_dir).create()
        splits = prepare_box_splits(recipe.data, t.val_fraction, run)
        c = len(splits.class_names)
        most = max(len(tt["labels"]) for tt in splits.targets["train"])
        k = m.num_slots or most
        if m.name == "slot_detector" and m.loss != "single" and k < most:
            raise ConfigError(f"model.num_slots={k} is fewer than the {most} boxes of one training image")
        kwargs = model_kwargs_from(recipe, c, k)
        model = create_model(m.name, **kwargs, pretrained=m.pretrained, weights=m.weights)
        weights_source = model.weights_source if m.name == "fcos_lite" else model.backbone.weights_source
        loss = "fcos" if m.name == "fcos_lite" else m.loss
        frozen = m.freeze_backbone
        start = time.perf_counter()
        bf16 = True  # the feature cache is always computed with bf16 autocast (1.8x faster here)
        if frozen:
            if t.channels_last:
                model.to(memory_format=torch.channels_last)
            train_in: torch.Tensor | list = cache_features(model, splits.x["train"], (0, 1, 2, 3) if t.augment else (0,),
                                                           bf16=bf16, channels_last=t.channels_last)
            val_in = cache_features(model, splits.x["val"], (0,), bf16=bf16, channels_last=t.channels_last) \
                if "val" in splits.x else None
        else:
            train_in = torch.from_numpy(splits.x["train"])
            val_in = torch.from_numpy(splits.x["val"]) if "val" in splits.x else None
        cache_seconds = time.perf_counter() - start
        model.train()
        module = DetectionModule(model, loss, m, t.lr, t.weight_decay, frozen, t.channels_last)
        n_train = len(splits.targets["train"])
        train_loader = DataLoader(BoxDataset(train_in, splits.targets["train"], t.augment), batch_size=t.batch_size,
                                  shuffle=True, num_workers=0, collate_fn=collate, drop_last=n_train > t.batch_size)
        val_loader = DataLoader(BoxDataset(val_in, splits.targets["val"], False), batch_size=max(32, t.batch_size),
                                shuffle=False, num_workers=0, collate_fn=collate) if val_in is not None else None
        trainer = build_trainer(t, run.path, "val/map_50" if val_loader is not None else None)
        trainer.fit(module, train_loader, val_loader)
        train_seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return None
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if val_loader is not None else ""
        if best:
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        model = module.model.to(memory_format=torch.contiguous_format).float().eval()
        metrics, preds, targets, ips = evaluate_records(model, splits.records["test"], splits.x["test"],
                                                        splits.class_names, list(splits.image_labels["test"]),
                                                        m.score_threshold)
        run.save_model(self.name, m.name, kwargs, model.state_dict(), class_names=splits.class_names,
                       image_size=recipe.data.image_size, score_threshold=m.score_threshold, loss=loss,
                       normalisation="inside model: input RGB in [0, 1]", weights_source=weights_source,
                       box_format="normalised xyxy inside the model; COCO [x, y, w, h] pixels in files")
        epochs = int(trainer.current_epoch)
        result = {
            "task": self.name, "model": m.name, "loss": loss, "head": m.head if m.name == "slot_detector" else "fcos",
            "backbone": m.backbone, "weights": weights_source, "freeze_backbone": frozen, "num_slots": k,
            "seed": recipe.seed,
            "split": {"seed": recipe.data.split_seed, "test_fraction": recipe.data.test_fraction,
                      "stratified_on": "image class (file-name prefix)",
                      **{s: int(len(v)) for s, v in splits.targets.items()}},
            "epochs_run": epochs, "best_checkpoint": Path(best).name if best else "last",
            "train_seconds": round(train_seconds, 1), "feature_cache_seconds": round(cache_seconds, 1),
            "train_images_per_second": round(n_train * max(1, epochs) / max(1e-9, train_seconds - cache_seconds), 1),
            "test_images_per_second": round(ips, 1), "precision": t.precision, "channels_last": t.channels_last,
            "threads": torch.get_num_threads(),
            "test": metrics,
        }
        run.write_metrics(result)
        info = {"data": recipe.data.root, "model": m.name, "loss": loss, "head": result["head"], "backbone": m.backbone,
                "weights": weights_source, "frozen backbone": frozen, "slots K": k,
                "split": f"stratified {1 - recipe.data.test_fraction:.0%}/{recipe.data.test_fraction:.0%}, seed {recipe.data.split_seed}",
                "train / val / test images": " / ".join(str(len(splits.targets.get(s, []))) for s in ("train", "val", "test")),
                "epochs run": epochs, "train seconds": round(train_seconds, 1),
                "test images/s (fp32, batch 32)": round(ips, 1)}
        write_detection_report(run, f"defectscope {self.name}: {m.name} ({loss}) on {Path(recipe.data.root).name}",
                               metrics, info, splits.records["test"], preds, targets, splits.class_names, m.score_threshold)
        return result

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

        Writes ``out`` as COCO JSON: ``images`` (full paths, own sizes), ``categories`` and ``annotations``
        with ``bbox`` = ``[x, y, w, h]`` pixels of the image's own size and a ``score``; only
        detections with ``score >= score_threshold`` (default: the run's). ``info`` lists skipped files.
        With ``save_images``, images with the boxes drawn go to ``<out without suffix>_images/``.
        """
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
