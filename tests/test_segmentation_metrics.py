"""Dice / IoU against hand-computed values, image-level AP/AUROC, KolektorSDD mask reading, U-Net weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.data.masks import load_mask, load_masked_stack, read_manifest, resize_mask
from defectscope.evaluation.segmentation import dice_per_image, image_scores, iou_per_image, segmentation_metrics


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


def test_image_score_methods_hand_computed():
    """A lone hot pixel and a hot 5 x 5 region tie on ``max``; ``blur_max`` and ``top_mean`` rank the region first."""
    probs = np.zeros((2, 1, 20, 20), np.float32)
    probs[0, 0, 10, 10] = 0.9  # one pixel
    probs[1, 0, 8:13, 8:13] = 0.8  # a region
    np.testing.assert_allclose(image_scores(probs, "max"), [0.9, 0.8])
    blur = image_scores(probs, "blur_max", sigma=2.0)
    # a unit impulse blurred with a 2-D Gaussian of sigma 2 peaks at about 1 / (2 pi sigma^2) = 0.0398
    assert blur[0] == pytest.approx(0.9 / (2 * np.pi * 4), rel=0.05)
    assert blur[1] > 0.4 > blur[0]
    # top 1 % of 400 pixels = 4 pixels: (0.9 + 0 + 0 + 0) / 4 and 0.8
    np.testing.assert_allclose(image_scores(probs, "top_mean", top_fraction=0.01), [0.225, 0.8])
    # two classes: the score is the maximum over classes
    two = np.concatenate([probs, probs[::-1]], axis=1)
    np.testing.assert_allclose(image_scores(two, "top_mean", top_fraction=0.01), [0.8, 0.8])
    assert segmentation_metrics(probs, np.zeros_like(probs, np.uint8), score_method="blur_max")["image_score"] == "blur_max"
    with pytest.raises(ValueError, match="one of"):
        image_scores(probs, "mean")
    with pytest.raises(ValueError, match=r"\[N, K, H, W\]"):
        image_scores(probs[0], "max")


def test_flip_tta_averages_the_flipped_predictions():
    """TTA = mean over identity, h-flip, v-flip and both, each flipped back; a per-pixel model is unchanged by it."""
    from defectscope.models.unet.inference import UNetInference, predict_unet

    def predict_mask_probs(model, x, batch_size=8, tta=False):
        return predict_unet(UNetInference(model, tta, "max", tuple(x.shape[2:])), x, batch_size)[0]

    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 16, 8), dtype=torch.uint8)
    conv = torch.nn.Conv2d(3, 1, 3, padding=1)  # not flip-equivariant: TTA changes its output
    plain = predict_mask_probs(conv, x)
    tta = predict_mask_probs(conv, x, batch_size=2, tta=True)
    xf = x.float() / 255
    with torch.no_grad():
        expected = sum(torch.sigmoid(conv(xf.flip(d))).flip(d) for d in ((-1,), (-2,), (-2, -1))) + torch.sigmoid(conv(xf))
    np.testing.assert_allclose(tta, (expected / 4).numpy(), atol=1e-6)
    assert np.abs(tta - plain).max() > 1e-3
    pointwise = torch.nn.Conv2d(3, 1, 1)
    np.testing.assert_allclose(predict_mask_probs(pointwise, x, tta=True), predict_mask_probs(pointwise, x), atol=1e-6)


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
