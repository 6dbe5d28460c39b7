"""Detection metrics on hand-made cases whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.evaluation.detection import box_errors, coco_map, detection_metrics, image_accuracy, per_image_quality


def test_map_known_answer():
    # image 1: class 0 box found (score .9) and a false class-0 box on the class-1 object (score .8);
    # image 2: one of two class-1 boxes found (score .7).
    targets = [{"boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "labels": [0, 1]},
               {"boxes": [[5, 5, 50, 50], [60, 60, 90, 90]], "labels": [1, 1]}]
    preds = [{"boxes": [[0, 0, 10, 10], [20, 20, 40, 40]], "scores": [0.9, 0.8], "labels": [0, 0]},
             {"boxes": [[5, 5, 50, 50]], "scores": [0.7], "labels": [1]}]
    m = coco_map(preds, targets, 3)
    # class 0: the true positive ranks first -> AP 1. class 1: recall reaches 1/3 at precision 1 -> COCO's
    # 101-point interpolation gives 34/101. Class 2 has no true box -> None.
    assert m["per_class_ap50"] == [1.0, pytest.approx(34 / 101, abs=1e-6), None]
    assert m["map_50"] == pytest.approx((1 + 34 / 101) / 2, abs=1e-6)
    assert m["map"] == pytest.approx(m["map_50"], abs=1e-6)  # every match is exact (IoU 1)


def test_map_depends_on_the_iou_threshold():
    # IoU of [0,0,10,10] with [0,0,10,6.2] is 0.62: a hit at 0.50, 0.55 and 0.60, a miss from 0.65 on.
    targets = [{"boxes": [[0, 0, 10, 10]], "labels": [0]}]
    preds = [{"boxes": [[0, 0, 10, 6.2]], "scores": [0.9], "labels": [0]}]
    m = coco_map(preds, targets, 1)
    assert m["map_50"] == pytest.approx(1.0)
    assert m["map_75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(3 / 10)


def test_box_errors_and_accuracy_by_hand():
    targets = [{"boxes": [[0, 0, 100, 100], [50, 50, 100, 100]], "labels": [0, 0]}]
    # the 0.1 detection is dropped by the threshold; the two others pair by IoU, not by order
    preds = [{"boxes": [[50, 50, 100, 90], [0, 0, 100, 80], [0, 0, 5, 5]], "scores": [0.9, 0.8, 0.1], "labels": [0, 0, 1]}]
    e = box_errors(preds, targets, [(100, 200)], score_threshold=0.3)
    # normalised by (w, h) = (100, 200): differences are 0.05 (ymax of box 2) and 0.1 (ymax of box 1) in y
    assert e["box_pairs"] == 2 and e["box_unmatched"] == 0
    assert e["box_mae"] == pytest.approx((0.1 + 0.05) / 8, abs=1e-8)
    assert e["box_mse"] == pytest.approx((0.01 + 0.0025) / 8, abs=1e-8)
    assert image_accuracy(preds, [0]) == 1.0 and image_accuracy(preds, [1]) == 0.0


def test_unmatched_true_boxes_are_counted_not_hidden():
    targets = [{"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [0, 0]}]
    preds = [{"boxes": [[0, 0, 10, 10]], "scores": [0.9], "labels": [0]}]
    e = box_errors(preds, targets, [(100, 100)])
    assert e["box_pairs"] == 1 and e["box_unmatched"] == 1 and e["box_mse"] == 0.0
    assert per_image_quality(preds[0], targets[0]) == pytest.approx(0.5)


def test_detection_metrics_keys():
    targets = [{"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([1])}]
    preds = [{"boxes": np.array([[0, 0, 10, 10]]), "scores": np.array([0.9]), "labels": np.array([1])}]
    m = detection_metrics(preds, targets, [(10, 10)], [1], ["a", "b"])
    for k in ("map_50", "map", "per_class_ap50", "box_mse", "box_mae", "accuracy"):
        assert k in m
    assert m["per_class_ap50"] == {"a": None, "b": 1.0}
