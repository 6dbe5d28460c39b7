"""Inference of the box models: the export-ready forward and the selection after it, once for every caller.

The pipeline's test predictions, the NMS sweep, ``defectscope predict`` / ``evaluate``, the service,
``inspect`` and the ONNX graph all run :func:`box_inference`'s module and :func:`select_detections`.

**Where the decoding and the NMS run**: the module (and the ONNX graph) ends *before* any
data-dependent selection: ``image`` float32 ``[B, 3, S, S]`` RGB in [0, 1] -> ``boxes [B, N, 4]``
(normalised xyxy) and ``class_scores [B, N, L]``. Thresholding, top-k, non-maximum suppression and
the final cut run in NumPy (:func:`fcos_select`, :func:`nms`, :func:`slot_select`), so the graph has a
fixed output shape and needs no ``NonMaxSuppression`` operator.

``fcos_lite`` (torchvision FCOS, Tian et al. 2019): ``N`` = every location of the 5 pyramid levels,
boxes decoded by torchvision's ``BoxLinearCoder`` and clipped, ``class_scores`` =
``sqrt(sigmoid(class logit) * sigmoid(centre-ness))`` over torchvision's ``C + 1`` labels (column 0
is its background label); the selection is exactly ``FCOS.postprocess_detections``.
``slot_detector`` (paper 002): ``N`` = the ``K`` slots, ``class_scores`` = softmax over the defect
classes; every slot with its best class, no NMS.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.box_heads.losses import cxcywh_to_xyxy


class FCOSInference(nn.Module):
    """torchvision FCOS of :class:`~defectscope.models.box_heads.fcos.LiteFCOS` up to (not including) the
    selection: ``image [B, 3, S, S]`` -> ``(boxes [B, A, 4] normalised xyxy, class_scores [B, A, C + 1])``.

    Reproduces ``GeneralizedRCNNTransform`` for inputs already at the model's size (normalise; the
    resize to ``S`` is then the identity; zero padding to a multiple of ``size_divisible``).

    Attributes:
        level_sizes: locations per pyramid level, in order (the split :func:`fcos_select` needs).
    """

    def __init__(self, model: nn.Module, size: int) -> None:
        super().__init__()
        from torchvision.models.detection.image_list import ImageList

        det = model.det
        self.backbone, self.head, self.coder = det.backbone, det.head, det.box_coder
        if hasattr(self.backbone, "channels_last"):
            self.backbone.channels_last = False  # memory layout only; NCHW traces to plain Conv nodes
        self.size = int(size)
        div = int(det.transform.size_divisible)
        self.padded = int(math.ceil(self.size / div) * div)
        self.register_buffer("mean", torch.tensor(det.transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(det.transform.image_std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():  # batch 2: GroupNorm refuses a 1 x 1 top level at batch 1 (sides <= 128 px)
            x = torch.zeros(2, 3, self.padded, self.padded)
            feats = list(self.backbone(x).values())
            anchors = det.anchor_generator(ImageList(x, [(self.size, self.size)] * 2), feats)[0]
        self.level_sizes = [int(f.shape[2] * f.shape[3]) for f in feats]
        self.register_buffer("anchors", anchors.float(), persistent=False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (image - self.mean) / self.std
        pad = self.padded - self.size
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        out = self.head(list(self.backbone(x).values()))
        boxes = self.coder.decode(out["bbox_regression"], self.anchors).clamp(0, self.size) / self.size
        scores = torch.sqrt(torch.sigmoid(out["cls_logits"]) * torch.sigmoid(out["bbox_ctrness"]))
        return boxes, scores


class SlotInference(nn.Module):
    """:class:`~defectscope.models.box_heads.SlotDetector` -> ``(boxes [B, K, 4] normalised xyxy in [0, 1],
    class_scores [B, K, C])`` (softmax; the "no defect" class of ``mode="slots"`` dropped after it)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.slots = model.mode == "slots"

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.forward_head(self.model.forward_features(image))
        prob = out["logits"].float().softmax(-1)
        if self.slots:
            prob = prob[..., :-1]
        return cxcywh_to_xyxy(out["boxes"].float()).clamp(0, 1), prob


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``[N, M]`` of ``xyxy`` boxes ``a [N, 4]`` and ``b [M, 4]`` (float64; 0 where a union is 0)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-wise greedy non-maximum suppression (``torchvision.ops.batched_nms`` semantics).

    Within each class, boxes are taken in decreasing score order and every later box whose IoU with a
    kept one is **greater than** ``iou_threshold`` is dropped.

    Args:
        boxes: ``[N, 4]`` xyxy. scores: ``[N]``. labels: ``[N]`` class of each box.
        iou_threshold: IoU above which the lower-scored box is suppressed.

    Returns:
        Indices of the kept boxes ``[M]`` (int64), in decreasing score order.
    """
    boxes, scores, labels = np.asarray(boxes, np.float64), np.asarray(scores, np.float64), np.asarray(labels)
    keep: list[int] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        iou = box_iou(boxes[idx], boxes[idx])
        alive = np.ones(len(idx), bool)
        for i in range(len(idx)):
            if alive[i]:
                keep.append(int(idx[i]))
                alive[i + 1 :] &= iou[i, i + 1 :] <= iou_threshold
    keep_arr = np.asarray(keep, np.int64)
    return keep_arr[np.argsort(-scores[keep_arr], kind="stable")] if len(keep_arr) else keep_arr


def fcos_select(boxes: np.ndarray, scores: np.ndarray, level_sizes: list[int], score_thresh: float, topk: int,
                iou_threshold: float, max_detections: int, background: int | None = 0) -> dict[str, np.ndarray]:
    """torchvision ``FCOS.postprocess_detections`` for one image, in NumPy.

    Args:
        boxes: ``[A, 4]`` decoded boxes of every location. scores: ``[A, L]`` per-label scores.
        level_sizes: locations per pyramid level (``sum = A``).
        score_thresh: candidate threshold (strictly greater). topk: candidates kept per level.
        iou_threshold: class-wise NMS IoU. max_detections: detections kept after NMS.
        background: label index dropped at the end and subtracted from the others (torchvision's 0),
            ``None`` to keep every label.

    Returns:
        ``{"boxes" [M, 4], "scores" [M], "labels" [M]}``, decreasing score.

    Raises:
        ValueError: ``level_sizes`` does not add up to ``A``.
    """
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    if sum(level_sizes) != len(boxes) or len(scores) != len(boxes):
        raise ValueError(f"fcos_select: level sizes {level_sizes} (sum {sum(level_sizes)}) do not fit "
                         f"{len(boxes)} boxes and {len(scores)} score rows")
    n_labels = scores.shape[1]
    bs, ss, ls = [], [], []
    start = 0
    for n in level_sizes:
        flat = scores[start : start + n].reshape(-1)
        cand = np.flatnonzero(flat > score_thresh)
        order = np.argsort(-flat[cand], kind="stable")[: min(topk, len(cand))]
        idx = cand[order]
        bs.append(boxes[start + idx // n_labels])
        ss.append(flat[idx])
        ls.append(idx % n_labels)
        start += n
    b, s, lab = np.concatenate(bs), np.concatenate(ss), np.concatenate(ls)
    keep = nms(b, s, lab, iou_threshold)[:max_detections]
    b, s, lab = b[keep], s[keep], lab[keep]
    if background is not None:
        fg = lab != background
        b, s, lab = b[fg], s[fg], np.where(lab[fg] > background, lab[fg] - 1, lab[fg])
    return {"boxes": b.reshape(-1, 4), "scores": s, "labels": lab.astype(np.int64)}


def slot_select(boxes: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """Every slot with its best class (:meth:`SlotDetector.postprocess`): ``boxes [K, 4]``, ``scores [K]``,
    ``labels [K]``, in decreasing score order."""
    scores = np.asarray(scores)
    lab, s = scores.argmax(-1), scores.max(-1)
    order = np.argsort(-s, kind="stable")
    return {"boxes": np.asarray(boxes).reshape(-1, 4)[order], "scores": s[order], "labels": lab[order].astype(np.int64)}


def box_inference(model: nn.Module, size: int) -> tuple[nn.Module, dict]:
    """The export-ready module of a trained box model and the settings :func:`select_detections` needs.

    Args:
        model: a :class:`~defectscope.models.box_heads.LiteFCOS` (``fcos_lite``) or
            :class:`~defectscope.models.box_heads.SlotDetector` (``slot_detector``), eval mode.
        size: the input side ``S`` in pixels.

    Returns:
        ``(module, settings)``; ``settings["decoder"]`` is ``fcos`` or ``slots``; ``fcos`` settings carry
        ``level_sizes``, ``candidate_threshold``, ``topk_candidates``, ``detections_per_img``,
        ``background_label`` and ``nms_iou`` (the model's NMS IoU threshold).

    Raises:
        ValueError: another kind of model.
    """
    det = getattr(model, "det", None)
    if det is not None and hasattr(det, "nms_thresh"):
        module = FCOSInference(model, size)
        return module.eval(), {"decoder": "fcos", "level_sizes": module.level_sizes,
                               "candidate_threshold": float(det.score_thresh), "topk_candidates": int(det.topk_candidates),
                               "detections_per_img": int(det.detections_per_img), "background_label": 0,
                               "nms_iou": float(det.nms_thresh)}
    if hasattr(model, "forward_head") and hasattr(model, "mode"):
        return SlotInference(model).eval(), {"decoder": "slots", "mode": model.mode, "slots": int(model.num_slots)}
    raise ValueError(f"{type(model).__name__}: not a box model with a known decoder (fcos_lite, slot_detector)")


def select_detections(settings: dict, boxes: np.ndarray, scores: np.ndarray, nms_iou: float | None = None
                      ) -> dict[str, np.ndarray]:
    """All detections of one image (normalised ``boxes [M, 4]``, ``scores [M]``, 0-based ``labels [M]``, best
    first), before any score threshold: :func:`fcos_select` or :func:`slot_select` of the module's outputs.

    Args:
        settings: from :func:`box_inference` (or an export's metadata).
        nms_iou: override the NMS IoU threshold (``None``: ``settings["nms_iou"]``; the sweep tries others).
    """
    if settings.get("decoder") == "fcos":
        return fcos_select(boxes, scores, settings["level_sizes"], settings["candidate_threshold"],
                           settings["topk_candidates"], settings["nms_iou"] if nms_iou is None else nms_iou,
                           settings["detections_per_img"], settings.get("background_label", 0))
    return slot_select(boxes, scores)


@torch.no_grad()
def detect_normalised(model: nn.Module, x: np.ndarray, batch_size: int = 32, nms_iou: float | None = None,
                      inference: tuple[nn.Module, dict] | None = None) -> list[dict[str, np.ndarray]]:
    """Detections of uint8 images ``[N, 3, S, S]`` (fp32): :func:`select_detections` of :func:`box_inference`.

    Returns:
        one ``{"boxes" [M, 4] normalised xyxy, "scores" [M], "labels" [M]}`` (NumPy) per image.
    """
    module, settings = inference or box_inference(model.eval(), int(x.shape[-1]))
    xt = torch.from_numpy(np.ascontiguousarray(x))
    out: list[dict] = []
    for i in range(0, len(xt), batch_size):
        b, s = module(xt[i : i + batch_size].float() / 255.0)
        out += [select_detections(settings, bb, ss, nms_iou) for bb, ss in zip(b.float().numpy(), s.float().numpy())]
    return out
