"""Lightning wrapper of the box models (slot heads of paper 002, ours, and the FCOS reference).

Also the training-only data helpers of these models: box targets of flipped images, the dataset
of images or cached backbone features (frozen backbone, paper 002 section III-E), the feature
cache itself and the single-defect targets of section III-C.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch

from torch import nn
from torch.utils.data import Dataset

from defectscope.evaluation.detection import coco_map
from defectscope.machine import autocast, compact_features
from defectscope.models.box_heads.losses import SetCriterion, padded_slot_loss, single_loss
from defectscope.models.training import to_float, warmup_cosine

# ---------------------------------------------------------------------------------------------- data


def flip_target(t: dict, hflip: bool, vflip: bool) -> dict:
    """Normalised xyxy boxes ``[M, 4]`` of an image flipped left-right and/or up-down (labels unchanged)."""
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
        targets: normalised targets per item (``boxes [M, 4]`` xyxy in [0, 1], ``labels [M]``).
        augment: draw a random flip variant per item (images are flipped here, features are looked up).
    """

    def __init__(self, inputs: torch.Tensor | list[list[torch.Tensor]], targets: list[dict], augment: bool) -> None:
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
    """Stack inputs (images ``[B, 3, S, S]`` or each feature level ``[B, D, h, w]``), keep targets as a list."""
    xs, ts = zip(*batch)
    if isinstance(xs[0], tuple):
        return tuple(torch.stack(level) for level in zip(*xs)), list(ts)
    return torch.stack(xs), list(ts)


@torch.no_grad()
def cache_features(model: nn.Module, x: np.ndarray, variants: tuple[int, ...], batch_size: int = 64,
                   precision: str = "auto", channels_last: bool = True) -> list[list[torch.Tensor]]:
    """Backbone feature maps of uint8 images ``[N, 3, S, S]`` for each flip variant.

    Paper 002, section III-E: the (frozen) backbone runs once per image and variant, and only
    the head is trained on the stored features.

    Args:
        precision: the recipe's ``train.precision``; bf16 autocast only where
            :func:`defectscope.machine.use_bf16` says this CPU computes it natively.

    Returns:
        Per variant, the list of feature levels, each a bf16 tensor ``[N, D, h, w]`` (bf16 storage
        halves the memory; NEU-DET's 1296 training images x 4 variants take about 0.6 GB with
        EfficientNet-Lite0's last map at 200 px; the head reads them back as fp32).
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
            with autocast(precision):
                parts.append([compact_features(f) for f in model.forward_features(b)])
        out.append([torch.cat(level) for level in zip(*parts)])
    return out


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


# ------------------------------------------------------------------------------------------- training


class DetectionModule(L.LightningModule):
    """Lightning wrapper of a box model: loss per ``loss`` kind, AdamW + warm-up/cosine, val mAP@0.5.

    Checkpoints are selected on ``val/map_50`` (COCO mAP at IoU 0.5 of the validation images, max).

    Args:
        model: :class:`~defectscope.models.box_heads.SlotDetector` or :class:`~defectscope.models.box_heads.LiteFCOS`.
        loss: ``single`` (paper 002, III-C), ``padded`` (III-D), ``hungarian`` (ours) or ``fcos``.
        lr, weight_decay: AdamW settings.
        features: inputs are cached backbone features (frozen backbone) instead of uint8 images.
        channels_last: NHWC layout for images and convolutions.
        box_weight: weight of the MSE box term (``single``, ``padded``).
        w_class, w_l1, w_giou, eos_coef: Hungarian matching cost / loss weights and the
            "no defect" class weight (``hungarian``).
        backbone_lr_factor: learning-rate factor of the backbone parameters.
        grad_clip: gradient norm clipping (0: off).

    Batches: ``(x, targets)``: ``x`` uint8 ``[B, 3, S, S]`` (or a tuple of feature levels
    ``[B, D, h, w]`` with ``features``), ``targets`` a list of ``{"boxes": [M, 4] normalised xyxy,
    "labels": [M] long}``.

    Raises:
        ValueError: unknown ``loss``.
    """

    monitor, mode = "val/map_50", "max"

    def __init__(self, model: nn.Module, loss: str, lr: float, weight_decay: float, features: bool,
                 channels_last: bool, box_weight: float = 5.0, w_class: float = 1.0, w_l1: float = 5.0,
                 w_giou: float = 2.0, eos_coef: float = 0.1, backbone_lr_factor: float = 1.0,
                 grad_clip: float = 1.0) -> None:
        super().__init__()
        if loss not in ("single", "padded", "hungarian", "fcos"):
            raise ValueError(f"loss must be 'single', 'padded', 'hungarian' or 'fcos', got {loss!r}")
        self.model, self.loss_kind = model, loss
        self.lr, self.weight_decay = lr, weight_decay
        self.features, self.channels_last = features, channels_last
        self.box_weight, self.backbone_lr_factor, self.grad_clip = box_weight, backbone_lr_factor, grad_clip
        self.criterion = SetCriterion(model.num_classes, w_class, w_l1, w_giou, eos_coef) if loss == "hungarian" else None
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if features:
            self.model.backbone.requires_grad_(False)
        self._val_preds: list[dict] = []
        self._val_targets: list[dict] = []

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        x = to_float(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _outputs(self, x) -> dict:
        if self.features:
            return self.model.forward_head([f.float() for f in x])
        return self.model(self._images(x))

    def compute_loss(self, x, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        """Loss of one batch (inputs as the dataset gives them, normalised targets); ``(loss, parts)``."""
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
            return single_loss(out["logits"][:, 0], out["boxes"][:, 0], lab.to(dev), box.to(dev), self.box_weight)
        if self.loss_kind == "padded":
            return padded_slot_loss(out["logits"], out["boxes"], targets, self.box_weight)
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
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], self.grad_clip)

    def configure_optimizers(self):
        backbone = self.model.backbone if hasattr(self.model, "backbone") else self.model.det.backbone
        bb_ids = {id(p) for p in backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in bb_ids]
        groups = [{"params": head, "lr": self.lr}]
        bb = [p for p in backbone.parameters() if p.requires_grad]
        if bb:
            groups.append({"params": bb, "lr": self.lr * self.backbone_lr_factor})
        opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        sched = warmup_cosine(opt, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
