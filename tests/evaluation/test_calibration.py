"""Calibration: ECE by hand, temperature scaling on synthetic and real predictions, the diagram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from defectscope.evaluation.calibration import (
    apply_temperature,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    logits_from_probs,
    plot_reliability_diagram,
    reliability_bins,
)


def test_ece_hand_computed():
    probs = np.array([[0.90, 0.10], [0.12, 0.88], [0.75, 0.25], [0.30, 0.70], [0.62, 0.38]])
    y = np.array([0, 0, 1, 1, 0])
    # 15 bins of width 1/15: 0.90 and 0.88 share bin 14 (one right, one wrong), 0.75 is wrong,
    # 0.70 and 0.62 are right:  (2 |0.5 - 0.89| + |0 - 0.75| + |1 - 0.70| + |1 - 0.62|) / 5
    assert expected_calibration_error(probs, y) == pytest.approx((2 * 0.39 + 0.75 + 0.30 + 0.38) / 5, abs=1e-12)
    b = reliability_bins(probs, y)
    assert b["count"].tolist() == [0] * 9 + [1, 1, 1, 0, 2, 0]
    # perfect, fully confident predictions are calibrated
    assert expected_calibration_error(np.eye(3)[[0, 1, 2, 1]], np.array([0, 1, 2, 1])) == 0.0
    # a bin edge goes to the lower bin: confidence 1/15 * 9 = 0.6 is in bin 9 ((8/15, 9/15])
    assert reliability_bins(np.array([[0.6, 0.4]]), np.array([0]))["count"][8] == 1


def test_ece_matches_torchmetrics():
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2.5, (700, 5))
    y = rng.integers(0, 5, 700)
    p = softmax(z, axis=1)
    ref = multiclass_calibration_error(torch.tensor(p), torch.tensor(y), num_classes=5, n_bins=15, norm="l1")
    assert expected_calibration_error(p, y) == pytest.approx(float(ref), abs=1e-6)


def test_ece_errors():
    with pytest.raises(ValueError, match=r"probs: expected \[N, K\]"):
        expected_calibration_error(np.ones(4), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"y_true: expected integer class indices in \[0, 1\]"):
        expected_calibration_error(np.full((2, 2), 0.5), np.array([0, 2]))


def _synthetic(seed: int, n: int, k: int = 6, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated logits: the label is drawn from softmax(z) itself."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, scale, (n, k))
    p = softmax(z, axis=1)
    y = (rng.uniform(size=(n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z, y


@pytest.mark.parametrize("true_t", [3.0, 0.5])
def test_temperature_recovers_a_known_temperature(true_t):
    z_val, y_val = _synthetic(0, 4000)
    z_test, y_test = _synthetic(1, 4000)
    assert fit_temperature(z_val, y_val) == pytest.approx(1.0, rel=0.06)  # calibrated already
    t = fit_temperature(z_val * true_t, y_val)  # over- (3) or under-confident (0.5) model
    assert t == pytest.approx(true_t, rel=0.06)
    res = calibrate(z_val * true_t, y_val, z_test * true_t, y_test)
    assert res["measured_on"] == "test" and res["temperature"] == t
    assert res["ece_after"] < res["ece_before"] / 2
    assert res["nll_after"] < res["nll_before"]
    # top-1 predictions are unchanged
    assert (apply_temperature(z_test * true_t, t).argmax(1) == z_test.argmax(1)).all()


def test_apply_temperature_numpy_and_torch_agree():
    z = np.random.default_rng(2).normal(0, 3, (5, 4))
    got_t = apply_temperature(torch.tensor(z), 2.0)
    assert isinstance(got_t, torch.Tensor)
    np.testing.assert_allclose(got_t.numpy(), apply_temperature(z, 2.0), atol=1e-12)
    np.testing.assert_allclose(apply_temperature(logits_from_probs(softmax(z, 1)), 1.0), softmax(z, 1), atol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(z, 0.0)


def test_temperature_on_real_neu_predictions(neu_root):
    """A logistic regression on real EfficientNet-Lite0 features of NEU, trained to near-zero loss,
    is over-confident on new images; the temperature fitted on validation lowers the test ECE."""
    from sklearn.linear_model import LogisticRegression

    from defectscope.data.images import class_from_prefix, load_stack
    from defectscope.models.backbones import create_backbone

    files = sorted((neu_root / "images").glob("*.jpg"))
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))[:360]]
    names = sorted({class_from_prefix(f) for f in files})
    y = np.array([names.index(class_from_prefix(f)) for f in files])
    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0", pretrained=True).eval()
    with torch.inference_mode():
        x = torch.from_numpy(load_stack(files, 64)).float() / 255
        feats = torch.cat([bb(x[i:i + 120]).mean((2, 3)) for i in range(0, len(x), 120)]).numpy()
    tr, va, te = slice(0, 120), slice(120, 240), slice(240, 360)
    clf = LogisticRegression(C=100.0, max_iter=3000).fit(feats[tr], y[tr])
    res = calibrate(clf.decision_function(feats[va]), y[va], clf.decision_function(feats[te]), y[te])
    assert (clf.predict(feats[te]) == y[te]).mean() > 0.7
    assert res["temperature"] > 1.2  # over-confident
    assert res["ece_after"] < res["ece_before"]
    assert res["nll_after"] < res["nll_before"]


def test_reliability_diagram_png(tmp_path):
    z, y = _synthetic(3, 500)
    out = plot_reliability_diagram(softmax(3 * z, 1), apply_temperature(3 * z, 3.0), y, tmp_path / "rel.png",
                                   temperature=3.0)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 1.6 * h  # two panels side by side
