"""The student-teacher model (EfficientAD-S's student/teacher part), PaDiM's Ledoit-Wolf covariance and the ensemble
of calibration-standardised members: fit, reload as tensors, behaviour on generated striped surfaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.models.anomaly import anomaly_model_class, load_anomaly_model


def _surfaces(n: int, h: int = 64, w: int = 96, seed: int = 0, crack: bool = False) -> np.ndarray:
    """Grey surfaces with vertical stripes of random phase and noise (uint8 ``[n, 3, h, w]``); ``crack``: a dark
    horizontal hair-line 2 px thick across the middle third."""
    rng = np.random.default_rng(seed)
    cols = np.arange(w)[None, :]
    out = []
    for _ in range(n):
        img = 128 + 40 * np.sin(2 * np.pi * (cols / 12.0 + rng.random())) + rng.normal(0, 6, (h, w))
        if crack:
            r = int(rng.integers(h // 3, 2 * h // 3))
            img[r : r + 2, w // 3 : 2 * w // 3] = 20
        out.append(np.repeat(np.clip(img, 0, 255)[None], 3, 0))
    return np.stack(out).astype(np.uint8)


def _roundtrip(model, x):
    payload = {"model_name": model.name, "model_kwargs": model.args,
               "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    return load_anomaly_model(payload, "test").predict(x, batch_size=1)


def test_ledoit_wolf_is_scikit_learns():
    from sklearn.covariance import ledoit_wolf as sk_lw

    from defectscope.models.padim import ledoit_wolf

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    xc = x - x.mean(1, keepdim=True)
    ours = ledoit_wolf(xc)
    for i in range(3):
        ref, _ = sk_lw(xc[i].numpy(), assume_centered=True)
        np.testing.assert_allclose(ours[i].numpy(), ref, rtol=1e-10, atol=1e-10)
    # shrinks toward mu I: eigenvalues pulled together, the trace kept
    s = xc.transpose(1, 2) @ xc / 40
    ev_s, ev_lw = torch.linalg.eigvalsh(s), torch.linalg.eigvalsh(ours)
    assert ((ev_lw[:, -1] / ev_lw[:, 0]) < (ev_s[:, -1] / ev_s[:, 0])).all()
    torch.testing.assert_close(ours.diagonal(dim1=1, dim2=2).sum(-1), s.diagonal(dim1=1, dim2=2).sum(-1))
    with pytest.raises(ValueError, match="n >= 2"):
        ledoit_wolf(xc[:, :1])


def test_padim_ledoit_wolf_separates_a_crack_and_reloads():
    fit, good, bad = _surfaces(12, seed=1), _surfaces(3, seed=2), _surfaces(3, seed=3, crack=True)
    model = anomaly_model_class("padim")(layers=[2], n_features=20, covariance="ledoit_wolf", blur_sigma=2.0)
    model.fit(fit, batch_size=4)
    x = np.concatenate([good, bad])
    out = model.predict(x)
    assert out.pred_score[3:].min() > out.pred_score[:3].max()
    torch.testing.assert_close(_roundtrip(model, x).pred_score, out.pred_score, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ridge or ledoit_wolf"):
        anomaly_model_class("padim")(layers=[2], covariance="oas")


def test_student_teacher_learns_the_normal_surface_and_scores_a_crack_higher():
    from defectscope.models.student_teacher import hard_feature_loss

    d2 = torch.arange(1000.0)
    assert float(hard_feature_loss(d2, 0.99)) == pytest.approx(float(d2[-10:].mean()))
    assert float(hard_feature_loss(d2, 0.0)) == pytest.approx(float(d2.mean()))
    fit, cal = _surfaces(16, seed=1), _surfaces(4, seed=4)
    good, bad = _surfaces(3, seed=2), _surfaces(3, seed=3, crack=True)
    model = anomaly_model_class("student_teacher")(layers=[2], steps=40, train_batch=4, lr=2e-3,
                                                   hard_quantile=0.99, blur_sigma=2.0)
    info = model.fit(fit, cal, batch_size=4)
    assert info["steps"] == 40 and info["loss_last"] < 0.7 * info["loss_first"]
    assert info["q_b"] > info["q_a"] and info["map_quantiles_from"] == "calibration"
    x = np.concatenate([good, bad])
    out = model.predict(x)
    assert out.anomaly_map.shape == (6, 64, 96) and torch.isfinite(out.anomaly_map).all()
    assert out.pred_score[3:].min() > out.pred_score[:3].max()
    again = _roundtrip(model, x)
    torch.testing.assert_close(again.pred_score, out.pred_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.anomaly_map, out.anomaly_map, rtol=1e-5, atol=1e-5)
    # the same seed trains the same student (a fixed number of steps, seeded batches)
    pair = [anomaly_model_class("student_teacher")(**{**model.args, "steps": 3}) for _ in range(2)]
    for m in pair:
        m.fit(fit[:6], cal, batch_size=4)
    torch.testing.assert_close(pair[0].predict(x).pred_score, pair[1].predict(x).pred_score)


def test_ensemble_standardises_each_member_on_the_calibration_images():
    cls = anomaly_model_class("ensemble")
    args = cls.Args(members=[{"name": "padim", "layers": [2], "n_features": 16},
                             {"name": "patchcore", "layers": [2], "patches_per_image": 40, "coreset_ratio": 0.5,
                              "image_size": [32, 48]}]).module_args()
    model = cls(**args)
    fit, cal = _surfaces(10, seed=1), _surfaces(5, seed=4)
    info = model.fit(fit, cal, batch_size=4)
    assert [m["name"] for m in info["members"]] == ["padim", "patchcore"]
    out = model.predict(cal)
    # each member's calibration scores standardised to mean 0, std 1; the ensemble is their mean
    zs = []
    for i in range(2):
        with torch.no_grad():
            s = model._member_out(i, torch.from_numpy(cal).float() / 255).pred_score
        zs.append((s - model.score_mean[i]) / model.score_std[i])
        assert float(zs[-1].mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(zs[-1].std()) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(out.pred_score, (zs[0] + zs[1]) / 2, rtol=1e-4, atol=1e-4)  # batch 4 vs 5
    bad = _surfaces(3, seed=3, crack=True)
    assert model.predict(bad).pred_score.min() > out.pred_score.max()
    assert out.anomaly_map.shape == (5, 64, 96)  # the 32 x 48 member's map comes back at the input size
    torch.testing.assert_close(_roundtrip(model, cal).pred_score, out.pred_score, rtol=1e-4, atol=1e-4)  # z units
    with pytest.raises(ValueError, match="calibration images"):
        cls(**args).fit(fit, None)
    with pytest.raises(ValueError, match="not exportable"):
        cls.Args(members=[{"name": "grad_mobilenet"}, {"name": "padim"}])
    with pytest.raises(ValueError, match="at least 2 members"):
        cls.Args(members=[{"name": "padim"}])
    with pytest.raises(ValueError, match="gian"):
        cls.Args(members=[{"name": "padim", "gian": 1}, {"name": "patchcore"}])
