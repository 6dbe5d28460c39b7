"""`defectscope train FOLDER`: a folder the project has never seen gets a recipe sized to it."""

from __future__ import annotations

import json
import shutil

import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.mvtec import mvtec_from_kolektor


def _folder(tmp_path, neu_root, per_class, classes=("crazing", "inclusion", "patches", "scratches")):
    out = tmp_path / "parts"
    for c in classes:
        (out / c).mkdir(parents=True)
        for i in range(1, per_class + 1):
            shutil.copy(neu_root / "images" / f"{c}_{i}.jpg", out / c / f"{c}_{i}.jpg")
    return out


def test_a_small_class_folder_gets_cross_validation_and_a_linear_probe_reference(tmp_path, neu_root):
    data = _folder(tmp_path, neu_root, 5)
    shutil.copy(data / "crazing" / "crazing_1.jpg", data / "patches" / "copy_of_crazing_1.jpg")  # leaks across classes
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "-o", "data.image_size=64",
                                   "-o", "train.epochs=2", "-o", "train.precision=32", "-o", "train.progress=false"])
    assert res.exit_code == 0, res.output
    assert "classification (folder layout)" in res.output and "cross-validation" in res.output
    assert "warning" in res.output and "copy_of_crazing_1.jpg" in res.output.replace("\n", "")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["task"] == "classification" and cfg["data"]["root"] == str(data)
    assert cfg["eval"]["folds"] >= 2 and cfg["data"]["image_size"] == 64  # sized, then overridden
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["n"] == 21 and len(cv["folds"]) == cfg["eval"]["folds"]
    probe = cv["pooled"]["reference"]["linear_probe"]
    assert probe["n"] == 21 and 0 <= probe["accuracy"] <= 1
    assert "reference.linear_probe.accuracy" in cv["mean"]
    check = json.loads((out / "data_check.json").read_text())
    assert check["duplicates"]
    # the recipe written to the run trains again as it is
    res = CliRunner().invoke(app, ["train", str(out / "config.yaml"), "--out", str(tmp_path / "again"), "--folds", "2"])
    assert res.exit_code == 0, res.output


def test_linear_probe_as_the_model(tmp_path, neu_small):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(neu_small), "image_size": 64},
                                 "model": {"name": "linear_probe", "backbone": "efficientnet_lite0", "pretrained": True}}))
    out = tmp_path / "probe"
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "linear_probe" and m["test"]["accuracy"] > 1 / 6
    res = CliRunner().invoke(app, ["predict", str(out), str(neu_small), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 49


def test_an_mvtec_layout_folder_trains_the_anomaly_task_with_pixel_metrics(tmp_path, ksdd_root):
    data = mvtec_from_kolektor(ksdd_root, tmp_path / "mvtec", n_train_good=12, n_test_good=6, n_defect=6)
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(data), "--out", str(out), "-o", "data.image_size=[96,32]"])
    assert res.exit_code == 0, res.output
    assert "anomaly (mvtec layout)" in res.output
    # only the user's folder: no clustering study (no NEU path), and the summary's counts are the split's
    assert "neu" not in res.output.lower() and "clustering" not in res.output
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["clustering"]["enabled"] is False and cfg["clustering"]["root"] is None
    assert cfg["data"]["root"] == str(data) and cfg["model"]["name"] == "patchcore"
    assert "10 good training images fill its memory bank, 2 more" in " ".join(res.output.split())
    assert len((out / "split" / "fit.txt").read_text().splitlines()) == 10
    assert len((out / "split" / "calibration.txt").read_text().splitlines()) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["clustering"] is None
    assert m["test"]["n"] == 12 and m["test"]["n_defective"] == 6
    assert 0 <= m["test"]["image_auroc"] <= 1 and 0 <= m["test"]["pixel_auroc"] <= 1


def test_an_ambiguous_folder_is_refused_with_what_was_found(tmp_path):
    (tmp_path / "d" / "annotations").mkdir(parents=True)
    (tmp_path / "d" / "notes.txt").write_text("nothing here")
    res = CliRunner().invoke(app, ["train", str(tmp_path / "d"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "error" in res.output and not (tmp_path / "run").exists()
