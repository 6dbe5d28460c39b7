"""The anomaly-model contract: registry by name, fit / save as tensors / reload, tiles stitched back at the
input's size, bounded PatchCore bank, Grad-MobileNet's torch SVM = scikit-learn's, AUPRO on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.evaluation.anomaly import aupro, f1_max
from defectscope.models.anomaly import (
    ANOMALY_MODELS,
    AnomalyArgs,
    AnomalyModel,
    AnomalyOutput,
    anomaly_model_class,
    list_anomaly_models,
    load_anomaly_model,
    register_anomaly_model,
    window_starts,
)


class ToyArgs(AnomalyArgs):
    name: str = "toy_darkness"
    gain: float = 1.0


class ToyDarkness(AnomalyModel):
    """A pixel-wise toy: map = gain * (1 - grey) - mean fitted darkness; score = map max."""

    name = "toy_darkness"
    Args = ToyArgs
    fitted_buffers = ()

    def __init__(self, gain: float = 1.0, tile=None, tile_stride=None) -> None:
        super().__init__(tile, tile_stride)
        self.gain = float(gain)
        self.register_buffer("level", torch.zeros(()))
        self.args.update(gain=self.gain)

    def fit(self, x_fit, x_cal=None, **context) -> dict:
        self.level = torch.tensor(float(self.gain * (1 - x_fit.mean() / 255.0)))
        return {"level": float(self.level)}

    def score_tiles(self, x):
        m = self.gain * (1 - x.mean(1)) - self.level
        return AnomalyOutput(m.flatten(1).amax(1), m)


if "toy_darkness" not in ANOMALY_MODELS:  # adding a model = its class + the registry (+ a recipe naming it)
    register_anomaly_model(ToyDarkness)


def _images(n=6, h=64, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)


def test_registry_and_recipe_take_any_registered_model_by_name():
    from defectscope.config import ConfigError, validate
    from defectscope.recipes.anomaly import AnomalyRecipe

    assert {"patchcore", "padim", "grad_mobilenet", "toy_darkness"} <= set(list_anomaly_models())
    r = validate({"task": "anomaly", "model": {"name": "toy_darkness", "gain": 2.0}}, AnomalyRecipe, "r.yaml")
    assert isinstance(r.model, ToyArgs) and r.model.module_args() == {"tile": None, "tile_stride": None, "gain": 2.0}
    assert r.model_dump(mode="json")["model"]["gain"] == 2.0  # the subclass's fields are written to config.yaml
    with pytest.raises(ConfigError, match=r"model.gian: not a setting of this model.*knows: .*gain"):
        validate({"task": "anomaly", "model": {"name": "toy_darkness", "gian": 2.0}}, AnomalyRecipe, "r.yaml")
    with pytest.raises(ConfigError, match="unknown anomaly model 'nope'; known: .*padim"):
        validate({"task": "anomaly", "model": {"name": "nope"}}, AnomalyRecipe, "r.yaml")
    with pytest.raises(ValueError, match="registered twice"):
        register_anomaly_model(ToyDarkness)


@pytest.mark.parametrize("name, kwargs", [
    ("patchcore", {"layers": [2], "coreset_ratio": 0.2, "patches_per_image": 30}),
    ("padim", {"layers": [2, 3], "n_features": 12}),
    ("padim", {"layers": [2], "n_features": 12, "share": "rows"}),
    ("padim", {"layers": [2], "n_features": 12, "share": "all", "tile": [32, 48], "tile_stride": [16, 48]}),
    ("patchcore", {"layers": [2], "coreset_ratio": 0.2, "tile": [32, 32], "tile_stride": [16, 16]}),
])
def test_fit_save_as_tensors_reload_scores_the_same(name, kwargs):
    torch.manual_seed(0)
    model = anomaly_model_class(name)(**kwargs, pretrained=False)
    x = _images()
    model.fit(x[:4], batch_size=2)
    out = model.predict(x[4:], batch_size=2)
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 64, 48)
    assert torch.isfinite(out.anomaly_map).all() and (out.pred_score > 0).all()
    payload = {"model_name": name, "model_kwargs": model.args,
               "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    again = load_anomaly_model(payload, "test").predict(x[4:], batch_size=1)  # other batch size, same scores
    torch.testing.assert_close(again.pred_score, out.pred_score, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again.anomaly_map, out.anomaly_map, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        load_anomaly_model({**payload, "state_dict": {}}, "ckpt")


def test_tiles_are_stitched_back_at_the_input_size():
    assert window_starts(10, 4, 3) == [0, 3, 6] and window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(4, 8, 2) == [0]
    x = _images(3, 70, 50)
    whole = ToyDarkness()
    tiled = ToyDarkness(tile=[32, 32], tile_stride=[16, 24])
    whole.fit(x)
    tiled.fit(x)
    a, b = whole.predict(x), tiled.predict(x)
    assert b.anomaly_map.shape == (3, 70, 50)
    # a pixel-wise map is the same whether scored whole or in overlapping windows (overlaps averaged)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.pred_score, b.pred_score, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="stride <= tile"):
        ToyDarkness(tile=[8, 8], tile_stride=[9, 4])


def test_patchcore_bank_is_capped_in_mib():
    torch.manual_seed(0)
    pc = anomaly_model_class("patchcore")(layers=[2], pretrained=False, coreset_ratio=1.0, bank_mib=0.01)
    info = pc.fit(_images(4), batch_size=4)
    d = pc.memory_bank.shape[1]
    assert info["memory_bank"] == int(0.01 * 2**20 // (4 * d)) == pc.memory_bank.shape[0]
    assert info["bank_mib"] <= 0.01 and info["patches"] == 4 * 8 * 6 and info["peak_rss_mib"] > 0


def test_grad_mobilenet_torch_svm_is_scikit_learns():
    from defectscope.models.grad_mobilenet import GradMobileNetDetector, OneClassScorer

    rng = np.random.default_rng(0)
    f = rng.normal(size=(40, 7))
    scorer = OneClassScorer(0.1, "scale").fit(f)
    det = GradMobileNetDetector(backbone="efficientnet_lite0", grid=[2, 2], bins=2)
    st = scorer.state_dict()
    det.svm_mean, det.svm_scale = st["mean"], st["scale"]
    det.svm_support, det.svm_dual = st["support_vectors"], st["dual_coef"]
    det.svm_intercept = torch.tensor(st["intercept"], dtype=torch.float64)
    det.svm_gamma = torch.tensor(st["gamma"], dtype=torch.float64)
    q = rng.normal(size=(9, 7)) * 2
    np.testing.assert_allclose(det.svm_score(torch.from_numpy(q)).numpy(), scorer.score(q), rtol=1e-9, atol=1e-9)
    assert not det.exportable and "backward pass" in det.export_note
    with pytest.raises(ValueError, match="tiling"):
        GradMobileNetDetector(tile=[32, 32])


def test_aupro_on_hand_computed_cases():
    # one region of 2 px, 2 background px: PRO 0.5 at FPR 0, then FPR 0.5 before the region's second pixel
    maps = np.array([[[0.9, 0.4, 0.6, 0.1]]])
    masks = np.array([[[1, 1, 0, 0]]], dtype=bool)
    assert aupro(maps, masks, 0.3) == pytest.approx(0.5)
    assert aupro(maps, masks, 1.0) == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    # regions count equally whatever their size (per-region overlap, not per-pixel): a 3-px region with
    # 2 of 3 pixels found and a 1-px region found, both before any false positive -> PRO 5/6 at FPR 0
    maps = np.array([[[0.9, 0.8, 0.1, 0.5, 0.7, 0.2]]])
    masks = np.array([[[1, 1, 1, 0, 1, 0]]], dtype=bool)
    assert aupro(maps, masks, 0.3) == pytest.approx(5 / 6)
    assert aupro(maps, masks, 1.0) == pytest.approx(5 / 6)
    # a perfect map: 1; regions in several images pooled; no region -> None
    m = np.zeros((2, 5, 5), bool)
    m[0, 1:3, 1:3] = True
    m[1, 4, 4] = True
    assert aupro(m.astype(float), m) == pytest.approx(1.0)
    assert aupro(np.random.default_rng(0).random((2, 5, 5)), np.zeros((2, 5, 5), bool)) is None
    with pytest.raises(ValueError, match="must be equal"):
        aupro(np.zeros((1, 2, 2)), np.zeros((1, 2, 3), bool))


def test_f1_max_is_the_best_threshold():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    # threshold 0.35: tp 3, fp 1, fn 0 -> F1 6/7 (the best); threshold 0.8: tp 2, fp 0, fn 1 -> 0.8
    assert f1_max(y, s) == pytest.approx(6 / 7)
    assert f1_max(np.zeros(3), s[:3]) is None


def test_grad_mobilenet_gradient_in_log_space_matches_autograd_and_survives_saturation():
    from defectscope.models.grad_mobilenet import gradient_norm, input_gradient, log10_gradient_norm

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.rand(2, 3, 8, 6)
    ref = torch.log10(gradient_norm(input_gradient(net, x, 1)).double() + 1e-300)
    got = log10_gradient_norm(net, x, 1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)  # eq. 2-3 exactly, as a logarithm
    with torch.no_grad():
        net[-1].bias[1] += 1e4  # a margin of 10^4 for class 1, as the overfit network gives: p_other underflows
    assert (input_gradient(net, x, 1) == 0).all()  # eq. 2 read literally: an all-zero map
    lg = log10_gradient_norm(net, x, 1)
    assert torch.isfinite(lg).all() and lg.std() > 0 and lg.max() < -1000  # still informative, about -4300


@pytest.mark.slow  # a few seconds: no backbone, 14 small real images
def test_a_model_added_by_its_class_and_the_registry_trains_predicts_and_exports_through_the_one_path(ksdd_root, tmp_path):
    """Adding a model touches its own module, the registry and a recipe naming it: ``ToyDarkness`` (defined in this
    test module; nothing in ``engine/`` or ``deploy/`` names it) is trained by ``defectscope.train`` on a recipe,
    loaded by ``defectscope.load`` (the one loader), predicted to a file, exported to ONNX and run there; its
    scores are the toy's formula on the real images (level fitted on the run's own ``split/fit.txt``)."""
    import csv
    from pathlib import Path

    import defectscope
    from defectscope.data.images import load_stack

    src = Path(defectscope.__file__).parent
    assert not any("toy_darkness" in f.read_text() for d in ("engine", "deploy") for f in (src / d).rglob("*.py"))
    run = defectscope.train({"task": "anomaly", "seed": 0,
                             "data": {"root": str(ksdd_root), "image_size": [96, 32], "calibration_fraction": 0.3,
                                      "max_fit": 6, "max_test": 6},
                             "model": {"name": "toy_darkness", "gain": 2.0},
                             "train": {"progress": False, "logger": []}}, tmp_path / "run")
    assert run.metrics["model"] == "toy_darkness" and run.metrics["test"]["n"] == 6
    listed = lambda name: [line.rsplit(",", 1)[0] for line in (run.path / "split" / name).read_text().splitlines()]
    fit, test = listed("fit.txt"), listed("test.txt")
    level = 2.0 * (1 - load_stack(fit, (96, 32)).mean() / 255.0)
    expected = (2.0 * (1 - load_stack(test, (96, 32)).astype(np.float64).mean(1) / 255.0) - level).reshape(len(test), -1).max(1)

    p = defectscope.load(run.path, threads=1)
    assert p.info.model_name == "toy_darkness" and p.info.model_kwargs["gain"] == 2.0
    got = p.predict(test)
    np.testing.assert_allclose([r.score for r in got], expected, rtol=1e-5, atol=1e-5)
    thr = p.info.thresholds["pred_score"]
    assert [r.label for r in got] == ["defective" if s > thr else "normal" for s in expected]
    assert got[0].anomaly_map.shape == (96, 32)

    out = tmp_path / "preds.csv"
    assert defectscope.predict(run.path, test[:2], out)["predicted"] == 2
    assert [float(r["score"]) for r in csv.DictReader(out.open())] == pytest.approx(expected[:2], abs=1e-5)
    onnx_file = tmp_path / "toy.onnx"
    defectscope.export(run.path, onnx_file)
    q = defectscope.load(onnx_file, threads=1)
    np.testing.assert_allclose([r.score for r in q.predict(test)], expected, rtol=1e-5, atol=1e-5)
