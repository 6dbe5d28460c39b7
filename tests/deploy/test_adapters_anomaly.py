"""Anomaly deployed end to end: a tiny run trained through the CLI on real KolektorSDD images (Grad-MobileNet
with PatchCore beside it); PatchCore exported with its nearest-neighbour search in the ONNX graph, ONNX
Runtime vs PyTorch (and vs PatchCore.forward) on the run's real held-out images, served over HTTP, the heat
map on the page in Chromium; Grad-MobileNet refused by export with the reason and run on PyTorch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from task_helpers import REPO, page_screenshot, png_array, post_image, train_cli

from defectscope.deploy.adapters import DeployError
from defectscope.deploy.predictor import load_predictor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def an_run(tmp_path_factory, ksdd_root):
    out = tmp_path_factory.mktemp("anomaly") / "run"
    return train_cli(REPO / "configs" / "ksdd_gradmobilenet.yaml", out, [
        f"data.root={ksdd_root}", "data.image_size=[96,32]", "data.calibration_fraction=0.3", "data.max_fit=6",
        "data.max_test=6", "model.grid=[3,1]", "model.bins=4", "model.grad_batch_size=6", "peer.max_patches=500",
        "peer.coreset_ratio=0.1", "peer.image_size=[128,64]", "clustering.enabled=false", "train.epochs=1",
        "train.batch_size=3", "train.progress=false", "train.logger=[]"])


@pytest.fixture(scope="module")
def an_onnx(an_run):
    from defectscope.deploy.export import export_onnx

    out = an_run / "deploy" / "patchcore.onnx"
    export_onnx(an_run, out)
    return out


@pytest.fixture(scope="module")
def predictors(an_run, an_onnx):
    return load_predictor(an_run, threads=1), load_predictor(an_onnx, threads=1)


def test_patchcore_exports_with_the_memory_bank_in_the_graph(an_onnx, an_run):
    from defectscope.engine.run import RunFolder

    model = onnx.load(str(an_onnx))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key != "defectscope.format"}
    payload = RunFolder(an_run).load_model_payload()
    assert meta["defectscope.task"] == "anomaly" and meta["defectscope.model_name"] == "patchcore"
    assert meta["defectscope.input_size"] == [128, 64] and meta["defectscope.outputs"] == ["anomaly_map", "image_score"]
    assert meta["defectscope.thresholds"]["image_score"] == pytest.approx(payload["peer"]["threshold"])
    bank = payload["peer"]["state_dict"]["memory_bank"].numpy()
    consts = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    assert any(c.shape == bank.shape and np.array_equal(c, bank) for c in consts)  # the bank is a graph constant
    assert meta["defectscope.memory_bank"] == len(bank)


def test_onnx_matches_pytorch_and_patchcore_forward_on_real_images(predictors, an_run, an_onnx):
    from defectscope.engine.run import RunFolder
    from defectscope.models import create_model

    tp, op = predictors
    ev = op.adapter.eval_set(an_run, op.info)
    assert ev.inputs["image"].shape == (6, 3, 128, 64) and set(ev.targets) == {0, 1}
    a, b = tp.run(ev.inputs), op.run(ev.inputs)
    assert np.abs(a["image_score"] - b["image_score"]).max() <= 1e-4
    diff, same = op.adapter.compare(op.info, a, b)
    assert same == 1.0 and diff <= 1e-3 * float(a["anomaly_map"].max())
    from defectscope.deploy.benchmark import openvino_runner

    ov = openvino_runner(an_onnx, threads=1)(ev.inputs)
    assert np.abs(ov["image_score"] - b["image_score"]).max() <= 1e-4
    payload = RunFolder(an_run).load_model_payload()
    pc = create_model("patchcore", **payload["peer"]["model_kwargs"])
    pc.load_state_dict(payload["peer"]["state_dict"])
    scores, maps = pc.eval()(torch.from_numpy(ev.inputs["image"]))
    np.testing.assert_allclose(b["image_score"], scores.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(b["anomaly_map"], maps.numpy(), rtol=1e-4, atol=1e-3)
    name, auc = op.adapter.score(op.info, b, ev.targets)
    assert name == "image AUROC %" and 0 <= auc <= 100


def test_grad_mobilenet_is_refused_by_export_and_runs_on_pytorch(an_run, tmp_path, ksdd_root):
    from defectscope.deploy.export import export_onnx

    with pytest.raises(DeployError, match="backward pass"):
        export_onnx(an_run, tmp_path / "grad.onnx", member="grad_mobilenet")
    assert not (tmp_path / "grad.onnx").exists()
    g = load_predictor(an_run, threads=1, member="grad_mobilenet")
    assert g.info.model_name == "grad_mobilenet" and g.adapter.onnx_unsupported(g.info)
    f = ksdd_root / "images" / "325.jpg"
    ans = g.predict([f, f])  # two copies in one batch: the same answer (per-image loss gradient)
    assert ans[0]["member"] == "grad_mobilenet" and np.isfinite(ans[0]["score"])
    assert ans[0]["class"] == ("defective" if ans[0]["score"] > 0 else "normal")
    assert abs(ans[0]["score"] - ans[1]["score"]) < 1e-5 and ans[0]["map_max"] > 0
    from defectscope.data.images import load_image

    assert png_array(ans[0]["overlay_png"]).shape == load_image(f).shape
    with pytest.raises(DeployError, match="one model"):
        load_predictor(an_run.parent / "x.onnx", member="patchcore")


def test_served_over_http_with_the_heat_map(predictors, ksdd_root):
    _, op = predictors
    f = ksdd_root / "images" / "325.jpg"
    body = post_image(op, f)
    from defectscope.data.images import load_image

    h, w = load_image(f).shape[:2]
    assert body["class"] in ("normal", "defective") and body["member"] == "patchcore"
    assert body["class"] == ("defective" if body["score"] > body["threshold"] else "normal")
    assert 0 < body["map_max"] < 10 * body["score"] and body["map_scale"] == pytest.approx(2 * body["threshold"])
    assert png_array(body["overlay_png"]).shape == (h, w, 3)


def test_page_shows_the_anomaly_heat_map(predictors, ksdd_root, tmp_path):
    _, op = predictors
    texts = page_screenshot(op, ksdd_root / "images" / "325.jpg", tmp_path / "anomaly.png",
                            ("overlay", "map-info", "threshold"))
    assert texts["overlay"] == "anomaly heat map" and texts["predicted-class"] in ("normal", "defective")
    assert "patchcore" in texts["threshold"] and "anomaly map" in texts["map-info"]
