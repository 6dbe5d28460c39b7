"""Losses of the box heads (paper 002, section III-C/D, and our set-prediction variant).

Box convention inside the models: normalised ``cx, cy, w, h`` in [0, 1] (sigmoid
outputs); losses convert to normalised ``xmin, ymin, xmax, ymax`` where needed.
Targets are lists (one entry per image) of ``boxes`` ``[M, 4]`` normalised xyxy and
``labels`` ``[M]`` class indices in ``0..C-1``.

- :func:`single_loss` (section III-C): cross-entropy on the image's target class +
  MSE of the 4 box numbers of the target box.
- :func:`padded_slot_loss` (section III-D): the true boxes fill slots ``0..M-1`` in
  annotation order, the other ``K - M`` slots get class ``C`` ("no defect") and the
  box ``(0, 0, 0, 0)``; loss = cross-entropy over all slots + MSE over all slot boxes.
  The loss changes when the model outputs the same boxes in another slot order.
- :class:`SetCriterion` (ours, after DETR): a Hungarian matching
  (:func:`hungarian_match`) assigns each true box to one slot at the least cost
  ``w_class * (-p(class)) + w_l1 * L1 + w_giou * (-GIoU)``; matched slots learn class
  and box (L1 + GIoU, ``torchvision.ops.generalized_box_iou_loss``), unmatched slots
  learn "no defect" (weight ``eos_coef``). The loss is invariant to slot order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` centre/size boxes to corner boxes (same units)."""
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` corner boxes to centre/size boxes (same units)."""
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def single_loss(logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, target_boxes: torch.Tensor,
                box_weight: float = 5.0) -> tuple[torch.Tensor, dict]:
    """Paper 002 section III-C: CE(class) + ``box_weight`` * MSE(4 box numbers).

    Args:
        logits: ``[B, C]``. boxes: ``[B, 4]`` predicted normalised cxcywh.
        labels: ``[B]`` target class. target_boxes: ``[B, 4]`` normalised xyxy.

    Returns:
        ``(loss, parts)`` with parts ``ce`` and ``mse`` (detached).
    """
    ce = F.cross_entropy(logits.float(), labels)
    mse = F.mse_loss(cxcywh_to_xyxy(boxes.float()), target_boxes.float())
    return ce + box_weight * mse, {"ce": ce.detach(), "mse": mse.detach()}


def pad_targets(targets: list[dict], num_slots: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded slot targets (section III-D): labels ``[B, K]`` (``C`` = no defect), boxes ``[B, K, 4]`` (zeros).

    Raises:
        ValueError: an image has more boxes than slots.
    """
    b = len(targets)
    labels = torch.full((b, num_slots), num_classes, dtype=torch.long)
    boxes = torch.zeros(b, num_slots, 4)
    for i, t in enumerate(targets):
        m = len(t["labels"])
        if m > num_slots:
            raise ValueError(f"image {i} has {m} boxes but the model has only {num_slots} slots")
        labels[i, :m] = t["labels"]
        boxes[i, :m] = t["boxes"]
    return labels, boxes


def padded_slot_loss(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict],
                     box_weight: float = 5.0) -> tuple[torch.Tensor, dict]:
    """Paper 002 section III-D: CE over all ``K`` slots (padding class ``C``) + MSE over all slot boxes.

    Args:
        logits: ``[B, K, C + 1]``. boxes: ``[B, K, 4]`` normalised cxcywh.
        targets: per image ``labels`` ``[M]`` and ``boxes`` ``[M, 4]`` normalised xyxy, in annotation order.

    Returns:
        ``(loss, parts)`` with ``ce`` and ``mse``.
    """
    k, c1 = logits.shape[1], logits.shape[2]
    labels, tboxes = pad_targets(targets, k, c1 - 1)
    labels, tboxes = labels.to(logits.device), tboxes.to(logits.device)
    ce = F.cross_entropy(logits.float().reshape(-1, c1), labels.reshape(-1))
    mse = F.mse_loss(cxcywh_to_xyxy(boxes.float()), tboxes)
    return ce + box_weight * mse, {"ce": ce.detach(), "mse": mse.detach()}


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict], w_class: float = 1.0,
                    w_l1: float = 5.0, w_giou: float = 2.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Least-cost one-to-one assignment of true boxes to slots, per image.

    Cost of slot ``k`` for true box ``j``: ``-w_class * softmax(logits)[k, label_j]
    + w_l1 * |box_k - box_j|_1 - w_giou * GIoU(box_k, box_j)`` (boxes normalised xyxy),
    solved with ``scipy.optimize.linear_sum_assignment``.

    Args:
        logits: ``[B, K, C + 1]``. boxes: ``[B, K, 4]`` normalised cxcywh.
        targets: per image ``labels`` ``[M]`` and ``boxes`` ``[M, 4]`` normalised xyxy, ``M <= K``.

    Returns:
        Per image ``(slot_idx, target_idx)``, two long tensors of length ``M``.
    """
    prob = logits.float().softmax(-1)
    pred = cxcywh_to_xyxy(boxes.float())
    out = []
    for i, t in enumerate(targets):
        m = len(t["labels"])
        if m == 0:
            out.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
            continue
        tb = t["boxes"].to(pred.device).float()
        cost = (-w_class * prob[i][:, t["labels"]] + w_l1 * torch.cdist(pred[i], tb, p=1)
                - w_giou * generalized_box_iou(pred[i], tb))
        r, c = linear_sum_assignment(cost.cpu().numpy())
        out.append((torch.as_tensor(r, dtype=torch.long), torch.as_tensor(c, dtype=torch.long)))
    return out


class SetCriterion(nn.Module):
    """Set-prediction loss over ``K`` slots (ours): Hungarian matching, then CE + L1 + GIoU.

    Args:
        num_classes: ``C`` defect classes; class ``C`` is "no defect".
        w_class, w_l1, w_giou: weights of the three terms, used both in the matching cost and the loss.
        eos_coef: cross-entropy weight of the "no defect" class (DETR: 0.1), so that the many empty
            slots do not swamp the few matched ones.

    Forward:
        ``logits`` ``[B, K, C + 1]``, ``boxes`` ``[B, K, 4]`` normalised cxcywh, ``targets`` (module
        docstring); returns ``(loss, parts)`` with ``ce``, ``l1``, ``giou``. L1 and GIoU are averaged
        over the true boxes of the batch.
    """

    def __init__(self, num_classes: int, w_class: float = 1.0, w_l1: float = 5.0, w_giou: float = 2.0,
                 eos_coef: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.w_class, self.w_l1, self.w_giou = w_class, w_l1, w_giou
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("class_weight", weight)

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, dict]:
        matches = hungarian_match(logits, boxes, targets, self.w_class, self.w_l1, self.w_giou)
        b, k, c1 = logits.shape
        labels = torch.full((b, k), self.num_classes, dtype=torch.long, device=logits.device)
        src, tgt = [], []
        for i, ((si, ti), t) in enumerate(zip(matches, targets)):
            labels[i, si.to(logits.device)] = t["labels"][ti].to(logits.device)
            src.append(boxes[i, si.to(boxes.device)])
            tgt.append(t["boxes"][ti].to(boxes.device))
        ce = F.cross_entropy(logits.float().reshape(-1, c1), labels.reshape(-1), weight=self.class_weight)
        n = max(1, sum(len(s) for s in src))
        pred = cxcywh_to_xyxy(torch.cat(src).float()) if src else boxes.new_zeros(0, 4)
        true = torch.cat(tgt).float() if tgt else boxes.new_zeros(0, 4)
        l1 = (pred - true).abs().sum() / n
        giou = generalized_box_iou_loss(pred, true, reduction="sum") / n if len(pred) else pred.sum()
        loss = self.w_class * ce + self.w_l1 * l1 + self.w_giou * giou
        return loss, {"ce": ce.detach(), "l1": l1.detach(), "giou": giou.detach()}
