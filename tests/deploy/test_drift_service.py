"""The drift alarm in the service: a classification run stores a reference; /v1/drift watches the stream."""

from __future__ import annotations

import io

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
    from defectscope.deploy.drift import DriftReference

    _, payload = RunFolder(drift_run).load_model()
    ref = DriftReference.from_dict(payload["drift_reference"])
    assert ref.window == 32 and ref.alpha == 0.001 and ref.dim == 1280 and ref.threshold > 0


def test_in_distribution_images_keep_quiet_and_another_product_raises_the_alarm(drift_run, neu_root, ksdd_root):
    client = TestClient(create_app(load_predictor(drift_run)))
    assert client.get("/v1/drift").json()["status"] == "filling"
    held_out = [neu_root / "images" / f"{c}_{i}.jpg" for i in range(200, 208)
                for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")]
    states = [_post(client, p)["drift"] for p in held_out]
    assert states[-1]["n_seen"] == 48 and states[-1]["status"] in ("ok", "drift")
    assert sum(s["alarm"] for s in states) == 0, [round(s["statistic"] or 0, 4) for s in states]
    ksdd = sorted((ksdd_root / "images").glob("*.jpg"))[:32]
    states = [_post(client, p)["drift"] for p in ksdd]
    assert states[-1]["alarm"] and states[-1]["statistic"] > states[-1]["threshold"]
    d = client.get("/v1/drift").json()
    assert d["alarm"] and d["n_alarms"] >= 1 and "MMD" in d["statistic_kind"]


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
