"""Weld fusion deployed end to end: a tiny run trained through the CLI on a simulated weld set (fixed
bands), exported to ONNX (two inputs: weld crops and selected signals), ONNX Runtime vs PyTorch on the
run's held-out samples, the adapter's probabilities vs ``defectscope predict`` on the same samples, one
HTTP request with an image and a .npy signals file; a run with a seam U-Net serves from its run folder
and its export is refused with the reason."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import onnx
import pytest
from PIL import Image
from task_helpers import REPO, page_screenshot, png_array, train_cli
from typer.testing import CliRunner

from defectscope.data.weld.format import read_weld_dataset
from defectscope.deploy.adapters import DeployError, get_adapter
from defectscope.deploy.predictor import load_predictor

pytestmark = pytest.mark.slow

TINY = ["data.simulate.n_samples=140", "train.val_fraction=0.4", "data.simulate.image_size=64", "train.epochs=1", "data.crop_height=32",
        "data.crop_width=64", "data.seq_len=64", "data.seg_size=64", "model.embed_dim=32", "model.spectral_dim=16",
        "segmentation.epochs=1", "train.logger=[csv]", "train.progress=false", "eval.folds=1", "train.num_threads=1"]


@pytest.fixture(scope="module")
def weld_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("weld") / "run"
    return train_cli(REPO / "configs" / "weld_fusion.yaml", out, TINY + ["segmentation.enabled=false"])


@pytest.fixture(scope="module")
def weld_onnx(weld_run):
    from defectscope.deploy.export import export_onnx

    out = weld_run / "deploy" / "model.onnx"
    export_onnx(weld_run, out)
    return out


@pytest.fixture(scope="module")
def predictors(weld_run, weld_onnx):
    return load_predictor(weld_run, threads=1), load_predictor(weld_onnx, threads=1)


def _held_out(run):
    """``(dataset, held-out samples in split order)`` as the engine reads them (T = 64)."""
    ds = read_weld_dataset(run / "data", 64)
    by_id = {s.id: s for s in ds.samples}
    ids = [line.split(",")[0] for line in (run / "split" / "test.txt").read_text().splitlines() if line]
    return ds, [by_id[i] for i in ids]


def test_export_metadata(weld_onnx):
    model = onnx.load(str(weld_onnx))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props if p.key != "defectscope.format"}
    assert meta["defectscope.task"] == "weld" and meta["defectscope.model_name"] == "weld_fusion"
    assert [i.name for i in model.graph.input] == ["image", "spectra"]
    assert meta["defectscope.inputs"] == {"image": [2, 3, 32, 64], "spectra": [2, 4, 64]}
    assert meta["defectscope.spectra_shape"] == [2, 32, 64]  # 2 welds, the simulator's 32 channels, T
    sel = meta["defectscope.spectral_channels"]
    assert len(sel) == 4 and [c["index"] for c in sel] == meta["defectscope.selected_channels"]
    assert sum(c["wavelength_nm"] < 1000 for c in sel) == 2  # the paper's 2 VIS + 2 NIR
    assert meta["defectscope.thresholds"]["temperature"] > 0 and meta["defectscope.thresholds"]["decision"]["ok_class"] == "baseline"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnx_matches_pytorch_on_held_out_samples(predictors, weld_run):
    torch_p, onnx_p = predictors
    ad = get_adapter("weld")
    ev = ad.eval_set(weld_run, torch_p.info)
    assert ev.inputs["image"].shape == (28, 2, 3, 32, 64) and ev.inputs["spectra"].shape == (28, 2, 4, 64)  # the 20 % test split of 140 simulated coupons
    ref, got = torch_p.run(ev.inputs), onnx_p.run(ev.inputs)
    diff, same = ad.compare(torch_p.info, ref, got)
    assert diff < 1e-4 and same == 1.0
    np.testing.assert_allclose(got["probabilities"].sum(1), 1.0, atol=1e-5)
    name, acc = ad.score(onnx_p.info, got, ev.targets)
    assert name == "accuracy %" and 0 <= acc <= 100


def test_adapter_agrees_with_defectscope_predict(predictors, weld_run, tmp_path):
    """The CLI's probabilities (engine: crops, channel selection, min-max, temperature) equal the deployed
    models' on the same held-out samples (images and signals as read from the folder), and so do the decisions."""
    from defectscope.cli import app

    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", str(weld_run), str(weld_run / "data"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    _, samples = _held_out(weld_run)
    for p in predictors:
        answers = p.predict([s.image for s in samples], [s.spectra for s in samples])
        for s, a in zip(samples, answers):
            row = rows[s.id]
            for c in p.info.class_names:
                assert abs(a["probabilities"][c] - float(row[f"prob_{c}"])) < 2e-6, (p.backend, s.id, c)
            assert a["class"] == row["class"] and a["decision"] == row["decision"]
            assert abs(a["defect_score"] - float(row["defect_score"])) < 2e-6


def test_attention_outputs_match_pytorch_and_map_onto_the_welds(predictors, weld_run):
    """The v2s cross-attention weights are graph outputs: ONNX Runtime equals PyTorch on the held-out
    samples within 1e-4; channel weights sum to 1; the heat map is blended inside the weld boxes only."""
    from defectscope.data.weld.prepare import weld_boxes

    torch_p, onnx_p = predictors
    assert onnx_p.output_names == ["logits", "probabilities", "attention_map", "channel_attention"]
    att = onnx_p.info.extra["attention"]
    assert att["kind"] == "v2s" and len(att["grid"]) == 2
    ev = get_adapter("weld").eval_set(weld_run, torch_p.info)
    ref, got = torch_p.run(ev.inputs), onnx_p.run(ev.inputs)
    for k in ("logits", "probabilities", "attention_map", "channel_attention"):
        assert ref[k].shape == got[k].shape, k
        assert float(np.abs(ref[k] - got[k]).max()) < 1e-4, k
    assert got["attention_map"].shape == (28, 2, *att["grid"])
    np.testing.assert_allclose(got["channel_attention"].sum(-1), 1.0, atol=1e-5)
    assert (got["attention_map"] >= 1 / 4 - 1e-6).all() and (got["attention_map"] <= 1 + 1e-6).all()  # 4 channels

    _, samples = _held_out(weld_run)
    s = samples[0]
    a = onnx_p.predict([s.image], [s.spectra])[0]
    summary = a["attention"]
    assert set(summary["channels"]) == {c["name"] for c in onnx_p.info.extra["spectral_channels"]}
    assert summary["top_channel"] == max(summary["channels"], key=summary["channels"].get)
    assert summary["map_min"] <= min(summary["weld_peak"]) and max(summary["weld_peak"]) == summary["map_max"]
    overlay = png_array(a["overlay_png"])
    assert overlay.shape == s.image.shape
    inside = np.zeros(s.image.shape[:2], bool)
    for y0, y1, x0, x1, _ in weld_boxes(s.image.shape, None, 2, (32, 64)):
        inside[y0:y1, x0:x1] = True
    assert (overlay[~inside] == s.image[~inside]).all() and (overlay[inside] != s.image[inside]).any()


def test_page_shows_weld_class_and_attention_map(predictors, weld_run, tmp_path):
    """Headless Chromium: the signals file is chosen in the page's signals field, the image uploaded; the
    page shows the class the service returns and the attention heat map with its numbers."""
    _, onnx_p = predictors
    _, samples = _held_out(weld_run)
    s = samples[0]
    img, npy = tmp_path / f"{s.id}.png", tmp_path / f"{s.id}.npy"
    Image.fromarray(s.image).save(img)
    np.save(npy, s.spectra)
    expected = onnx_p.predict([s.image], [s.spectra])[0]
    texts = page_screenshot(onnx_p, img, tmp_path / "weld_page.png", ("overlay", "attention-info", "decision"), spectra=npy)
    assert texts["predicted-class"] == expected["class"]
    assert texts["overlay"] == "attention map"
    assert texts["attention-info"].startswith("attention map (v2s cross-attention")
    assert expected["attention"]["top_channel"] in texts["attention-info"]


def test_signals_of_another_length_are_resampled_and_bad_shapes_refused(predictors, weld_run):
    _, onnx_p = predictors
    _, samples = _held_out(weld_run)
    s = samples[0]
    # the same series at twice the rate (linear interpolation is exact on the doubled grid's even points)
    fine = np.stack([[np.interp(np.linspace(0, 1, 127), np.linspace(0, 1, 64), row) for row in w] for w in s.spectra])
    a, b = onnx_p.predict([s.image, s.image], [s.spectra, fine])
    assert a["class"] == b["class"]
    with pytest.raises(DeployError, match=r"expects \[2, 32\]"):
        onnx_p.predict([s.image], [s.spectra[:, :31]])
    with pytest.raises(DeployError, match="needs the weld signals"):
        onnx_p.predict([s.image])


def test_http_request_with_image_and_npy_signals(predictors, weld_run):
    from fastapi.testclient import TestClient

    from defectscope.deploy.service import create_app

    _, onnx_p = predictors
    _, samples = _held_out(weld_run)
    s = samples[0]
    png, npy = io.BytesIO(), io.BytesIO()
    Image.fromarray(s.image).save(png, format="PNG")
    np.save(npy, s.spectra)
    expected = onnx_p.predict([s.image], [s.spectra])[0]
    with TestClient(create_app(onnx_p)) as c:
        health = c.get("/healthz").json()
        assert health["model"]["task"] == "weld" and health["spectra_shape"] == [2, 32, 64]
        r = c.post("/v1/predict", files={"file": (f"{s.id}.png", png.getvalue(), "image/png"),
                                         "spectra": (f"{s.id}.npy", npy.getvalue(), "application/octet-stream")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["class"] == expected["class"] and body["decision"] in ("accept", "reject")
        for k, v in expected["probabilities"].items():
            assert abs(body["probabilities"][k] - v) < 1e-6
        missing = c.post("/v1/predict", files={"file": (f"{s.id}.png", png.getvalue(), "image/png")})
        assert missing.status_code == 400 and missing.json()["error"] == "missing_spectra"


def test_seam_unet_run_serves_from_its_folder_and_refuses_onnx(tmp_path):
    from defectscope.cli import app
    from defectscope.deploy.export import export_onnx

    run = train_cli(REPO / "configs" / "weld_fusion.yaml", tmp_path / "run", TINY)
    with pytest.raises(DeployError, match="seam.*U-Net.*segmentation.enabled=false"):
        export_onnx(run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    p = load_predictor(run, threads=1)
    assert p.info.extra["seam_unet"] is True
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(app, ["predict", str(run), str(run / "data"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    _, samples = _held_out(run)
    for s, a in zip(samples, p.predict([s.image for s in samples], [s.spectra for s in samples])):
        for c in p.info.class_names:
            assert abs(a["probabilities"][c] - float(rows[s.id][f"prob_{c}"])) < 2e-6
