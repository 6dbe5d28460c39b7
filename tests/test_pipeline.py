"""The shared pipeline: k-fold cross-validation for a task, atomic run folders, schema errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.config import ConfigError, validate
from defectscope.engine.crossval import cv_folds, groups_from, mean_std, validation_split
from defectscope.engine.segmentation import SegmentationRecipe


def _recipe(tmp_path, root, **train):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({
        "task": "classification",
        "data": {"root": str(root), "image_size": 64},
        "model": {"name": "classifier", "backbone": "efficientnet_lite0", "pretrained": True},
        "train": {"epochs": 1, "batch_size": 8, "precision": "32", "logger": ["csv"], "val_fraction": 0.2,
                  "progress": False, **train},
    }))
    return r


def _read_list(path):
    return {line.split(",")[0] for line in path.read_text().splitlines() if line}


def test_classification_cross_validation_writes_every_sample_once(tmp_path, neu_small):
    out = tmp_path / "cv"
    res = CliRunner().invoke(app, ["train", str(_recipe(tmp_path, neu_small)), "--out", str(out), "--folds", "4"])
    assert res.exit_code == 0, res.output
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["k"] == 4 and len(cv["folds"]) == 4
    assert {"accuracy", "weighted_f1"} <= set(cv["mean"]) and set(cv["mean"]) == set(cv["std"])
    assert cv["mean"]["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in cv["folds"]]))
    assert cv["pooled"]["n"] == 48
    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    files = [r["file"] for r in rows]
    assert len(files) == 48 and len(set(files)) == 48
    assert {r["fold"] for r in rows} == {"1", "2", "3", "4"}
    assert all(r["true"] == r["file"].rsplit("/", 1)[1].rsplit("_", 1)[0] for r in rows)
    # pooled accuracy is the accuracy of the out-of-fold rows
    assert cv["pooled"]["accuracy"] == pytest.approx(np.mean([r["true"] == r["pred"] for r in rows]))
    for k in range(1, 5):
        fold = out / "folds" / str(k)
        test = _read_list(fold / "split" / "test.txt")
        seen = _read_list(fold / "split" / "train.txt") | _read_list(fold / "split" / "val.txt")
        assert test and not (test & seen), "a fold trained or selected its checkpoint on its own test samples"
        assert test == {r["file"] for r in rows if r["fold"] == str(k)}
        assert (fold / "model.ckpt").is_file() and (fold / "metrics.json").is_file()
        env = json.loads((fold / "metrics.json").read_text())["environment"]
        assert env["precision"] == "32" and env["precision_requested"] == "32"  # the recipe's explicit setting
    assert (out / "report.html").is_file() and "mean +- std" in (out / "report.html").read_text()
    # issue 23: every run records its machine (metrics/crossval.json and the report)
    import torch

    assert cv["environment"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert {"cpu_model", "native_bf16", "precision_reason", "threads", "onnxruntime"} <= set(cv["environment"])
    html = (out / "report.html").read_text()
    assert "Machine" in html and cv["environment"]["precision_reason"] in html


def test_existing_run_is_refused_and_kept_when_a_new_train_fails(tmp_path, neu_small):
    out = tmp_path / "run"
    r = _recipe(tmp_path, neu_small, val_fraction=0.0)
    assert CliRunner().invoke(app, ["train", str(r), "--out", str(out)]).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    bad = _recipe(tmp_path, tmp_path / "no_such_folder")
    res = CliRunner().invoke(app, ["train", str(bad), "--out", str(out), "--overwrite"])
    assert res.exit_code == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing of the old run touched
    assert not list(tmp_path.glob(".run.*")), "a failed train left a partial folder behind"


def test_cv_folds_are_stratified_and_keep_groups_whole():
    labels = np.array([0] * 12 + [1] * 8)
    f = cv_folds(labels, 4, seed=0)
    for k in range(4):
        assert (labels[f == k] == 1).sum() == 2
    groups = np.repeat(np.arange(10), 2)
    g = cv_folds(labels, 2, groups=groups, seed=1)
    for grp in range(10):
        assert len(set(g[groups == grp])) == 1
    with pytest.raises(ValueError, match="at least 5 samples of every class"):
        cv_folds(np.array([0] * 10 + [1] * 4), 5)


def test_validation_split_and_group_keys():
    labels = np.array([0, 1] * 10)
    tr, va = validation_split(labels, 0.2, 0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 20 and set(labels[va]) == {0, 1}
    ids = [f"part{i // 4}_view{i % 4}.png" for i in range(8)]
    assert list(groups_from(r"(part\d+)_", ids)) == ["part0"] * 4 + ["part1"] * 4
    assert list(groups_from("batch", ids, {"batch": list("aabbccdd")})) == list("aabbccdd")
    with pytest.raises(ConfigError, match="regular expression"):
        groups_from("(", ids)


def test_mean_std_over_folds():
    mean, std = mean_std([{"a": 1.0, "b": {"c": 2}}, {"a": 3.0, "b": {"c": 4}}])
    assert mean == {"a": 2.0, "b.c": 3.0} and std == {"a": 1.0, "b.c": 1.0}


def test_a_setting_the_task_does_not_use_is_rejected_with_a_reason(ksdd_root):
    raw = {"task": "segmentation", "data": {"root": str(ksdd_root)}, "train": {"loss": "focal"}}
    with pytest.raises(ConfigError, match=r"train.loss: not a setting of task 'segmentation'"):
        validate(raw, SegmentationRecipe, "r.yaml")


def test_resume_continues_a_killed_train_to_the_end(tmp_path, neu_small):
    """kill -9 during training keeps the partial run; --resume finishes it from the last epoch checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    r = _recipe(tmp_path, neu_small, epochs=4, val_fraction=0.25)
    out = tmp_path / "run"
    stage = tmp_path / ".run.partial"
    cmd = [sys.executable, "-m", "defectscope.cli", "train", str(r), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not (stage / "checkpoints" / "last.ckpt").is_file():
        if proc.poll() is not None:
            pytest.fail(f"training ended (rc {proc.returncode}) before its first epoch checkpoint")
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and (stage / "checkpoints" / "last.ckpt").is_file()
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out), "--resume"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_run"] == 4 and m["test"]["n"] == 10 and not stage.exists()
    res = CliRunner().invoke(app, ["train", str(r), "--out", str(out), "--resume"])
    assert res.exit_code == 2 and "nothing to resume" in res.output
