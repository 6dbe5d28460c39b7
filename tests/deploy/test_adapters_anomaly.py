"""Anomaly deployed end to end: tiny runs trained through the CLI on real KolektorSDD images; the run's model
itself (one loader, one forward) exported to ONNX with its nearest-neighbour search / Mahalanobis distances in
the graph; the same images through ``predict``, ONNX Runtime and ``serve`` give the same scores (parity, max
|diff| printed); Grad-MobileNet refused by export with the reason and run on PyTorch."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
from task_helpers import REPO, page_screenshot, png_array, post_image, train_cli

from defectscope.deploy.adapters import DeployError
from defectscope.deploy.predictor import load_predictor

pytestmark = pytest.mark.slow

COMMON = ["data.image_size=[128,64]", "data.calibration_fraction=0.3", "data.max_fit=6", "data.max_test=6",
          "train.progress=false", "train.logger=[]"]
RUNS = {
    # PatchCore in overlapping 64 x 64 windows (stride 32): the stitched map is in the exported graph too
    "patchcore": ("ksdd_patchcore.yaml", ["model.coreset_ratio=0.1", "model.patches_per_image=50",
                                          "model.tile=[64,64]", "model.tile_stride=[32,32]", "model.score_border=0"]),
    "padim": ("ksdd_padim.yaml", ["model.n_features=20"]),
    "student_teacher": ("ksdd_student_teacher.yaml", ["model.steps=3", "model.train_batch=2", "model.score_border=0"]),
    # PaDiM + PatchCore at its own 64 x 32 (resized inside the graph), standardised on the calibration images
    "ensemble": ("ksdd_ensemble.yaml", ["model.members=[{name: padim, n_features: 20}, {name: patchcore, "
                                        "image_size: [64, 32], coreset_ratio: 0.1, patches_per_image: 50}]"]),
}
#: a fitted tensor of each model that the exported graph must hold as a constant
FITTED = {"patchcore": "memory_bank", "padim": "inv_cov", "student_teacher": "student.net.0.weight",
          "ensemble": "members.0.inv_cov"}


@pytest.fixture(scope="module", params=list(RUNS))
def run_and_onnx(request, tmp_path_factory, ksdd_root):
    from defectscope.deploy.export import export_onnx

    recipe, extra = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param) / "run"
    train_cli(REPO / "configs" / recipe, out, [f"data.root={ksdd_root}", *COMMON, *extra])
    onnx_path = out / "deploy" / "model.onnx"
    export_onnx(out, onnx_path)
    return request.param, out, onnx_path


def test_export_holds_the_fitted_statistics_and_the_run_metadata(run_and_onnx):
    from defectscope.engine.run import RunFolder

    name, run, path = run_and_onnx
    model = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key != "defectscope.format"}
    payload = RunFolder(run).load_model_payload()
    assert meta["defectscope.task"] == "anomaly" and meta["defectscope.model_name"] == name
    assert meta["defectscope.input_size"] == [128, 64] and meta["defectscope.outputs"] == ["pred_score", "anomaly_map"]
    assert meta["defectscope.thresholds"]["pred_score"] == pytest.approx(payload["threshold"])
    key = FITTED[name]
    stat = payload["state_dict"][key].numpy()
    consts = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    # a constant of the graph (the exporter may fold PatchCore's bank.T into a transposed copy)
    assert any(np.array_equal(c, stat) or (c.ndim == 2 and np.array_equal(c.T, stat)) for c in consts)


def test_predict_onnx_runtime_and_serve_give_the_same_scores(run_and_onnx, tmp_path, capsys):
    """Parity: the run's test images through ``defectscope predict`` (PyTorch, the task's path), the ONNX file
    under ONNX Runtime and the HTTP service (PyTorch predictor of the run folder): max |difference| of the
    scores within 1e-4 of their scale, identical decisions."""
    from typer.testing import CliRunner

    from defectscope.cli import app

    name, run, path = run_and_onnx
    files = [line.rsplit(",", 1)[0] for line in (run / "split" / "test.txt").read_text().splitlines()]
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", str(run), *files, "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["file"]: r for r in csv.DictReader(out.open())}
    s_predict = np.array([float(rows[f]["score"]) for f in files])
    tp, op = load_predictor(run, threads=1), load_predictor(path, threads=1)
    ev = op.adapter.eval_set(run, op.info)
    assert [str(f) for f in ev.files] == [str(type(ev.files[0])(f)) for f in files]
    a, b = tp.run(ev.inputs), op.run(ev.inputs)
    served = np.array([post_image(tp, type(ev.files[0])(f))["score"] for f in files[:3]])
    scale = float(np.abs(s_predict).max())
    d_onnx = float(np.abs(b["pred_score"] - s_predict).max())
    d_torch = float(np.abs(a["pred_score"] - s_predict).max())
    d_serve = float(np.abs(served - s_predict[:3]).max())
    d_map = float(np.abs(a["anomaly_map"] - b["anomaly_map"]).max())
    with capsys.disabled():
        print(f"\n[parity {name}] max |diff| of scores vs predict: ONNX Runtime {d_onnx:.2e}, PyTorch predictor "
              f"{d_torch:.2e}, served {d_serve:.2e} (score scale {scale:.3g}); maps ONNX vs PyTorch {d_map:.2e}")
    assert max(d_onnx, d_torch, d_serve) <= 1e-4 * scale
    assert d_map <= 1e-4 * float(np.abs(a["anomaly_map"]).max())
    thr = op.info.thresholds["pred_score"]
    assert ((b["pred_score"] > thr) == np.array([rows[f]["decision"] == "defective" for f in files])).all()
    _, same = op.adapter.compare(op.info, a, b)
    assert same == 1.0


def test_served_over_http_with_the_heat_map(run_and_onnx, ksdd_root):
    name, run, path = run_and_onnx
    op = load_predictor(path, threads=1)
    f = ksdd_root / "images" / "325.jpg"
    body = post_image(op, f)
    from defectscope.data.images import load_image

    h, w = load_image(f).shape[:2]
    assert body["class"] in ("normal", "defective") and body["member"] == name
    assert body["class"] == ("defective" if body["score"] > body["threshold"] else "normal")
    assert body["map_max"] > 0 and body["map_scale"] == pytest.approx(2 * body["threshold"])
    assert png_array(body["overlay_png"]).shape == (h, w, 3)


def test_page_shows_the_anomaly_heat_map(run_and_onnx, ksdd_root, tmp_path):
    name, run, path = run_and_onnx
    if name != "patchcore":
        pytest.skip("one page check is enough")
    texts = page_screenshot(load_predictor(path, threads=1), ksdd_root / "images" / "325.jpg",
                            tmp_path / "anomaly.png", ("overlay", "map-info", "threshold"))
    assert texts["overlay"] == "anomaly heat map" and texts["predicted-class"] in ("normal", "defective")
    assert "patchcore" in texts["threshold"] and "anomaly map" in texts["map-info"]


def test_grad_mobilenet_is_refused_by_export_and_runs_on_pytorch(tmp_path, ksdd_root):
    from defectscope.deploy.export import export_onnx

    run = train_cli(REPO / "configs" / "ksdd_gradmobilenet.yaml", tmp_path / "grad", [
        f"data.root={ksdd_root}", *COMMON, "model.grid=[3,1]", "model.bins=4", "model.grad_batch_size=6",
        "clustering.enabled=false", "train.epochs=1", "train.batch_size=3"])
    with pytest.raises(DeployError, match="backward pass"):
        export_onnx(run, tmp_path / "grad.onnx")
    assert not (tmp_path / "grad.onnx").exists()
    g = load_predictor(run, threads=1)
    assert g.info.model_name == "grad_mobilenet" and g.adapter.onnx_unsupported(g.info)
    f = ksdd_root / "images" / "325.jpg"
    ans = g.predict([f, f])  # two copies in one batch: the same answer (per-image loss gradient)
    assert ans[0]["member"] == "grad_mobilenet" and np.isfinite(ans[0]["score"])
    assert ans[0]["class"] == ("defective" if ans[0]["score"] > 0 else "normal")
    assert abs(ans[0]["score"] - ans[1]["score"]) < 1e-5 and np.isfinite(ans[0]["map_max"])  # a log10 map
    from defectscope.data.images import load_image

    assert png_array(ans[0]["overlay_png"]).shape == load_image(f).shape
    with pytest.raises(DeployError, match="holds anomaly model 'grad_mobilenet', not 'patchcore'"):
        load_predictor(run, member="patchcore")
