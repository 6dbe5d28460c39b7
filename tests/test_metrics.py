"""Classification metrics against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from defectscope.evaluation.classification import classification_metrics


def test_hand_computed_three_class_case():
    # true:  0 0 0 1 1 2 ; predicted: 0 0 1 1 2 2
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), pred] = 0.8
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class a: P = 2/2, R = 2/3, F1 = 0.8 ; b: P = 1/2, R = 1/2, F1 = 0.5 ; c: P = 1/2, R = 1, F1 = 2/3
    pc = m["per_class"]
    assert pc["a"]["precision"] == pytest.approx(1.0) and pc["a"]["recall"] == pytest.approx(2 / 3)
    assert pc["b"]["f1"] == pytest.approx(0.5) and pc["c"]["f1"] == pytest.approx(2 / 3)
    assert [pc[c]["support"] for c in "abc"] == [3, 2, 1]
    assert m["weighted_f1"] == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_precision"] == pytest.approx((3 * 1 + 2 * 0.5 + 1 * 0.5) / 6)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # AUROC of class c: positive (index 5) scores 0.8; negatives score 0.1 except index 4 (0.8): ties count 1/2
    assert pc["c"]["auroc"] == pytest.approx((4 + 0.5) / 5)


def test_absent_class_has_no_auroc():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.2, 0.8, 0.0], [0.3, 0.6, 0.1]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["auroc"] is None and m["per_class"]["c"]["support"] == 0
    assert m["macro_auroc"] == pytest.approx(1.0)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="expected \\[2, 3\\]"):
        classification_metrics(np.array([0, 1]), np.zeros((2, 2)), ["a", "b", "c"])
