"""Image readers: conversions, clear errors, layouts, splits."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectscope.data.images import (
    DatasetError,
    ImageReadError,
    class_from_prefix,
    discover_labelled_images,
    load_image,
)
from defectscope.data.splits import stratified_split


def test_real_neu_image_is_rgb_uint8(neu_root):
    img = load_image(neu_root / "images" / "crazing_1.jpg")
    assert img.shape == (200, 200, 3) and img.dtype == np.uint8
    # grey content stored as RGB: channels equal up to JPEG noise
    assert np.abs(img[..., 0].astype(int) - img[..., 1]).mean() < 2


def test_grey_png_becomes_three_equal_channels(tmp_path):
    arr = (np.arange(64 * 48) % 256).astype(np.uint8).reshape(48, 64)
    Image.fromarray(arr, "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.shape == (48, 64, 3)
    assert (img[..., 0] == arr).all() and (img[..., 2] == arr).all()


def test_rgba_converted_with_warning(tmp_path):
    arr = np.zeros((10, 12, 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 128
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="alpha channel dropped"):
        img = load_image(tmp_path / "a.png")
    assert img.shape == (10, 12, 3) and img[0, 0, 0] == 200


def test_16bit_rescaled_with_warning(tmp_path):
    arr = np.linspace(1000, 5000, 20 * 20).reshape(20, 20).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    with pytest.warns(UserWarning, match="rescaled to 8 bits"):
        img = load_image(tmp_path / "d.png")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    assert img[0, 0, 0] < img[-1, -1, 0]


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 20])
def test_corrupt_file_is_named(tmp_path, content):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_image(bad)


def test_truncated_real_jpeg_is_named(tmp_path, neu_root):
    data = (neu_root / "images" / "patches_3.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="cut.jpg"):
        load_image(tmp_path / "cut.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        load_image(tmp_path / "nope.png")


def test_class_from_prefix_keeps_inner_underscores(tmp_path):
    assert class_from_prefix(tmp_path / "rolled-in_scale_12.jpg") == "rolled-in_scale"
    assert class_from_prefix(tmp_path / "pitted_surface_3.jpg") == "pitted_surface"
    with pytest.raises(DatasetError, match="prefix"):
        class_from_prefix(tmp_path / "noclass.jpg")


def test_discover_full_neu(neu_root):
    items, names, layout = discover_labelled_images(neu_root)
    assert layout == "prefix"
    assert names == ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    assert len(items) == 1800
    assert np.bincount([it.label for it in items]).tolist() == [300] * 6


def test_discover_folder_layout(neu_small_folders):
    items, names, layout = discover_labelled_images(neu_small_folders)
    assert layout == "folder" and names == ["crazing", "patches", "scratches"] and len(items) == 12


def test_unknown_class_against_model_classes(neu_small_folders):
    with pytest.raises(DatasetError, match="not among the model's classes"):
        discover_labelled_images(neu_small_folders, class_names=["crazing", "patches"])


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="no image files"):
        discover_labelled_images(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        discover_labelled_images(tmp_path / "missing")


def test_stratified_split_is_reproducible_and_stratified():
    labels = np.repeat(np.arange(6), 300)
    a1, b1 = stratified_split(labels, 0.2, seed=0)
    a2, b2 = stratified_split(labels, 0.2, seed=0)
    _, b3 = stratified_split(labels, 0.2, seed=1)
    assert (b1 == b2).all() and not np.array_equal(b1, b3)
    assert len(b1) == 360 and np.bincount(labels[b1]).tolist() == [60] * 6
    assert set(a1).isdisjoint(b1) and len(a1) + len(b1) == 1800


def test_small_split_keeps_every_class_on_both_sides():
    labels = np.repeat(np.arange(6), 4)  # 24 items: 20 % would be 5 < 6 classes
    a, b = stratified_split(labels, 0.2, seed=0)
    assert sorted(set(labels[b])) == list(range(6)) and sorted(set(labels[a])) == list(range(6))
    with pytest.raises(ValueError, match="too few"):
        stratified_split(np.repeat(np.arange(6), 2), 0.6, seed=0)  # 8 held out leaves 4 < 6 classes


def test_iter_images_yields_each_file_in_order_with_the_reason_for_bad_ones(tmp_path):
    from defectscope.data.images import iter_images

    good = tmp_path / "good.png"
    Image.fromarray(np.full((4, 6), 200, np.uint8)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = list(iter_images([bad, good]))
    assert [f for f, _, _ in out] == [bad, good]
    assert out[0][1] is None and "bad.jpg" in out[0][2]
    assert out[1][2] is None and out[1][1].shape == (4, 6, 3) and out[1][1].dtype == np.uint8
