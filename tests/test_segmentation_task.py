"""End to end on a small real KolektorSDD subset: train 1 epoch, run folder, predict to RLE csv + PNG masks."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.masks import load_mask
from defectscope.data.rle import read_rle_csv, rle_decode


def test_train_and_predict_small_real_subset(tmp_path, ksdd_root):
    run = tmp_path / "run"
    overrides = [f"data.root={ksdd_root}", "data.max_images=4", "data.height=64", "data.width=32",
                 "data.good_per_epoch=2", "model.decoder_channels=[16,16,8,8,8]", "train.epochs=1",
                 "train.batch_size=2", "train.logger=[csv]", "train.progress=false"]
    args = ["train", "configs/ksdd_unet_resnet18.yaml", "--out", str(run)]
    for o in overrides:
        args += ["-o", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["weights"] == "random init"
    assert metrics["split"]["train"] == 4 and metrics["split"]["test"] == 4 and metrics["split"]["test_defective"] == 2
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


def test_training_crops_reach_the_image_edges_and_hold_the_defect():
    """Good images: crops tile the image (top and bottom rows are seen); defective: the crop holds a defect pixel."""
    import torch

    from defectscope.engine.segmentation import MaskDataset

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


def test_cross_validation_pools_every_train_image_once_and_never_reads_the_test_split(tmp_path, ksdd_root):
    import pytest

    from defectscope.data.masks import read_manifest
    from defectscope.engine.segmentation import SegmentationRecipe, cross_validate

    recipe = SegmentationRecipe(
        data={"root": str(ksdd_root), "height": 64, "width": 32, "max_images": 8, "good_per_epoch": 2},
        model={"decoder_channels": [16, 16, 8, 8, 8]},
        train={"epochs": 1, "batch_size": 2, "logger": ["csv"], "progress": False, "val_fraction": 0.0, "precision": "32"})
    res = cross_validate(recipe, tmp_path / "cv", folds=2)
    assert res["n"] == 8 and res["n_defective"] == 4
    per = res["per_image"]
    train_ids = {it.id for it in read_manifest(ksdd_root) if it.split == "train"}
    assert len(set(per["id"])) == 8 and set(per["id"]) <= train_ids  # each train image once, no val image
    assert sorted(per["fold"]) == [1] * 4 + [2] * 4
    for k in (1, 2):  # stratified: each fold holds 2 defective images
        assert sum(d for d, f in zip(per["defective"], per["fold"]) if f == k) == 2
        fold_test = (tmp_path / "cv" / f"fold{k}" / "split" / "test.txt").read_text()
        assert (tmp_path / "cv" / f"fold{k}" / "config.yaml").is_file()
        assert all((i in fold_test) == (f == k) for i, f in zip(per["id"], per["fold"]))
    assert [(r["tta"], r["image_score"]) for r in res["rows"]] == [
        (t, m) for t in (False, True) for m in ("max", "blur_max", "top_mean")]
    assert all(0.0 <= r["image_ap"] <= 1.0 for r in res["rows"])
    assert json.loads((tmp_path / "cv" / "crossval.json").read_text())["rows"] == res["rows"]
    assert "oof_image_level_curves.png" in (tmp_path / "cv" / "report.html").read_text()
    assert (tmp_path / "cv" / "plots" / "oof_image_level_curves.png").is_file()
    with pytest.raises(ValueError, match="at least 5 defective"):
        cross_validate(recipe, tmp_path / "cv5", folds=5)


def test_cv_folds_keep_blocks_of_consecutive_images_together():
    from defectscope.engine.segmentation import cv_folds

    labels = np.zeros(80, bool)
    labels[[3, 12, 21, 30, 45, 50, 66, 77]] = True  # one defective image in 8 of the 10 blocks of 8
    plain = cv_folds(labels, 4, seed=0)
    assert sorted(np.bincount(plain[labels])) == [2, 2, 2, 2]  # stratified image by image
    grouped = cv_folds(labels, 4, group_size=8, seed=0)
    blocks = grouped.reshape(10, 8)
    assert (blocks == blocks[:, :1]).all()  # a block of 8 consecutive images never spans two folds
    assert set(grouped) == {0, 1, 2, 3} and all(labels[grouped == k].any() for k in range(4))
    assert not (blocks == plain.reshape(10, 8)[:, :1]).all()  # the plain split does cut blocks
