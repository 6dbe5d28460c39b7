"""The CLI end to end on a small real NEU subset: train, evaluate, predict, errors."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from defectscope.cli import app

runner = CliRunner()

TINY = ["-o", "data.image_size=64", "-o", "model.low_res=32", "-o", "model.embed_dim=32", "-o", "model.num_heads=4",
        "-o", "train.epochs=2", "-o", "train.batch_size=8", "-o", "train.val_fraction=0.25",
        "-o", "train.precision=32", "-o", "train.logger=[csv]"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, neu_small):
    out = tmp_path_factory.mktemp("runs") / "ms"
    recipe = tmp_path_factory.mktemp("cfg") / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(neu_small)},
                                      "model": {"name": "multiscale", "backbone": "efficientnet_lite0", "pretrained": True}}))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_the_run_folder_contract(trained_run):
    for name in ("config.yaml", "model.ckpt", "metrics.json", "report.html", "plots/confusion_matrix.png",
                 "plots/roc_curves.png", "plots/training_curves.png", "split/train.txt", "split/val.txt", "split/test.txt"):
        assert (trained_run / name).is_file(), name
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["task"] == "classification" and m["seed"] == 0
    # 48 images: ceil(20 %) = 10 held out, then ceil(25 %) of the remaining 38 = 10 for validation
    assert m["split"] == {"seed": 0, "test_fraction": 0.2, "test": 10, "train": 28, "val": 10}
    t = m["test"]
    for key in ("accuracy", "weighted_precision", "weighted_recall", "weighted_f1", "macro_auroc", "per_class",
                "confusion_matrix", "class_names"):
        assert key in t
    assert sum(map(sum, t["confusion_matrix"])) == 10
    # 2 tiny epochs on 28 images at 64 px: a sanity check that it learned something (chance is 1/6)
    assert t["accuracy"] > 1 / 6
    # splits are disjoint file lists
    files = {s: {l.split(",")[0] for l in (trained_run / "split" / f"{s}.txt").read_text().splitlines()} for s in ("train", "val", "test")}
    assert not files["train"] & files["test"] and not files["val"] & files["test"]
    cfg = yaml.safe_load((trained_run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["image_size"] == 64


def test_evaluate_on_a_class_per_folder_set(trained_run, neu_small_folders, tmp_path):
    res = runner.invoke(app, ["evaluate", str(trained_run), "--data", str(neu_small_folders), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"]
    assert m["n"] == 12 and len(m["class_names"]) == 6
    assert (tmp_path / "ev" / "report.html").is_file()


def test_predict_skips_and_reports_bad_files(trained_run, neu_small, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("crazing_1.jpg", "scratches_2.jpg"):
        shutil.copy(neu_small / name, folder / name)
    (folder / "broken.png").write_bytes(b"garbage")
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", str(trained_run), str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "broken.png" in res.output and "skipped 1" in res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3
    ok = [r for r in rows if r["class"]]
    assert len(ok) == 2
    for r in ok:
        probs = [float(v) for k, v in r.items() if k.startswith("prob_")]
        assert len(probs) == 6 and abs(sum(probs) - 1) < 1e-4
        assert r["class"] in {k[5:] for k in r if k.startswith("prob_")}
    bad = [r for r in rows if not r["class"]][0]
    assert bad["file"].endswith("broken.png") and "cannot be decoded" in bad["error"]


def test_user_errors_exit_2_with_a_message(tmp_path, neu_small):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(neu_small)}, "train": {"epochs": 0}}))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "train.epochs" in res.output
    recipe.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(neu_small)},
                                      "model": {"backbone": "resnet18", "pretrained": True}}))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "no ImageNet weights for 'resnet18'" in res.output
    res = runner.invoke(app, ["predict", str(tmp_path / "not_a_run"), str(neu_small)])
    assert res.exit_code == 2 and "config.yaml" in res.output


def test_corrupt_training_image_is_named(tmp_path, neu_small):
    data = tmp_path / "data"
    shutil.copytree(neu_small, data, symlinks=False)
    (data / "patches_99.jpg").write_bytes(b"\x00\x01 not a jpeg")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": "classification", "data": {"root": str(data)}}))
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "patches_99.jpg" in res.output
