"""End to end on a small real KolektorSDD subset: train 1 epoch, run folder, predict to RLE csv + PNG masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.masks import load_mask
from defectscope.data.rle import read_rle_csv, rle_decode

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "ksdd_unet_resnet18.yaml")


def test_train_and_predict_small_real_subset(tmp_path, ksdd_root, monkeypatch):
    run = tmp_path / "run"
    overrides = [f"data.root={ksdd_root}", "data.max_images=4", "data.height=64", "data.width=32",
                 "data.good_per_epoch=2", "model.decoder_channels=[16,16,8,8,8]", "train.epochs=1",
                 "train.batch_size=2", "train.logger=[csv]", "train.progress=false"]
    args = ["train", RECIPE, "--out", str(run)]
    for o in overrides:
        args += ["-o", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["weights"] == "random init"
    assert metrics["split"]["train"] == 4 and metrics["split"]["test"] == 4
    assert metrics["split"]["source"] == "manifest.csv" and metrics["split"]["test_split"] == "val"
    assert metrics["defective"] == {"train": 2, "test": 2} and metrics["test"]["n_defective"] == 2
    for key in ("dice", "iou", "pixel_auroc", "image_ap", "image_auroc", "dice_defective"):
        assert 0.0 <= metrics["test"][key] <= 1.0, key
    for name in ("config.yaml", "model.ckpt", "report.html", "plots/overlays_defective.png", "plots/overlays_good.png",
                 "split/train.txt", "split/test.txt"):
        assert (run / name).is_file(), name
    assert "overlays_good.png" in (run / "report.html").read_text()

    images = [ksdd_root / "images" / "005.jpg", ksdd_root / "images" / "000.jpg"]
    out = tmp_path / "pred" / "masks.csv"
    res = CliRunner().invoke(app, ["predict", str(run), *map(str, images), "--out", str(out), "--save-images"])
    assert res.exit_code == 0, res.output
    shapes = {p.name: load_mask(ksdd_root / "masks" / f"{p.stem}.png").shape for p in images}
    records = read_rle_csv(out, shapes)
    assert [(r.image_id, r.class_id) for r in records] == [("005.jpg", 1), ("000.jpg", 1)]
    for r in records:
        png = np.asarray(Image.open(out.parent / "masks_masks" / r.image_id.replace(".jpg", ".png")))
        assert png.shape == shapes[r.image_id] and set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png > 0, rle_decode(r.encoded, shapes[r.image_id]).astype(bool))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # without --out: masks.csv (run-length encoded) in the working folder
    res = CliRunner().invoke(app, ["predict", str(run), str(images[0])])
    assert res.exit_code == 0, res.output
    assert [r.image_id for r in read_rle_csv(tmp_path / "cwd" / "masks.csv", shapes)] == ["005.jpg"]


def test_training_crops_reach_the_image_edges_and_hold_the_defect():
    """Good images: crops tile the image (top and bottom rows are seen); defective: the crop holds a defect pixel."""
    import torch

    from defectscope.models.unet.lightning_model import MaskDataset

    h, w, crop = 100, 8, 32
    x = np.zeros((2, 3, h, w), np.uint8)
    y = np.zeros((2, 1, h, w), np.uint8)
    y[1, 0, 90, 3] = 1  # one defect pixel near the bottom of image 1
    for r in range(h):
        x[:, 0, r] = r  # channel 0 holds the row index, so a crop tells where it was taken
    ds = MaskDataset(x, y, crop_height=crop)
    torch.manual_seed(0)
    tops = {int(ds[0][0][0, 0, 0]) for _ in range(200)}
    assert tops == {0, 17, 34, 51, 68}  # ceil(100 / 32) + 1 = 5 evenly spaced crops, first and last at the edges
    for _ in range(50):
        img, mask = ds[1]
        assert img.shape == (3, crop, w) and mask.sum() == 1




def _read_list(path):
    return {line.split(",")[0] for line in path.read_text().splitlines() if line} if path.is_file() else set()


def test_cross_validation_pools_every_train_image_once_and_never_reads_the_test_split(tmp_path, ksdd_root, monkeypatch):
    """`train --folds 2` on 8 train images: crossval.json, one OOF row per train image, no val image decoded."""
    import csv
    import importlib.util

    import pytest

    import defectscope.data.masks as masks_mod
    from defectscope.config import load_raw, validate
    from defectscope.data.masks import read_manifest
    from defectscope.engine.pipeline import train
    from defectscope.engine.segmentation import SegmentationRecipe

    decoded = []
    real_load = masks_mod.load_image
    monkeypatch.setattr(masks_mod, "load_image", lambda p: decoded.append(str(p)) or real_load(p))
    out = tmp_path / "cv"
    overrides = [f"data.root={ksdd_root}", "data.max_images=8", "data.height=64", "data.width=32",
                 "data.good_per_epoch=2", "model.decoder_channels=[16,16,8,8,8]", "train.epochs=1",
                 "train.batch_size=2", "train.logger=[csv]", "train.progress=false", "train.val_fraction=0.25"]
    args = ["train", RECIPE, "--out", str(out), "--folds", "2", "-o", "model.tta=false"]
    for o in overrides:
        args += ["-o", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output

    manifest = read_manifest(ksdd_root)
    train_files = {str(it.image) for it in manifest if it.split == "train"}
    val_files = {str(it.image) for it in manifest if it.split == "val"}
    assert decoded and not (set(decoded) & val_files), "cross-validation decoded a val image"

    cv = json.loads((out / "crossval.json").read_text())
    assert cv["k"] == 2 and len(cv["folds"]) == 2 and cv["n"] == 8
    assert {"image_ap", "dice", "dice_defective"} <= set(cv["mean"]) and set(cv["mean"]) == set(cv["std"])
    assert cv["mean"]["dice"] == pytest.approx(np.mean([f["dice"] for f in cv["folds"]]))
    assert cv["pooled"]["n"] == 8  # (n_defective counts non-empty masks at 64 x 32: a tiny defect vanishes)

    rows = list(csv.DictReader((out / "oof_predictions.csv").open()))
    files = [r["file"] for r in rows]
    assert len(files) == 8 and len(set(files)) == 8 and set(files) <= train_files  # each train image once, no val image
    assert {"file", "fold", "true", "pred", "image_score", "dice"} <= set(rows[0])
    assert sorted(r["fold"] for r in rows) == ["1"] * 4 + ["2"] * 4
    assert sum(r["true"] == "defective" for r in rows) == 4  # the manifest's flag, the stratification label
    for r in rows:  # pred is the image score at the model threshold (0.5)
        assert r["pred"] == ("defective" if float(r["image_score"]) >= 0.5 else "good")
    # the pooled Dice is the mean of the per-image Dice of the OOF rows
    assert cv["pooled"]["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]), abs=1e-5)
    for k in ("1", "2"):
        assert sum(r["true"] == "defective" for r in rows if r["fold"] == k) == 2  # stratified
        fold = out / "folds" / k
        test = _read_list(fold / "split" / "test.txt")
        seen = _read_list(fold / "split" / "train.txt") | _read_list(fold / "split" / "val.txt")
        assert _read_list(fold / "split" / "val.txt"), "val_fraction 0.25 should give each fold a validation part"
        assert test == {r["file"] for r in rows if r["fold"] == k}
        assert not (test & seen), "a fold trained or selected its checkpoint on its own test images"
        assert not ((test | seen) & val_files)
        assert (fold / "config.yaml").is_file() and (fold / "model.ckpt").is_file()
    assert "oof_image_level_curves.png" in (out / "report.html").read_text()
    # operating points chosen on the out-of-fold image scores (issue: decisions at the line)
    from defectscope.evaluation.decisions import choose_threshold

    points = cv["pooled"]["operating_points"]
    assert [p["target_escape_rate"] for p in points] == [0.05, 0.01, 0.001]
    oof_scores = np.array([float(r["image_score"]) for r in rows])
    oof_def = np.array([r["true"] == "defective" for r in rows])
    assert points[0]["threshold"] == pytest.approx(choose_threshold(oof_scores, oof_def, 0.05), abs=1e-5)
    assert points[0]["n_defective_used"] == 4 and not points[0]["bound_reaches_target"]
    assert points[0]["n_defective_needed"] == 59  # zero escapes in 59 defects bound the escape rate by 5 %
    assert "Decisions" in (out / "report.html").read_text()
    assert (out / "plots" / "oof_image_level_curves.png").is_file()

    # the benchmark's table of (flips, image score) rules, from the fold models on their OOF images
    spec = importlib.util.spec_from_file_location("segmentation_cv", REPO / "benchmarks" / "segmentation_cv.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = validate(load_raw(RECIPE, overrides + ["model.tta=false"]), SegmentationRecipe, "r")
    rules = bench.score_rules(recipe, out)
    assert [(r["tta"], r["image_score"]) for r in rules["rows"]] == [
        (t, m) for t in (False, True) for m in ("max", "blur_max", "top_mean")]
    assert rules["n"] == 8 and sorted(rules["per_image"]["file"]) == sorted(files)
    oof = {r["file"]: float(r["image_score"]) for r in rows}  # the recipe's own rule (max, no flips) agrees
    np.testing.assert_allclose([oof[f] for f in rules["per_image"]["file"]], rules["per_image"]["max"], atol=1e-5)
    assert rules["rows"][0]["image_ap"] == pytest.approx(cv["pooled"]["image_ap"])

    with pytest.raises(ValueError, match="at least 5 samples of every class"):  # 4 defective train images
        train(recipe, tmp_path / "cv5", folds=5)
    assert not (tmp_path / "cv5").exists()


def test_block8_groups_keep_blocks_of_consecutive_images_together(ksdd_root):
    """`--group-by block8`: 8 consecutive manifest rows of a split share a fold; the plain split cuts blocks."""
    from defectscope.engine.crossval import cv_folds, groups_from
    from defectscope.engine.segmentation import SegmentationData, load_mask_samples

    samples = load_mask_samples(SegmentationData(root=str(ksdd_root)))
    assert len(samples) == 399 and samples.test_only.sum() == 79 and not samples.data.loaded.any()  # nothing decoded
    assert samples.class_names == ["good", "defective"] and samples.labels.sum() == 52
    assert {"n_polygons", "mask_pixels", "split", "block8"} <= set(samples.columns)
    groups = groups_from("block8", samples.ids, samples.columns)
    train = np.flatnonzero(~samples.test_only)
    assert list(groups[train[:80]]) == [f"train:{i // 8:04d}" for i in range(80)]

    labels = np.zeros(80, int)
    labels[[3, 12, 21, 30, 45, 50, 66, 77]] = 1  # one defective image in 8 of the 10 blocks of 8
    plain = cv_folds(labels, 4, seed=0)
    assert sorted(np.bincount(plain[labels == 1])) == [2, 2, 2, 2]  # stratified image by image
    grouped = cv_folds(labels, 4, groups=groups[train[:80]], seed=0)
    blocks = grouped.reshape(10, 8)
    assert (blocks == blocks[:, :1]).all()  # a block of 8 consecutive images never spans two folds
    assert set(grouped) == {0, 1, 2, 3} and all(labels[grouped == k].any() for k in range(4))
    assert not (blocks == plain.reshape(10, 8)[:, :1]).all()  # the plain split does cut blocks


def test_manifest_without_split_column_is_split_by_test_fraction(tmp_path, ksdd_root):
    """A plain images + masks folder whose manifest has no split column: no test_only, stratified split."""
    from defectscope.engine.segmentation import SegmentationRecipe, SegmentationTask

    rows = [r for r in (ksdd_root / "manifest.csv").read_text().splitlines()[1:]]
    pick = [r for r in rows if r.split(",")[2] == "1"][:5] + [r for r in rows if r.split(",")[2] == "0"][:15]
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for r in pick:
        i = r.split(",")[0]
        (tmp_path / "images" / f"{i}.jpg").symlink_to(ksdd_root / "images" / f"{i}.jpg")
        (tmp_path / "masks" / f"{i}.png").symlink_to(ksdd_root / "masks" / f"{i}.png")
    (tmp_path / "manifest.csv").write_text("id,defective,batch\n" + "".join(
        f"{r.split(',')[0]},{r.split(',')[2]},b{n % 4}\n" for n, r in enumerate(pick)))
    task = SegmentationTask()
    recipe = SegmentationRecipe(data={"root": str(tmp_path), "height": 64, "width": 32, "test_fraction": 0.2})
    samples = task.load_samples(recipe)
    assert len(samples) == 20 and samples.test_only is None and samples.columns["batch"][:4] == ["b0", "b1", "b2", "b3"]
    split = task.split(recipe, samples)
    assert len(split["test"]) == 4 and samples.labels[split["test"]].sum() == 1  # stratified 20 %
    assert not set(split["test"]) & set(split["trainval"])
    assert task.split_info(recipe)["test_fraction"] == 0.2
