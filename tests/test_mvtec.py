"""MVTec AD layout reader, its protocol and the KolektorSDD-built fixture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from defectscope.data.images import DatasetError
from defectscope.data.kolektor import load_mask as ksdd_load_mask
from defectscope.data.masks import MaskedImage, load_mask
from defectscope.data.mvtec import (
    MVTecItem,
    has_pixel_masks,
    load_item_mask,
    mvtec_from_kolektor,
    mvtec_protocol,
    read_mvtec,
)


@pytest.fixture()
def mvtec_root(ksdd_root, tmp_path):
    return mvtec_from_kolektor(ksdd_root, tmp_path / "mv", n_train_good=6, n_test_good=3, n_defect=4)


def test_fixture_layout(mvtec_root, ksdd_root):
    assert len(list((mvtec_root / "train" / "good").iterdir())) == 6
    assert len(list((mvtec_root / "test" / "good").iterdir())) == 3
    defects = sorted(p.name for p in (mvtec_root / "test" / "defect").iterdir())
    masks = sorted(p.name for p in (mvtec_root / "ground_truth" / "defect").iterdir())
    assert len(defects) == 4 and masks == [d.replace(".jpg", "_mask.png") for d in defects]
    # the masks are KolektorSDD's own, non-empty
    for d in defects:
        assert load_mask(mvtec_root / "ground_truth" / "defect" / d.replace(".jpg", "_mask.png")).any()


def test_read_mvtec_items_are_masked_images(mvtec_root):
    items = read_mvtec(mvtec_root)
    assert all(isinstance(it, MaskedImage) and isinstance(it, MVTecItem) for it in items)
    train = [it for it in items if it.split == "train"]
    test = [it for it in items if it.split == "test"]
    assert len(train) == 6 and not any(it.defective for it in train)
    assert [it.defect_type for it in test] == ["good"] * 3 + ["defect"] * 4
    assert all(it.mask is None for it in items if not it.defective)
    assert all(it.mask.name == f"{it.image.stem}_mask.png" for it in test if it.defective)
    assert len({it.id for it in items}) == len(items)  # unique ids although MVTec reuses names
    assert has_pixel_masks(items)


def test_protocol_never_fits_on_defects(mvtec_root):
    items = read_mvtec(mvtec_root)
    parts = mvtec_protocol(items, calibration_fraction=0.34, seed=1)
    assert len(parts["fit"]) == 4 and len(parts["calibration"]) == 2 and len(parts["test"]) == 7
    assert not any(it.defective for it in parts["fit"] + parts["calibration"])
    assert {it.id for it in parts["fit"]}.isdisjoint({it.id for it in parts["calibration"]})
    again = mvtec_protocol(items, calibration_fraction=0.34, seed=1)
    assert [it.id for it in again["fit"]] == [it.id for it in parts["fit"]]


def test_load_item_mask(mvtec_root):
    items = read_mvtec(mvtec_root)
    good = next(it for it in items if it.split == "test" and not it.defective)
    bad = next(it for it in items if it.defective)
    m = load_item_mask(good, (384, 160))
    assert m.shape == (384, 160) and m.dtype == bool and not m.any()
    mb = load_item_mask(bad, (384, 160))
    assert np.array_equal(mb, ksdd_load_mask(bad.mask, (384, 160)))
    full = load_item_mask(bad, tuple(load_mask(bad.mask).shape))
    assert full.any() and np.array_equal(full, load_mask(bad.mask).astype(bool))


def test_missing_mask_is_named(mvtec_root):
    victim = sorted((mvtec_root / "ground_truth" / "defect").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetError, match=rf"{victim.name}.* not found"):
        read_mvtec(mvtec_root)


def test_without_ground_truth_image_metrics_only(mvtec_root):
    shutil.rmtree(mvtec_root / "ground_truth")
    items = read_mvtec(mvtec_root)
    assert not has_pixel_masks(items) and sum(it.defective for it in items) == 4
    with pytest.raises(DatasetError, match="ground_truth/defect/ missing"):
        read_mvtec(mvtec_root, require_masks=True)


def test_layout_errors(tmp_path, ksdd_root):
    with pytest.raises(DatasetError, match="train/good/ not found"):
        read_mvtec(tmp_path)
    with pytest.raises(DatasetError, match="not empty"):
        out = tmp_path / "x"
        out.mkdir()
        (out / "f").write_text("x")
        mvtec_from_kolektor(ksdd_root, out)
    with pytest.raises(DatasetError, match="asked for"):
        mvtec_from_kolektor(ksdd_root, tmp_path / "y", n_defect=500)
