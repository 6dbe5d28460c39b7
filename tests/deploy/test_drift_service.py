"""The drift alarm in the service: a classification run stores a reference; /v1/drift watches the stream."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.deploy.predictor import load_predictor
from defectscope.deploy.service import create_app
from defectscope.engine.run import RunFolder


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory, neu_root):
    root = tmp_path_factory.mktemp("neu30")
    for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"):
        for i in range(1, 31):
            (root / f"{c}_{i}.jpg").symlink_to(neu_root / "images" / f"{c}_{i}.jpg")
    r = tmp_path_factory.mktemp("cfg") / "r.yaml"
    r.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(root), "image_size": 64},
                                 "model": {"name": "classifier", "backbone": "efficientnet_lite0", "pretrained": True,
                                           "linear_probe_reference": False},
                                 "train": {"epochs": 1, "batch_size": 16, "precision": "32", "logger": ["csv"],
                                           "val_fraction": 0.5, "progress": False}}))
    out = tmp_path_factory.mktemp("runs") / "run"
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def _post(client, path):
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    r = client.post("/v1/predict", files={"file": (path.name, buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_run_stores_a_drift_reference(drift_run):
    from defectscope.deploy.drift import DriftAlarm

    _, payload = RunFolder(drift_run).load_model()
    alarm = DriftAlarm.from_dict(payload["drift_reference"])
    assert alarm.window == 32 and alarm.alpha == 0.001 and set(alarm.channels) == {"features", "image_statistics"}
    feats, stats = alarm.channels["features"], alarm.channels["image_statistics"]
    assert feats.dim == 1280 and stats.dim == 3 and feats.threshold > 0 and stats.threshold > 0
    assert feats.alpha == stats.alpha == pytest.approx(0.0005)


def test_in_distribution_images_keep_quiet_and_another_product_raises_the_alarm(drift_run, neu_root, ksdd_root):
    client = TestClient(create_app(load_predictor(drift_run)))
    assert client.get("/v1/drift").json()["status"] == "filling"
    held_out = [neu_root / "images" / f"{c}_{i}.jpg" for i in range(200, 208)
                for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")]
    states = [_post(client, p)["drift"] for p in held_out]
    assert states[-1]["n_seen"] == 48 and states[-1]["status"] in ("ok", "drift")
    assert sum(s["alarm"] for s in states) == 0, [round(s["ratio"] or 0, 3) for s in states]
    ksdd = sorted((ksdd_root / "images").glob("*.jpg"))[:32]
    states = [_post(client, p)["drift"] for p in ksdd]
    assert states[-1]["alarm"] and states[-1]["ratio"] > 1 and states[-1]["triggered_by"]
    d = client.get("/v1/drift").json()
    assert d["alarm"] and d["n_alarms"] >= 1 and "MMD" in d["statistic_kind"]


def test_darkened_images_raise_the_alarm_at_the_first_full_window(drift_run, neu_root):
    """The same held-out NEU images at 60 % brightness: the image-statistics channel fires."""
    client = TestClient(create_app(load_predictor(drift_run)))
    held_out = [neu_root / "images" / f"{c}_{i}.jpg" for i in range(200, 208)
                for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")][:32]
    states = []
    for p in held_out:
        img = np.round(np.asarray(Image.open(p).convert("RGB"), np.float32) * 0.6).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        r = client.post("/v1/predict", files={"file": (p.name, buf.getvalue(), "image/png")})
        assert r.status_code == 200, r.text
        states.append(r.json()["drift"])
    assert [s["status"] for s in states[:31]] == ["filling"] * 31
    assert states[-1]["alarm"] and "image_statistics" in states[-1]["triggered_by"], states[-1]
    d = client.get("/v1/drift").json()
    assert d["alarm"] and d["channels"]["image_statistics"]["ratio"] > 1


def test_the_onnx_export_carries_features_and_the_reference(drift_run, tmp_path, neu_root):
    res = CliRunner().invoke(app, ["export", str(drift_run), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    onnx = load_predictor(tmp_path / "m.onnx")
    torch_p = load_predictor(drift_run)
    assert onnx.info.outputs == ["logits", "probabilities", "features"] and "drift_reference" in onnx.info.extra
    img = np.asarray(Image.open(neu_root / "images" / "crazing_250.jpg").convert("RGB"))
    a = onnx.predict([img], with_features=True)[0]
    b = torch_p.predict([img], with_features=True)[0]
    np.testing.assert_allclose(a["features"], b["features"], atol=1e-3)
    assert abs(a["score"] - b["score"]) < 1e-4


def test_inspect_scans_the_archive_in_path_order_and_finds_the_darkened_folder(drift_run, tmp_path, neu_root):
    """``inspect`` on Ray: 64 held-out NEU images in ``a_line/``, then the same 32 first ones darkened
    by 40 % in ``b_line/``: the two windows of ``a_line`` stay quiet, the ``b_line`` window alarms."""
    from defectscope.deploy.inspect import inspect_archive

    held_out = [neu_root / "images" / f"{c}_{i}.jpg" for i in range(200, 211)
                for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")][:64]
    (tmp_path / "a_line").mkdir()
    (tmp_path / "b_line").mkdir()
    for k, p in enumerate(held_out):
        (tmp_path / "a_line" / f"{k:03d}.jpg").symlink_to(p)
        if k < 32:
            img = np.round(np.asarray(Image.open(p).convert("RGB"), np.float32) * 0.6).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "b_line" / f"{k:03d}.png")
    (tmp_path / "b_line" / "notes.txt").write_text("not an image")  # skipped by the folder walk
    out = tmp_path / "preds.parquet"
    res = inspect_archive(drift_run, [tmp_path / "a_line", tmp_path / "b_line"], out, workers=1, threads=1)
    assert res.rows == 96 and res.errors == 0
    d = res.summary["drift"]
    assert (d["windows"], d["alarms"], d["first_alarm_window"], d["images_not_tested"]) == (3, 1, 2, 0), d
    assert "/b_line/000.png" in d["first_alarm"]["first"] and "image_statistics" in d["first_alarm"]["triggered_by"]
    # 200 random windows mix the quiet and the darkened folder (a third of each window is dark on
    # average): far more of them alarm than the 0.1 % of an in-distribution archive (measured: 44 %)
    assert d["random"]["windows"] == 200 and d["random"]["rate"] > 100 * d["random"]["alpha"], d["random"]
    report = json.loads((tmp_path / "preds.parquet.drift.json").read_text())
    assert [bool(w["triggered_by"]) for w in report["per_window"]] == [False, False, True]
    import pyarrow.parquet as pq

    col = pq.read_table(out).column("drift_coordinates").to_pylist()
    assert len(col) == 96 and all(len(c) == 35 for c in col)
