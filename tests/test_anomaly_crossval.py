"""Cross-validation of the anomaly task through the CLI on a real KolektorSDD subset (folds of the good images, defects always test)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from defectscope.cli import app


def _subset(ksdd_root, out, n_good=10, n_bad=4, n_val=2):
    """A KolektorSDD-layout folder of real images (symlinks): train goods and defects, a few val images."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    lines = (ksdd_root / "manifest.csv").read_text().splitlines()
    rows = [r.split(",") for r in lines[1:]]
    good = [r for r in rows if r[1] == "train" and r[2] == "0"][:n_good]
    bad = [r for r in rows if r[1] == "train" and r[2] == "1"][:n_bad]
    val = [r for r in rows if r[1] == "val" and r[2] == "0"][:n_val] + [r for r in rows if r[1] == "val" and r[2] == "1"][:1]
    keep = good + bad + val
    for r in keep:
        (out / "images" / f"{r[0]}.jpg").symlink_to(ksdd_root / "images" / f"{r[0]}.jpg")
        (out / "masks" / f"{r[0]}.png").symlink_to(ksdd_root / "masks" / f"{r[0]}.png")
    (out / "manifest.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in keep]) + "\n")
    return {str(out / "images" / f"{r[0]}.jpg") for r in good}, {str(out / "images" / f"{r[0]}.jpg") for r in bad}


def _list(path):
    return {line.rsplit(",", 1)[0] for line in path.read_text().splitlines() if line}


@pytest.mark.slow  # 2 folds x PaDiM on tiny inputs
def test_anomaly_cross_validation_predicts_every_train_image_once_and_never_fits_a_defect(ksdd_root, tmp_path):
    data = tmp_path / "ksdd"
    goods, bads = _subset(ksdd_root, data)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "anomaly", "seed": 0,
        "data": {"root": str(data), "image_size": [96, 32], "calibration_fraction": 0.3},
        "model": {"name": "padim", "n_features": 20},
        "train": {"epochs": 1, "batch_size": 4, "progress": False, "logger": ["csv"], "num_threads": 2},
    }))
    out = tmp_path / "cv"
    res = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--folds", "2"])
    assert res.exit_code == 0, res.output
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["k"] == 2 and len(cv["folds"]) == 2 and cv["n"] == len(goods) + len(bads)  # the val split is left out
    for key in ("image_auroc", "f1", "f1_max", "pixel_auroc", "aupro"):
        assert key in cv["mean"] and key in cv["std"]
    assert cv["mean"]["f1"] == pytest.approx(np.mean([f["f1"] for f in cv["folds"]]))
    assert cv["pooled"]["n"] == 14 and cv["pooled"]["n_defective"] == 4 and 0 <= cv["pooled"]["aupro"] <= 1

    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    assert sorted(r["file"] for r in rows) == sorted(goods | bads)  # each train image exactly once
    assert {r["fold"] for r in rows} == {"1", "2"}
    assert all(r["true"] == ("defective" if r["file"] in bads else "good") for r in rows)
    assert all(r["pred"] in ("good", "defective") for r in rows)
    # pooled figures are those of the out-of-fold rows
    y = np.array([r["true"] == "defective" for r in rows])
    pred = np.array([r["pred"] == "defective" for r in rows])
    assert cv["pooled"]["accuracy"] == pytest.approx(np.mean(y == pred))
    assert cv["pooled"]["recall"] == pytest.approx(pred[y].mean())

    for k in ("1", "2"):
        fold = out / "folds" / k
        test = _list(fold / "split" / "test.txt")
        fitted = _list(fold / "split" / "train.txt")
        assert test == {r["file"] for r in rows if r["fold"] == k}
        assert fitted and not (fitted & test), "a fold fitted on its own test images"
        assert not (fitted & bads), "a defective image was fitted on"
        assert fitted == _list(fold / "split" / "fit.txt") | _list(fold / "split" / "calibration.txt")
        assert test & bads and test & goods
        # the checkpoint holds tensors and plain data only, and reloaded models give the fold's scores
        payload = torch.load(fold / "model.ckpt", weights_only=True)
        assert payload["model_name"] == "padim" and isinstance(payload["state_dict"]["inv_cov"], torch.Tensor)
        files = [r["file"] for r in rows if r["fold"] == k]  # the fold's order: the same batches as in the run
        preds = tmp_path / f"preds_{k}.csv"
        res = CliRunner().invoke(app, ["predict", str(fold), *files, "--out", str(preds)])
        assert res.exit_code == 0, res.output
        got = {r["file"]: r for r in csv.DictReader(preds.open())}
        for r in rows:
            if r["fold"] == k:
                assert float(got[r["file"]]["score"]) == pytest.approx(float(r["image_score"]), rel=1e-5, abs=1e-6)
                assert (got[r["file"]]["decision"] == "defective") == (r["pred"] == "defective")
    html = (out / "report.html").read_text()
    assert "mean +- std" in html and "pooled (out-of-fold)" in html


def test_anomaly_recipe_refuses_a_validation_part(ksdd_root):
    from defectscope.config import ConfigError, validate
    from defectscope.recipes.anomaly import AnomalyRecipe

    raw = {"task": "anomaly", "data": {"root": str(ksdd_root)}, "train": {"val_fraction": 0.1}}
    with pytest.raises(ConfigError, match=r"train.val_fraction: Value error, must be 0 for task 'anomaly'"):
        validate(raw, AnomalyRecipe, "r.yaml")
    assert validate({"task": "anomaly", "train": {"epochs": 1}}, AnomalyRecipe, "r.yaml").train.val_fraction == 0
