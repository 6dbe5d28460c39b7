"""Multi-CNN fusion on the shared pipeline: k-fold cross-validation through the CLI, schema errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.config import ConfigError, validate
from defectscope.recipes.multicnn import MultiCNNRecipe
from defectscope.models import create_model


def _raw(root, **train) -> dict:
    return {"task": "multicnn", "seed": 0,
            "data": {"root": str(root), "image_size": 32, "max_per_class": 4},
            "members": [{"name": "lite0", "backbone": "efficientnet_lite0", "pretrained": True, "freeze": 4},
                        {"name": "r18", "backbone": "resnet18", "pretrained": False, "freeze": 10,
                         "freeze_unit": "layers"}],
            "train": {"epochs": 1, "batch_size": 8, "val_fraction": 0.25, "logger": ["csv"], "progress": False,
                      "precision": "32", "channels_last": False, "early_stopping_patience": 0, **train},
            "fusion": {"epochs": 3, "batch_size": 8}}


def _read_list(path) -> set[str]:
    return {line.split(",")[0] for line in path.read_text().splitlines() if line}


def test_multicnn_cross_validation_through_the_cli(tmp_path, neu_small):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_raw(neu_small)))
    out = tmp_path / "cv"
    res = CliRunner().invoke(app, ["train", str(recipe), "--out", str(out), "--folds", "2"])
    assert res.exit_code == 0, res.output
    cv = json.loads((out / "crossval.json").read_text())
    n = 6 * 4  # six NEU classes, max_per_class 4
    assert cv["k"] == 2 and len(cv["folds"]) == 2 and cv["n"] == n and cv["pooled"]["n"] == n
    assert cv["mean"]["weighted_f1"] == pytest.approx(np.mean([f["weighted_f1"] for f in cv["folds"]]))
    assert cv["std"]["weighted_f1"] == pytest.approx(np.std([f["weighted_f1"] for f in cv["folds"]]))
    # members and late fusion are averaged over folds and pooled too
    for key in ("lite0", "r18", "late_fusion"):
        assert cv["mean"][f"members.{key}.weighted_f1"] == pytest.approx(
            np.mean([f["members"][key]["weighted_f1"] for f in cv["folds"]]))
    assert [r["model"] for r in cv["pooled"]["comparison"]] == ["lite0", "r18", "feature_fusion", "late_fusion"]
    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    files = [r["file"] for r in rows]
    assert len(files) == n and len(set(files)) == n
    assert {r["fold"] for r in rows} == {"1", "2"}
    assert all(r["true"] == r["file"].rsplit("/", 1)[1].rsplit("_", 1)[0] for r in rows)
    assert {"pred", "pred_lite0", "pred_r18", "pred_late_fusion"} <= set(rows[0])
    # pooled figures are those of the out-of-fold rows (fused and each member)
    assert cv["pooled"]["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in rows]))
    assert cv["pooled"]["members"]["r18"]["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred_r18"] for r in rows]))
    for k in (1, 2):
        fold = out / "folds" / str(k)
        test = _read_list(fold / "split" / "test.txt")
        seen = _read_list(fold / "split" / "train.txt") | _read_list(fold / "split" / "val.txt")
        assert test and not (test & seen), "a fold trained or selected its checkpoint on its own test samples"
        assert test == {r["file"] for r in rows if r["fold"] == str(k)}
        for member in ("lite0", "r18"):  # each member trained on the fold's training part only
            mdir = fold / "members" / member
            assert _read_list(mdir / "split" / "train.txt") | _read_list(mdir / "split" / "val.txt") == seen
            assert (mdir / "model.ckpt").is_file() and (mdir / "report.html").is_file()
            assert json.loads((mdir / "metrics.json").read_text())["test"]["n"] == len(test)
        fm = json.loads((fold / "metrics.json").read_text())
        assert fm["test"] == cv["folds"][k - 1] and fm["split"]["fold"] == k
        # the fusion head's features: train and val computed, the held-out part only predicted
        assert {e["split"] for e in fm["feature_cache"]["entries"]} == {"train", "val", "test"}
    html = (out / "report.html").read_text()
    assert "mean +- std" in html and "Every model over the folds" in html and "late_fusion" in html
    # always a model: the fused model refit on all 24 images (its members under RUN/members), for predict / export
    assert (out / "model.ckpt").is_file() and cv["model"]["samples"]["train"] + cv["model"]["samples"].get("val", 0) == n
    assert (out / "members" / "lite0" / "model.ckpt").is_file()


def test_schema_refuses_settings_multicnn_does_not_use(tmp_path):
    raw = _raw(tmp_path, class_balance="on")
    with pytest.raises(ConfigError, match="train.class_balance: not a setting of task 'multicnn'"):
        validate(raw, MultiCNNRecipe, "r.yaml")
    with pytest.raises(ConfigError, match="train.devices"):
        validate(_raw(tmp_path, devices=2), MultiCNNRecipe, "r.yaml")
    bad = _raw(tmp_path)
    bad["members"][1]["name"] = "late_fusion"
    with pytest.raises(ConfigError, match="late_fusion"):
        validate(bad, MultiCNNRecipe, "r.yaml")


def test_fusion_model_refuses_unknown_arguments():
    from defectscope.models.registry import ModelArgumentError

    members = [{"name": "a", "backbone": "resnet18", "image_size": 32}]
    with pytest.raises(ModelArgumentError, match="dropuot: not an argument of model 'multicnn_fusion'"):
        create_model("multicnn_fusion", members=members, num_classes=2, dropuot=0.5)
    with pytest.raises(ValueError, match=r"members\[0\]"):
        create_model("multicnn_fusion", members=[{**members[0], "pretrained": True}], num_classes=2)
