"""KolektorSDD protocol (fit on good train images only) and a tiny end-to-end anomaly run on real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import defectscope
from defectscope.data.images import DatasetError
from defectscope.data.kolektor import anomaly_protocol, load_mask, read_kolektor_manifest


def test_protocol_never_fits_on_a_defective_image(ksdd_root):
    items = read_kolektor_manifest(ksdd_root)
    rows = list(csv.DictReader((ksdd_root / "manifest.csv").open()))
    defective_ids = {r["id"] for r in rows if r["defective"] == "1"}
    for frac in (0.0, 0.15):
        parts = anomaly_protocol(items, calibration_fraction=frac, seed=3)
        fitting = parts["fit"] + parts["calibration"]
        assert not any(it.defective or it.id in defective_ids for it in fitting)
        assert all(it.split == "train" for it in fitting)
        ids = [it.id for it in parts["test"]]
        assert set(ids) == {r["id"] for r in rows if r["split"] == "val"} | {r["id"] for r in rows if r["split"] == "train" and r["defective"] == "1"}
        assert not set(ids) & {it.id for it in fitting}
        assert len(fitting) == sum(r["split"] == "train" and r["defective"] == "0" for r in rows)
    assert len(parts["calibration"]) == round(0.15 * len(fitting))
    assert sum(it.defective for it in parts["test"]) == len(defective_ids)


def test_manifest_errors_name_file_and_field(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("L", (8, 20)).save(tmp_path / "images" / "000.jpg")
    Image.new("L", (8, 20)).save(tmp_path / "masks" / "000.png")
    (tmp_path / "manifest.csv").write_text("id,split,defective\n000,test,0\n")
    with pytest.raises(DatasetError, match=r"manifest.csv, row 1: field .split."):
        read_kolektor_manifest(tmp_path)
    with pytest.raises(DatasetError, match="manifest not found"):
        read_kolektor_manifest(tmp_path / "nowhere")


def test_mask_resize_keeps_defect_pixels(ksdd_root):
    items = read_kolektor_manifest(ksdd_root)
    bad = next(it for it in items if it.defective)
    good = next(it for it in items if not it.defective)
    assert load_mask(bad.mask, (384, 160)).any()
    assert not load_mask(good.mask, (384, 160)).any()


TINY_MODELS = {
    "patchcore": {"name": "patchcore", "coreset_ratio": 0.1, "patches_per_image": 40},
    "padim": {"name": "padim", "n_features": 20},
    "padim_tiled": {"name": "padim", "n_features": 20, "tile": [64, 32], "tile_stride": [32, 32]},
    "grad_mobilenet": {"name": "grad_mobilenet", "grid": [3, 1], "bins": 4, "grad_batch_size": 6},
}


@pytest.mark.slow  # one backbone per model: seconds to tens of seconds on an idle 2-core CPU
@pytest.mark.parametrize("which", list(TINY_MODELS))
def test_tiny_end_to_end_run_predict_and_evaluate(ksdd_root, tmp_path, which):
    """Fit each registered model on 6 real good images, test on 6 real images (2 defective), predict 2 files
    (maps back at the image's own size), evaluate a 4-image folder; the run's test scores are what the
    reloaded model gives (one loader, one forward)."""
    from defectscope.config import validate
    from defectscope.engine.anomaly import load_anomaly_run
    from defectscope.engine.pipeline import train
    from defectscope.engine.tasks import get_task

    task = get_task("anomaly")
    raw = {"task": "anomaly", "seed": 0,
           "data": {"root": str(ksdd_root), "image_size": [96, 32], "calibration_fraction": 0.3,
                    "max_fit": 6, "max_test": 6},
           "model": TINY_MODELS[which],
           "train": {"epochs": 1, "batch_size": 3, "progress": False, "logger": [], "num_threads": 2, "precision": "32"}}
    recipe = validate(raw, task.recipe, "test")
    run = tmp_path / "run"
    res = train(recipe, run, task=task)
    fit_lines = (run / "split" / "fit.txt").read_text().splitlines()
    assert fit_lines and all(line.endswith(",good") for line in fit_lines)
    assert all(line.endswith(",good") for line in (run / "split" / "calibration.txt").read_text().splitlines())
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("image_auroc", "image_ap", "f1", "f1_max", "pixel_auroc", "aupro"):
        v = metrics["test"][key]
        assert v is None or 0.0 <= v <= 1.0
    assert metrics["split"]["test_defective"] >= 1 and metrics["test"]["n"] == 6
    assert metrics["model"] == TINY_MODELS[which]["name"] and metrics["clustering"] is None  # not asked for
    assert (run / "report.html").is_file() and (run / "plots" / "overlays.png").is_file()
    assert res["test"] == metrics["test"]
    if which == "patchcore":
        assert metrics["memory_bank"] == max(1, round(0.1 * metrics["patches"])) and metrics["peak_rss_mib"] > 0
        assert metrics["patches"] == 6 * (96 // 8) * (32 // 8)  # 6 fit images (max_fit), stride-8 grid
        assert metrics["presampled"] == 6 * 40 and metrics["protocol"]["images"] == {"fit": 6, "calibration": 2}
    if which == "grad_mobilenet":
        assert metrics["feature"]["dim"] == 3 + 4 + 1 and metrics["threshold"] == 0.0

    # the reloaded model (the one loader); predict's CSV gives its scores
    loaded = load_anomaly_run(run)
    test_lines = (run / "split" / "test.txt").read_text().splitlines()
    files = [Path(line.split(",")[0]) for line in test_lines]
    from defectscope.data.images import load_stack

    again = loaded.score(load_stack(files, (96, 32)))

    bad_file = tmp_path / "broken.jpg"
    bad_file.write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    summary = defectscope.predict(run, files[:2] + [bad_file], out)  # the Predictor, as the CLI
    assert summary["predicted"] == 2 and len(summary["skipped"]) == 1
    rows = list(csv.DictReader(out.open()))
    assert all(r["decision"] in ("normal", "defective") for r in rows[:2])
    assert all(np.isfinite(float(r["score"])) and Path(r["map"]).is_file() for r in rows[:2])
    assert all(Image.open(r["map"]).size == Image.open(r["file"]).size for r in rows[:2])  # the image's own size
    assert [r["decision"] == "defective" for r in rows[:2]] == list(again.decision[:2])
    np.testing.assert_allclose([float(r["score"]) for r in rows[:2]], again.score[:2], rtol=1e-5, atol=1e-6)
    assert rows[2]["error"]

    # evaluate on a small KolektorSDD-layout folder (4 real images, 2 defective)
    small = tmp_path / "ksdd_small"
    (small / "images").mkdir(parents=True)
    (small / "masks").mkdir()
    lines = (ksdd_root / "manifest.csv").read_text().splitlines()
    good = [r for r in lines[1:] if r.split(",")[2] == "0"][:2]
    bad = [r for r in lines[1:] if r.split(",")[2] == "1"][:2]
    for r in good + bad:
        i = r.split(",")[0]
        (small / "images" / f"{i}.jpg").symlink_to(ksdd_root / "images" / f"{i}.jpg")
        (small / "masks" / f"{i}.png").symlink_to(ksdd_root / "masks" / f"{i}.png")
    (small / "manifest.csv").write_text("\n".join([lines[0]] + good + bad) + "\n")
    ev = defectscope.evaluate(run, small, tmp_path / "ev")
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (tmp_path / "ev" / "report.html").is_file()
    assert ev["n"] == 4 and ev["n_defective"] == 2 and saved["test"]["n"] == 4
    assert 0.0 <= saved["test"]["image_auroc"] <= 1.0 and 0.0 <= saved["test"]["aupro"] <= 1.0


@pytest.mark.slow  # about 10 s: a tiny PaDiM on 14 real KolektorSDD images in the MVTec AD layout
def test_evaluate_through_the_predictor_gives_the_runs_own_test_metrics(ksdd_root, tmp_path):
    """``evaluate`` (the Predictor, PyTorch and ONNX Runtime) on an MVTec AD category scores its ``test/`` images,
    the run's own test set: the same image and pixel figures as the run's metrics.json (computed by the task's
    hooks during training), and a report."""
    from defectscope.data.mvtec import mvtec_from_kolektor

    root = mvtec_from_kolektor(ksdd_root, tmp_path / "cat", n_train_good=8, n_test_good=3, n_defect=3)
    run = defectscope.train({"task": "anomaly", "seed": 0,
                             "data": {"root": str(root), "layout": "mvtec", "image_size": [96, 32],
                                      "calibration_fraction": 0.25},
                             "model": {"name": "padim", "n_features": 20},
                             "train": {"progress": False, "logger": []}}, tmp_path / "run")
    own = run.metrics["test"]
    defectscope.export(run.path, tmp_path / "m.onnx")
    for model, out in ((run.path, tmp_path / "ev"), (tmp_path / "m.onnx", tmp_path / "ev_onnx")):
        ev = defectscope.evaluate(model, root, out)
        assert ev["n"] == own["n"] == 6 and ev["n_defective"] == 3
        for key in ("image_auroc", "image_ap", "f1_max", "f1", "pixel_auroc", "aupro"):
            assert ev[key] == pytest.approx(own[key], abs=1e-6), key
        assert (out / "report.html").is_file() and (out / "plots" / "overlays.png").is_file()
