"""Weld task end to end: a hand-written real-format folder trains and predicts; the demo on a tiny simulated set."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import defectscope
from defectscope.cli import app
from defectscope.config import validate
from defectscope.data.weld import WeldDataError
from defectscope.engine.pipeline import train
from defectscope.engine.tasks import get_task

TINY = ["-o", "train.epochs=1", "-o", "segmentation.epochs=1", "-o", "data.crop_height=32", "-o", "data.crop_width=64",
        "-o", "data.seg_size=64", "-o", "data.simulate.image_size=64", "-o", "train.logger=[csv]", "-o", "train.progress=false",
        "-o", "model.embed_dim=32", "-o", "model.spectral_dim=16", "-o", "data.seq_len=64"]


def _hand_written_folder(root, n_per_class=4, with_labels=True):
    """Two classes, 2 welds per coupon, 3 channels (400/800/1300 nm): 'hot' welds are brighter and emit more."""
    for d in ("images", "masks", "spectra"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    samples = []
    for i in range(2 * n_per_class):
        label = ["cold", "hot"][i % 2]
        sid = f"coupon_{i:02d}"
        img = rng.integers(60, 90, (64, 96), dtype=np.uint8)
        mask = np.zeros((64, 96), np.uint8)
        for yc in (16, 48):
            mask[yc - 3 : yc + 3, 10:86] = 255
        img[mask > 0] = 230 if label == "hot" else 150
        Image.fromarray(img).save(root / "images" / f"{sid}.png")
        Image.fromarray(mask).save(root / "masks" / f"{sid}.png")
        welds = []
        for k in range(2):
            t = np.linspace(0, 1, 90 + 10 * k)
            level = 2.0 if label == "hot" else 1.0
            arr = np.stack([level * (1 + 0.1 * np.sin(40 * t)), level * np.ones_like(t), rng.random(t.size)]) + rng.normal(0, 0.05, (3, t.size))
            np.save(root / "spectra" / f"{sid}_w{k}.npy", arr.astype(np.float64))
            welds.append({"spectra": f"spectra/{sid}_w{k}.npy"})
        entry = {"id": sid, "image": f"images/{sid}.png", "mask": f"masks/{sid}.png", "welds": welds}
        if with_labels:
            entry["label"] = label
        samples.append(entry)
    (root / "manifest.json").write_text(json.dumps({
        "format": "defectscope-weld/1", "classes": ["cold", "hot"], "welds_per_sample": 2,
        "wavelengths_nm": [400, 800, 1300], "sample_rate_hz": 20000, "samples": samples}))
    return root


def test_real_format_round_trip_trains_and_predicts(tmp_path):
    data = _hand_written_folder(tmp_path / "welds")
    task = get_task("weld")
    raw = {"task": "weld", "data": {"root": str(data), "seq_len": 64, "crop_height": 32, "crop_width": 64, "seg_size": 64,
                                     "test_fraction": 0.25},
           "segmentation": {"epochs": 2, "batch_size": 4},
           "model": {"name": "weld_fusion", "embed_dim": 32, "spectral_dim": 16, "num_channels": 2, "pretrained": True},
           "train": {"epochs": 1, "batch_size": 4, "logger": ["csv"], "progress": False},
           "eval": {"folds": 1}}  # 8 samples would be cross-validated by default; this test checks the single split
    recipe = validate(raw, task.recipe, "test")
    run = tmp_path / "run"
    result = train(recipe, run)
    assert result["synthetic"] is False and result["test"]["n"] == 2
    assert len(result["selected_channels"]) == 2 and result["selected_wavelengths_nm"][0] < 1000 <= result["selected_wavelengths_nm"][1]
    assert 0.0 <= result["test"]["seam_dice"] <= 1.0
    for f in ("model.ckpt", "metrics.json", "report.html", "plots/confusion_matrix.png", "plots/channel_correlation.png",
              "plots/attention_overlays.png", "plots/seam_segmentation.png"):
        assert (run / f).is_file(), f
    assert "SYNTHETIC" not in (run / "report.html").read_text()
    # prediction on an unlabelled folder in the same format
    unlabelled = _hand_written_folder(tmp_path / "new", n_per_class=2, with_labels=False)
    out = tmp_path / "preds.csv"
    summary = defectscope.predict(run, [unlabelled], out)
    rows = list(csv.DictReader(out.open()))
    assert summary["predicted"] == 4 and len(rows) == 4
    for r in rows:
        probs = [float(r["prob_cold"]), float(r["prob_hot"])]
        assert abs(sum(probs) - 1) < 1e-4 and r["class"] in ("cold", "hot")
    # a folder with other wavelengths is refused with a clear message
    man = json.loads((unlabelled / "manifest.json").read_text())
    man["wavelengths_nm"] = [400, 800, 1400]
    (unlabelled / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(WeldDataError, match="wavelengths_nm"):
        defectscope.predict(run, [unlabelled], out)


def test_demo_end_to_end_on_a_tiny_simulated_set(tmp_path):
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--out", str(out), "-n", "35", *TINY])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic"] is True and metrics["task"] == "weld"
    assert metrics["split"]["test"] == 7 and len(metrics["test"]["per_class"]) == 7
    assert len(metrics["selected_wavelengths_nm"]) == 4
    html = (out / "report.html").read_text()
    assert "SYNTHETIC DATA" in html and "Table 4 layout" in html
    for f in ("confusion_matrix.png", "channel_correlation.png", "attention_overlays.png", "seam_segmentation.png"):
        assert (out / "plots" / f).is_file()
    pred = tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["predict", str(out), str(out / "data"), "--out", str(pred)])
    assert res.exit_code == 0, res.output
    assert len(pred.read_text().strip().splitlines()) == 36
