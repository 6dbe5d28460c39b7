"""Dice / IoU against hand-computed values, image-level AP/AUROC, KolektorSDD mask reading, U-Net weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.data.masks import load_mask, load_masked_stack, read_manifest, resize_mask
from defectscope.evaluation.segmentation import dice_per_image, iou_per_image, segmentation_metrics


def _m(*rows):
    return np.array(rows, dtype=np.uint8)


def test_dice_iou_hand_computed():
    true = np.zeros((4, 1, 3, 4), np.uint8)
    pred = np.zeros_like(true)
    # image 0: true 4 px, pred 2 px inside it -> Dice 2*2/(4+2) = 2/3, IoU 2/4
    true[0, 0, :2, :2] = 1
    pred[0, 0, 0, :2] = 1
    # image 1: both empty -> Dice 1, IoU 1 (Kaggle convention)
    # image 2: empty prediction on a defect -> 0
    true[2, 0, 1, 1] = 1
    # image 3: 3 px predicted on a good image -> 0
    pred[3, 0, 2, 1:] = 1
    np.testing.assert_allclose(dice_per_image(pred, true)[:, 0], [2 / 3, 1, 0, 0])
    np.testing.assert_allclose(iou_per_image(pred, true)[:, 0], [0.5, 1, 0, 0])
    probs = pred.astype(np.float32) * 0.9 + 0.05
    probs[0, 0, 1, 1] = 0.4  # below threshold, still the max of image 0 is 0.95
    m = segmentation_metrics(probs, true)
    assert m["dice"] == pytest.approx((2 / 3 + 1) / 4)
    assert m["iou"] == pytest.approx(1.5 / 4)
    assert m["dice_defective"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["n_defective"] == 2
    # scores: img0 0.95 (defective), img1 0.05, img2 0.05 (defective), img3 0.95 (good)
    # AUROC: pairs (pos, neg) = (0.95,0.05)=1, (0.95,0.95)=.5, (0.05,0.05)=.5, (0.05,0.95)=0 -> 0.5
    assert m["image_auroc"] == pytest.approx(0.5)


def test_image_level_perfect_and_pixel_auroc():
    rng = np.random.default_rng(0)
    true = np.zeros((6, 1, 8, 8), np.uint8)
    true[:3, 0, 2:5, 3:6] = 1
    probs = rng.uniform(0, 0.3, true.shape).astype(np.float32)
    probs[true == 1] = rng.uniform(0.7, 1.0, int(true.sum()))
    m = segmentation_metrics(probs, true)
    assert m["image_ap"] == 1.0 and m["image_auroc"] == 1.0 and m["pixel_auroc"] == 1.0
    assert m["dice"] == 1.0 and m["dice_defective"] == 1.0
    probs[true == 1] = 0.8
    probs[0, 0, 3, 4] = 1.0
    probs[4, 0, 0, 0] = 0.99  # one confident false pixel on a good image
    m = segmentation_metrics(probs, true)
    # scores: defective 1.0, 0.8, 0.8; good 0.99 and two below 0.3 -> 7 of 9 pairs ranked right
    assert m["image_auroc"] == pytest.approx(7 / 9)
    # ranking 1.0 (P), 0.99 (N), 0.8 (P, P tied): AP = 1/3 * 1 + 2/3 * 3/4
    assert m["image_ap"] == pytest.approx(1 / 3 + 2 / 3 * 0.75)
    assert m["dice"] < 1.0 and m["dice_defective"] == 1.0


def test_metric_shape_mismatch():
    with pytest.raises(ValueError, match=r"\[N, K, H, W\]"):
        dice_per_image(np.zeros((1, 1, 2, 2)), np.zeros((1, 2, 2)))


def test_resize_mask_area_rule():
    m = _m([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(resize_mask(m, (2, 2)), _m([1, 0], [0, 1]))


def test_kolektorsdd_manifest_and_masks(ksdd_root):
    items = read_manifest(ksdd_root)
    assert len(items) == 399
    assert sum(it.defective for it in items) == 52
    assert sum(it.split == "train" for it in items) == 320
    it = next(i for i in items if i.id == "005")
    mask = load_mask(it.mask)
    assert it.defective and mask.sum() == 2566  # manifest mask_pixels
    x, y = load_masked_stack([it, items[0]], (256, 96))
    assert x.shape == (2, 3, 256, 96) and x.dtype == np.uint8
    assert y[0].sum() > 0 and y[1].sum() == 0


def test_manifest_errors_name_file_and_row(tmp_path):
    from defectscope.data.images import DatasetError

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "manifest.csv").write_text("id,split,defective\n001,train,yes\n")
    with pytest.raises(DatasetError, match="manifest.csv, row 1: field 'defective'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("id,split,defective\n001,train,1\n")
    with pytest.raises(DatasetError, match="row 1: no image file images/001"):
        read_manifest(tmp_path)


def test_unet_size_rule_names_working_sizes():
    from defectscope.models import create_model

    model = create_model("unet", encoder="resnet18", decoder_channels=[16, 16, 8, 8, 8]).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 32)).shape == (1, 1, 64, 32)
        with pytest.raises(ValueError, match="height 100 -> 96 or 128"):
            model(torch.rand(1, 3, 100, 32))


def test_efficientnet_lite0_unet_loads_imagenet_weights():
    from defectscope.models import create_model
    from defectscope.models.weights import efficientnet_lite_weights_path

    src = torch.load(efficientnet_lite_weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = create_model("unet", encoder="efficientnet_lite0", pretrained=True)
    assert "288 tensors" in model.weights_source
    timm_features = model.net.encoder.model
    torch.testing.assert_close(timm_features.conv_stem.weight, src["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(timm_features.blocks[6][0].conv_pwl.weight, src["_blocks.15._project_conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(timm_features.blocks[1][0].bn1.running_var, src["_blocks.1._bn0.running_var"], rtol=0, atol=0)
    random = create_model("unet", encoder="efficientnet_lite0", pretrained=False)
    assert random.weights_source == "random init"
    assert not torch.equal(random.net.encoder.model.conv_stem.weight, src["_conv_stem.weight"])


def test_resnet18_has_no_weights_here():
    from defectscope.models import create_model
    from defectscope.models.weights import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="pretrained=false"):
        create_model("unet", encoder="resnet18", pretrained=True)
