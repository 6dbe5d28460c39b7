"""Detection metrics: the field's COCO mAP and the figures of paper 002 (accuracy, box MSE/MAE).

- ``map`` (AP averaged over IoU 0.50:0.05:0.95), ``map_50``, ``map_75``, ``mar_100``,
  ``per_class_ap`` and ``per_class_ap50``: torchmetrics' ``MeanAveragePrecision``
  with the ``pycocotools`` backend (the COCO reference implementation: 101-point
  interpolated precision, at most 100 detections per image). A class without any
  ground-truth box in the evaluated set gets ``None`` (COCO's -1).
- ``accuracy``: the image's class (see :func:`defectscope.data.boxes.image_class`)
  against the class of the image's highest-scoring detection (paper 002, section
  III-F, "accuracy"; for the single-defect model this is its class head).
- ``box_mse`` / ``box_mae``: mean squared / absolute error of ``xmin, ymin, xmax, ymax``
  in normalised coordinates (divided by width and height, so in [0, 1]) between each
  true box and the predicted box assigned to it. The assignment is one-to-one per
  image and maximises the total IoU (Hungarian, ``scipy.optimize.linear_sum_assignment``)
  over the predictions with ``score >= score_threshold`` (at least the top one); true
  boxes left without a partner are counted in ``box_unmatched`` and not in the errors.
  Paper 002 (section III-F) reports MSE/MAE of its box regression without saying how
  boxes are paired; this pairing makes the figure independent of slot order.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou


def _as_tensor(x, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def coco_map(preds: list[dict], targets: list[dict], num_classes: int) -> dict:
    """COCO mAP figures with torchmetrics (pycocotools backend).

    Args:
        preds: per image ``{"boxes": [N, 4] xyxy, "scores": [N], "labels": [N] int in 0..C-1}``.
        targets: per image ``{"boxes": [M, 4] xyxy, "labels": [M]}``; same coordinates as ``preds``.
        num_classes: ``C``; per-class lists have this length.

    Returns:
        ``map``, ``map_50``, ``map_75``, ``mar_100``, ``per_class_ap`` and ``per_class_ap50``
        (lists of ``C`` floats, ``None`` for a class absent from ``targets``).

    Raises:
        ValueError: ``preds`` and ``targets`` differ in length.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    p = [{"boxes": _as_tensor(d["boxes"]).reshape(-1, 4), "scores": _as_tensor(d["scores"]).reshape(-1),
          "labels": _as_tensor(d["labels"], torch.long).reshape(-1)} for d in preds]
    t = [{"boxes": _as_tensor(d["boxes"]).reshape(-1, 4), "labels": _as_tensor(d["labels"], torch.long).reshape(-1)}
         for d in targets]
    full = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
    full.update(p, t)
    r = full.compute()
    at50 = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], class_metrics=True,
                                backend="pycocotools")
    at50.update(p, t)
    r50 = at50.compute()

    def per_class(res: dict) -> list[float | None]:
        out: list[float | None] = [None] * num_classes
        classes = res["classes"].reshape(-1).tolist()
        values = res["map_per_class"].reshape(-1).tolist()
        for c, v in zip(classes, values):
            if 0 <= int(c) < num_classes:
                out[int(c)] = None if v < 0 else round(float(v), 6)
        return out

    def val(x: torch.Tensor) -> float | None:
        v = float(x)
        return None if v < 0 else round(v, 6)

    return {"map": val(r["map"]), "map_50": val(r["map_50"]), "map_75": val(r["map_75"]), "mar_100": val(r["mar_100"]),
            "per_class_ap": per_class(r), "per_class_ap50": per_class(r50)}


def match_boxes(pred_boxes: np.ndarray, true_boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairing of true and predicted boxes that maximises the total IoU.

    Args:
        pred_boxes: ``[N, 4]`` xyxy. true_boxes: ``[M, 4]`` xyxy (same units).

    Returns:
        ``(pred_idx, true_idx, iou)``: ``min(N, M)`` pairs and their IoU.
    """
    if len(pred_boxes) == 0 or len(true_boxes) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    iou = box_iou(_as_tensor(pred_boxes, torch.float64), _as_tensor(true_boxes, torch.float64)).numpy()
    r, c = linear_sum_assignment(-iou)
    return r, c, iou[r, c]


def box_errors(preds: list[dict], targets: list[dict], sizes: list[tuple[int, int]], score_threshold: float = 0.3) -> dict:
    """Box MSE and MAE in normalised coordinates (paper 002, section III-F), with the pairing above.

    Args:
        preds, targets: as in :func:`coco_map`, boxes in pixels.
        sizes: ``(width, height)`` per image, to normalise.
        score_threshold: predictions kept for pairing (the top-scoring one is always kept).

    Returns:
        ``box_mse``, ``box_mae`` (floats or ``None`` without any pair), ``box_pairs``,
        ``box_unmatched`` (true boxes without a partner) and ``mean_matched_iou``.
    """
    sq, ab, ious, unmatched = [], [], [], 0
    for p, t, (w, h) in zip(preds, targets, sizes):
        scale = np.array([w, h, w, h], dtype=np.float64)
        pb = np.asarray(p["boxes"], dtype=np.float64).reshape(-1, 4) / scale
        tb = np.asarray(t["boxes"], dtype=np.float64).reshape(-1, 4) / scale
        scores = np.asarray(p["scores"], dtype=np.float64).reshape(-1)
        keep = scores >= score_threshold
        if len(scores) and not keep.any():
            keep[int(scores.argmax())] = True
        pi, ti, iou = match_boxes(pb[keep], tb)
        unmatched += len(tb) - len(ti)
        d = pb[keep][pi] - tb[ti]
        sq.append((d**2).reshape(-1))
        ab.append(np.abs(d).reshape(-1))
        ious.append(iou)
    sq_all, ab_all, iou_all = (np.concatenate(v) if v else np.zeros(0) for v in (sq, ab, ious))
    return {"box_mse": round(float(sq_all.mean()), 8) if sq_all.size else None,
            "box_mae": round(float(ab_all.mean()), 8) if ab_all.size else None,
            "box_pairs": int(iou_all.size), "box_unmatched": int(unmatched),
            "mean_matched_iou": round(float(iou_all.mean()), 6) if iou_all.size else None}


def image_accuracy(preds: list[dict], image_labels: list[int]) -> float | None:
    """Share of images whose highest-scoring detection has the image's class (no detection: wrong)."""
    if not image_labels:
        return None
    ok = 0
    for p, y in zip(preds, image_labels):
        scores = np.asarray(p["scores"]).reshape(-1)
        if len(scores):
            ok += int(np.asarray(p["labels"]).reshape(-1)[int(scores.argmax())]) == int(y)
    return round(ok / len(image_labels), 6)


def per_image_quality(pred: dict, target: dict, score_threshold: float = 0.3) -> float:
    """How well one image is detected, for picking best and worst cases in the report.

    Mean over true boxes of the IoU with the assigned prediction of the same class
    (0 when missed); predictions below ``score_threshold`` are ignored, and each kept
    prediction without a true partner lowers the score as a miss would.
    """
    pb = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(pred["scores"]).reshape(-1)
    labels = np.asarray(pred["labels"]).reshape(-1)
    keep = scores >= score_threshold
    pb, labels = pb[keep], labels[keep]
    tb = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
    tl = np.asarray(target["labels"]).reshape(-1)
    if len(tb) == 0:
        return 1.0 if len(pb) == 0 else 0.0
    if len(pb) == 0:
        return 0.0
    iou = box_iou(_as_tensor(pb, torch.float64), _as_tensor(tb, torch.float64)).numpy()
    iou = iou * (labels[:, None] == tl[None, :])
    r, c = linear_sum_assignment(-iou)
    return float(iou[r, c].sum() / max(len(tb), len(pb)))


def detection_metrics(preds: list[dict], targets: list[dict], sizes: list[tuple[int, int]], image_labels: list[int],
                      class_names: list[str], score_threshold: float = 0.3) -> dict:
    """Every test figure of the detection task in one dict (see the module docstring).

    Args:
        preds: per image ``boxes`` (pixels, xyxy), ``scores``, ``labels``.
        targets: per image ``boxes``, ``labels``.
        sizes: ``(width, height)`` per image.
        image_labels: class index per image.
        class_names: the ``C`` class names (per-class figures are keyed by them too).
        score_threshold: for the box pairing of MSE/MAE.

    Returns:
        ``n``, ``n_boxes``, ``accuracy``, ``box_mse``, ``box_mae``, ``map``, ``map_50``, ``map_75``,
        ``mar_100``, ``per_class_ap50`` and ``per_class_ap`` (dicts class name -> AP).
    """
    m = coco_map(preds, targets, len(class_names))
    out = {"n": len(preds), "n_boxes": int(sum(len(np.asarray(t["labels"]).reshape(-1)) for t in targets)),
           "accuracy": image_accuracy(preds, image_labels)}
    out.update(box_errors(preds, targets, sizes, score_threshold))
    out.update({k: m[k] for k in ("map", "map_50", "map_75", "mar_100")})
    out["per_class_ap50"] = dict(zip(class_names, m["per_class_ap50"]))
    out["per_class_ap"] = dict(zip(class_names, m["per_class_ap"]))
    out["class_names"] = list(class_names)
    return out
