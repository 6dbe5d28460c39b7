"""Cross-validation of the detection task through the CLI on a real NEU-DET subset (VOC boxes)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.boxes import read_voc_xml


def _files(path):
    return [line.rsplit(",", 1)[0] for line in path.read_text().splitlines() if line]


def test_detection_two_fold_cross_validation(tmp_path, neu_root):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "detection",
        "data": {"root": str(neu_root), "image_size": 64, "max_per_class": 4},
        "model": {"backbone": "efficientnet_lite0", "pretrained": True, "loss": "hungarian", "head": "attention",
                  "hidden_dim": 32, "num_heads": 4, "freeze_backbone": True},
        "train": {"epochs": 1, "batch_size": 8, "val_fraction": 0.2, "precision": "32", "logger": ["csv"],
                  "channels_last": False, "early_stopping_patience": 0, "progress": False},
    }))
    out = tmp_path / "cv"
    res = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--folds", "2"])
    assert res.exit_code == 0, res.output
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["task"] == "detection" and cv["k"] == 2 and len(cv["folds"]) == 2 and cv["n"] == 24
    assert {"map_50", "map", "accuracy", "box_mae"} <= set(cv["mean"]) and set(cv["mean"]) == set(cv["std"])
    assert cv["mean"]["map_50"] == pytest.approx(np.mean([f["map_50"] for f in cv["folds"]]))
    assert [f["n"] for f in cv["folds"]] == [12, 12]  # stratified on the file-name class: 2 of each class per fold

    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    files = [r["file"] for r in rows]
    assert len(files) == 24 and len(set(files)) == 24
    assert {"file", "fold", "true", "pred", "n_boxes", "top_score"} <= set(rows[0])
    assert all(r["true"] == r["file"].rsplit("/", 1)[1].rsplit("_", 1)[0] for r in rows)
    # pooled figures are those of all out-of-fold images together
    pooled = cv["pooled"]
    true_boxes = sum(len(read_voc_xml(neu_root / "annotations" / (f.rsplit("/", 1)[1].rsplit(".", 1)[0] + ".xml")).labels)
                     for f in files)
    assert pooled["n"] == 24 and pooled["n_boxes"] == true_boxes
    assert 0 <= pooled["map"] <= pooled["map_50"] <= 1
    assert pooled["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in rows]), abs=1e-6)
    assert all(int(r["n_boxes"]) >= 0 and 0 <= float(r["top_score"]) <= 1 for r in rows)

    for k in (1, 2):
        fold = out / "folds" / str(k)
        test = set(_files(fold / "split" / "test.txt"))
        seen = set(_files(fold / "split" / "train.txt")) | set(_files(fold / "split" / "val.txt"))
        assert test and not (test & seen), "a fold trained or selected its checkpoint on its own test images"
        assert test == {r["file"] for r in rows if r["fold"] == str(k)}
        m = json.loads((fold / "metrics.json").read_text())
        assert m["test"]["map_50"] == pytest.approx(cv["folds"][k - 1]["map_50"])
        assert (fold / "model.ckpt").is_file() and (fold / "report.html").is_file()
    html = (out / "report.html").read_text()
    assert "mean +- std" in html and "best_cases.png" in html
