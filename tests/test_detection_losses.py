"""Losses of the box heads: Hungarian set loss is invariant to slot order, the padded loss is not."""

from __future__ import annotations

import torch

from defectscope.models.box_heads.lightning_model import flip_target, single_targets
from defectscope.models.box_heads.losses import (
    SetCriterion,
    cxcywh_to_xyxy,
    hungarian_match,
    padded_slot_loss,
    xyxy_to_cxcywh,
)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, k, c = 3, 6, 4
    logits = torch.randn(b, k, c + 1, generator=g)
    boxes = torch.rand(b, k, 4, generator=g) * 0.5 + 0.25
    targets = []
    for m in (1, 3, 6):
        x0y0 = torch.rand(m, 2, generator=g) * 0.5
        wh = torch.rand(m, 2, generator=g) * 0.4 + 0.05
        targets.append({"boxes": torch.cat([x0y0, x0y0 + wh], 1), "labels": torch.randint(0, c, (m,), generator=g)})
    return logits, boxes, targets, c


def test_hungarian_loss_is_invariant_to_slot_order():
    logits, boxes, targets, c = batch()
    crit = SetCriterion(c)
    loss, _ = crit(logits, boxes, targets)
    for seed in range(5):
        perm = torch.randperm(logits.shape[1], generator=torch.Generator().manual_seed(seed))
        loss_p, _ = crit(logits[:, perm], boxes[:, perm], targets)
        torch.testing.assert_close(loss_p, loss)
    # ... and to the order of the true boxes
    rev = [{"boxes": t["boxes"].flip(0), "labels": t["labels"].flip(0)} for t in targets]
    torch.testing.assert_close(crit(logits, boxes, rev)[0], loss)


def test_padded_loss_depends_on_slot_order():
    logits, boxes, targets, _ = batch()
    perm = torch.tensor([5, 4, 3, 2, 1, 0])
    a, _ = padded_slot_loss(logits, boxes, targets)
    b, _ = padded_slot_loss(logits[:, perm], boxes[:, perm], targets)
    assert not torch.allclose(a, b)


def test_matching_recovers_a_permutation_of_perfect_slots():
    _, _, targets, c = batch()
    t = targets[2]  # 6 boxes in 6 slots
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    boxes = xyxy_to_cxcywh(t["boxes"][perm]).unsqueeze(0)
    logits = torch.full((1, 6, c + 1), -10.0)
    logits[0, torch.arange(6), t["labels"][perm]] = 10.0
    (slots, idx), = hungarian_match(logits, boxes, [t])
    assert torch.equal(perm[slots], idx)
    loss, parts = SetCriterion(c)(logits, boxes, [t])
    assert parts["l1"] < 1e-5 and parts["giou"] < 1e-5 and parts["ce"] < 1e-3


def test_perfect_slots_give_a_lower_loss_than_shifted_ones():
    _, _, targets, c = batch()
    t = targets[1]
    good = torch.cat([xyxy_to_cxcywh(t["boxes"]), torch.full((3, 4), 0.5)]).unsqueeze(0)
    bad = good.clone()
    bad[0, :3, :2] += 0.2
    logits = torch.zeros(1, 6, c + 1)
    crit = SetCriterion(c)
    assert crit(logits, good, [t])[0] < crit(logits, bad, [t])[0]


def test_box_conversions_round_trip():
    b = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(b)), b)


def test_single_target_is_the_largest_box():
    t = {"boxes": torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.9, 0.5], [0.5, 0.5, 0.6, 0.6]]),
         "labels": torch.tensor([0, 3, 1])}
    labels, boxes = single_targets([t])
    assert labels.tolist() == [3]
    torch.testing.assert_close(boxes[0], t["boxes"][1])


def test_flipped_boxes_follow_flipped_images():
    t = {"boxes": torch.tensor([[0.1, 0.2, 0.4, 0.9]]), "labels": torch.tensor([2])}
    torch.testing.assert_close(flip_target(t, True, False)["boxes"], torch.tensor([[0.6, 0.2, 0.9, 0.9]]))
    torch.testing.assert_close(flip_target(t, False, True)["boxes"], torch.tensor([[0.1, 0.1, 0.4, 0.8]]))
    torch.testing.assert_close(flip_target(t, True, True)["boxes"], torch.tensor([[0.6, 0.1, 0.9, 0.8]]))
