"""Recipe sizing rules of engine/autorecipe.py: batches, steps, image size, balance, folds, schema validity."""

from __future__ import annotations

import math

import pytest

from defectscope.config import validate
from defectscope.engine.autorecipe import (
    IMBALANCE_RATIO,
    MIN_STEPS,
    batch_size_for,
    drop_last,
    explain,
    size_recipe,
    strip_new_keys,
)
from defectscope.engine.tasks import get_task

SIX = {c: 8 for c in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")}


def _steps(r: dict, n_train: int) -> int:
    b = r["train"]["batch_size"]
    per_epoch = n_train // b if drop_last(n_train, b) else math.ceil(n_train / b)
    return r["train"]["epochs"] * per_epoch


@pytest.mark.parametrize("n, expected", [(28, 14), (38, 13), (32, 16), (16, 16), (17, 9), (5, 5), (1, 1), (1000, 16)])
def test_equal_batches_of_at_most_16(n, expected):
    assert batch_size_for(n) == expected


def test_no_batch_dropped_when_scarce():
    assert not drop_last(28, batch_size_for(28))  # issue 15: 28 images, batch 16 dropped 12 of them
    assert not drop_last(38, 13) and not drop_last(300, 16)
    assert drop_last(1441, 16)  # 1 of 1441 images: negligible


def test_forty_image_folder_gets_enough_steps_and_kfold():
    """The issue's case: 4 classes x 10 images, 227 px grey PNG."""
    counts = {c: 10 for c in "abcd"}
    r = size_recipe("classification", 40, counts, (227, 227), root="X")
    assert r["eval"]["folds"] == 5  # a 20 % split would hold 2 images per class
    n_train = 32
    assert r["train"]["val_fraction"] == 0.0 and r["train"]["early_stopping_patience"] == 0
    assert n_train % r["train"]["batch_size"] == 0 or not drop_last(n_train, r["train"]["batch_size"])
    assert _steps(r, n_train) >= MIN_STEPS  # was 4 steps (4 epochs x 1 batch)
    assert r["data"]["image_size"] == 224 and r["train"]["class_balance"] is False
    text = explain("classification", 40, counts, (227, 227))
    assert "5-fold cross-validation" in text and "--folds 1" in text and "optimizer steps" in text


def test_large_set_single_split_with_validation():
    counts = {c: 300 for c in SIX}
    r = size_recipe("classification", 1800, counts, (200, 200), root="X")
    assert r["eval"]["folds"] == 1 and r["train"]["val_fraction"] > 0 and r["train"]["early_stopping_patience"] > 0
    assert r["train"]["batch_size"] == 16 and r["data"]["image_size"] == 200
    assert r["train"]["epochs"] >= 5  # at least 5 passes over a large set


def test_schedule_is_fixed_and_the_time_estimate_comes_from_this_machine():
    """Issue 23: no wall-clock cut in the sized recipe; the estimate is measured, not a constant."""
    counts = {c: 300 for c in SIX}
    r = size_recipe("classification", 1800, counts, (200, 200))
    assert "max_minutes" not in r["train"]
    fast = explain("classification", 1800, counts, (200, 200), seconds_per_image=lambda hw: 0.01)
    slow = explain("classification", 1800, counts, (200, 200), seconds_per_image=lambda hw: 0.10)
    # the same schedule on a 10x slower machine, with a 10x longer estimate
    assert size_recipe("classification", 1800, counts, (200, 200)) == r
    n_passes = r["train"]["epochs"] * int(1800 * 0.8 * 0.9)
    assert f"estimated training time {n_passes * 0.01 / 60:.1f} min" in fast
    assert f"estimated training time {n_passes * 0.10 / 60:.1f} min" in slow
    for task, n, c, hw in (("segmentation", 399, {"good": 347, "defective": 52}, (1257, 500)),
                           ("anomaly", 400, {"good": 300, "crack": 20}, (900, 900)),
                           ("detection", 300, {"a": 150, "b": 150}, (200, 200))):
        assert "max_minutes" not in size_recipe(task, n, c, hw).get("train", {})  # anomaly: no train section


def test_measured_seconds_per_image_grows_with_the_image():
    from defectscope.engine.autorecipe import measure_seconds_per_image

    small, big = measure_seconds_per_image((64, 64)), measure_seconds_per_image((160, 160))
    assert 0 < small < big < 5.0


def test_image_size_follows_the_data():
    c = {"a": 50, "b": 50}
    assert size_recipe("classification", 100, c, (64, 80))["data"]["image_size"] == 64
    assert size_recipe("classification", 100, c, (128, 300))["data"]["image_size"] == 128
    assert size_recipe("classification", 100, c, (1024, 1024))["data"]["image_size"] == 224
    assert size_recipe("classification", 100, c, (32, 32))["data"]["image_size"] == 64
    seg = size_recipe("segmentation", 399, {"good": 347, "defective": 52}, (1257, 500))["data"]
    assert (seg["height"], seg["width"]) == (384, 160)  # KolektorSDD: the tuned size
    ano = size_recipe("anomaly", 400, {"good": 300, "crack": 20}, (900, 900))["data"]["image_size"]
    assert ano[0] == ano[1] and ano[0] % 32 == 0 and ano[0] * ano[1] <= 384 * 192


def test_class_balance_switch_at_ratio_3():
    balanced = size_recipe("classification", 130, {"a": 90, "b": 30, "c": 30}, (200, 200))
    skewed = size_recipe("classification", 131, {"a": 91, "b": 30, "c": 30}, (200, 200))
    assert 90 / 30 <= IMBALANCE_RATIO < 91 / 30
    assert balanced["train"]["class_balance"] is False and skewed["train"]["class_balance"] is True


def test_folds_rule_and_empty_classes():
    # 50 images per class: a 20 % split holds 10 -> single split
    assert size_recipe("classification", 100, {"a": 50, "b": 50}, None)["eval"]["folds"] == 1
    assert size_recipe("classification", 98, {"a": 49, "b": 49}, None)["eval"]["folds"] == 5
    # the smallest class limits k; an empty class is ignored
    r = size_recipe("classification", 63, {"a": 60, "b": 3, "empty": 0}, None)
    assert r["eval"]["folds"] == 3
    assert "empty classes ['empty'] are ignored" in explain("classification", 63, {"a": 60, "b": 3, "empty": 0}, None)
    assert size_recipe("classification", 61, {"a": 60, "b": 1}, None)["eval"]["folds"] == 1
    assert size_recipe("anomaly", 80, {"good": 60, "defect": 20}, None)["eval"]["folds"] == 1


@pytest.mark.parametrize("task, n, counts, hw", [
    ("classification", 48, SIX, (200, 200)),
    ("classification", 1800, {c: 300 for c in SIX}, (200, 200)),
    ("segmentation", 399, {"good": 347, "defective": 52}, (1257, 500)),
    ("anomaly", 80, {"good": 60, "defect": 20}, (1257, 500)),
    ("detection", 1800, {c: 300 for c in SIX}, (200, 200)),
    ("weld", 120, {"baseline": 60, "gap": 60}, (256, 256)),
])
def test_recipes_validate_against_the_task_schemas(task, n, counts, hw):
    r = size_recipe(task, n, counts, hw, root="some/folder", layout=None)
    cfg = validate(strip_new_keys(r), get_task(task).recipe, "autorecipe")
    assert cfg.task == task
    if task == "anomaly":  # PatchCore: no network training, no clustering study on data the user did not give
        assert "train" not in r and "clustering" not in r and cfg.model.name == "patchcore"
        assert cfg.clustering.enabled is False and cfg.clustering.root is None
        return
    assert cfg.train.batch_size == r["train"]["batch_size"] and cfg.train.epochs == r["train"]["epochs"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        size_recipe("regression", 10, None, None)
    with pytest.raises(ValueError, match="n_images"):
        size_recipe("classification", 0, None, None)


def test_a_single_split_lists_the_candidates_and_a_validation_part_big_enough_to_compare_them():
    """50 images per class: a 20 % test split holds 10 per class (one split), but 10 % of the other 40 would
    hold 4, too few to compare candidates on: the share is raised to 12.5 % (5 per class)."""
    r = size_recipe("classification", 100, {"a": 50, "b": 50}, (200, 200), root="X")
    assert r["eval"]["folds"] == 1 and r["eval"]["candidates"] == ["model", "linear_probe", "finetune_small", "linear_probe_lite2"]
    assert r["train"]["val_fraction"] == 0.125 and r["train"]["early_stopping_patience"] > 0
    big = size_recipe("classification", 1800, {c: 300 for c in SIX}, (200, 200), root="X")
    assert big["train"]["val_fraction"] == 0.1 and big["eval"]["candidates"] == ["model", "linear_probe", "finetune_small", "linear_probe_lite2"]
    cv = size_recipe("classification", 40, {c: 10 for c in "abcd"}, (200, 200), root="X")
    assert cv["train"]["val_fraction"] == 0.0 and cv["eval"]["folds"] == 5  # cross-validation: unchanged
