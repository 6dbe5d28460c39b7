"""Linear probe on real NEU images: accuracy under 5-fold CV, and the nn.Module equals scikit-learn."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from defectscope.data.images import discover_labelled_images, load_stack
from defectscope.models import create_backbone, create_model
from defectscope.models.linear_probe import (
    LinearProbeClassifier,
    extract_features,
    fit_linear_probe,
    fit_logistic,
    train_linear_probe,
)


@pytest.fixture(scope="module")
def neu48(neu_small):
    items, names, _ = discover_labelled_images(neu_small)
    x = load_stack([it.path for it in items], 128)  # 128 px keeps the test quick on the shared CPU
    y = np.array([it.label for it in items])
    return x, y, names


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0", pretrained=True)


@pytest.fixture(scope="module")
def feats(neu48, lite0):
    return extract_features(lite0, neu48[0])


def test_five_fold_accuracy_well_above_chance(neu48, feats):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, y, names = neu48
    assert feats.shape == (48, 1280) and len(names) == 6
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    acc = cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)), feats, y, cv=cv)
    assert acc.mean() >= 0.6, acc  # chance is 1/6


def test_fit_linear_probe_matches_sklearn_and_module(neu48, feats, lite0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, _ = neu48
    test = np.arange(len(y)) % 5 == 0
    pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(feats[~test], y[~test])
    p_sk = pipe.predict_proba(feats[test])
    p = fit_linear_probe(x[~test], y[~test], x[test], num_classes=6, backbone=lite0)
    assert p.shape == (test.sum(), 6) and np.allclose(p.sum(1), 1)
    assert np.abs(p - p_sk).max() < 1e-4
    model = train_linear_probe(x[~test], y[~test], num_classes=6, backbone=lite0)
    with torch.no_grad():
        p_mod = torch.softmax(model(torch.from_numpy(x[test]).float() / 255), dim=1).numpy()
    assert np.abs(p_mod - p_sk).max() < 1e-4
    assert (p_mod.argmax(1) == y[test]).mean() > 1 / 6


def test_module_round_trip_through_a_checkpoint(neu48, lite0):
    x, y, _ = neu48
    model = train_linear_probe(x[:30], y[:30], num_classes=6, backbone=lite0)
    model.train()  # stays frozen in eval mode
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    buf = io.BytesIO()
    torch.save({"kwargs": model.model_kwargs(), "state": model.state_dict()}, buf)
    buf.seek(0)
    payload = torch.load(buf, weights_only=True)  # plain tensors: no pickled scikit-learn object
    again = create_model("linear_probe", **payload["kwargs"])
    again.load_state_dict(payload["state"])
    xb = torch.from_numpy(x[30:36]).float() / 255
    with torch.no_grad():
        assert torch.allclose(model(xb), again(xb), atol=1e-5)


def test_binary_and_absent_classes():
    rng = np.random.default_rng(0)
    f = np.vstack([rng.normal(0, 1, (20, 5)), rng.normal(1.5, 1, (20, 5))])
    y = np.repeat([0, 2], 20)  # class 1 absent from training
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    w, b = fit_logistic(f, y, num_classes=3)
    z = f @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p_sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(f, y).predict_proba(f)
    assert np.abs(p[:, [0, 2]] - p_sk).max() < 1e-6 and p[:, 1].max() < 1e-12


def test_errors(lite0):
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_logistic(np.zeros((4, 3)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="labels must lie"):
        fit_logistic(np.zeros((4, 3)), np.array([0, 1, 2, 3]), num_classes=3)
    with pytest.raises(ValueError, match="weight has shape"):
        LinearProbeClassifier(lite0, 3, weight=np.zeros((3, 7)))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        extract_features(lite0, np.zeros((2, 1, 64, 64), dtype=np.uint8))
    from defectscope.models.registry import ModelArgumentError

    with pytest.raises(ModelArgumentError, match="dropuot: not an argument of model 'linear_probe'"):
        create_model("linear_probe", backbone="efficientnet_lite0", num_classes=3, dropuot=0.1)  # no **kwargs
