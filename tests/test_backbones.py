"""Backbone registry, weights loading and the EfficientNet-Lite ImageNet mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.models import create_backbone, list_backbones
from defectscope.models.weights import (
    WeightsUnavailableError,
    efficientnet_lite_weights_path,
    map_efficientnet_lite_state_dict,
)

REQUIRED = {"mobilenetv2_100", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18",
            "resnet50", "vgg16", "googlenet", "inception_v3", "vit_base_patch16", "vit_tiny_patch16"}


def test_registry_has_the_required_backbones():
    assert REQUIRED <= set(list_backbones())


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100", "googlenet", "vit_tiny_patch16", "efficientnet_lite0"])
def test_uniform_feature_map_interface(name):
    bb = create_backbone(name).eval()
    with torch.no_grad():
        f = bb(torch.rand(2, 3, 200, 200))
    assert f.ndim == 4 and f.shape[:2] == (2, bb.out_channels)
    assert f.shape[-1] in (200 // bb.reduction, -(-200 // bb.reduction))


def test_wrong_input_shape_is_explained():
    bb = create_backbone("resnet18")
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        bb(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        bb(torch.rand(1, 3, 8, 8))


def test_pretrained_without_weights_here_is_an_error():
    with pytest.raises(WeightsUnavailableError, match="no ImageNet weights for 'resnet18'"):
        create_backbone("resnet18", pretrained=True)


def test_unknown_backbone():
    with pytest.raises(KeyError, match="unknown backbone"):
        create_backbone("resnet9000")


def test_local_weights_file_round_trip(tmp_path):
    a = create_backbone("resnet18")
    torch.save({"state_dict": a.body.state_dict()}, tmp_path / "w.pth")
    b = create_backbone("resnet18", weights=tmp_path / "w.pth")
    assert b.weights_source.startswith("local file")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        create_backbone("resnet18", weights=tmp_path / "bad.pth")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_mapping_uses_every_tensor_once(name):
    import timm

    src = torch.load(efficientnet_lite_weights_path(name), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_" + name)
    mapped = map_efficientnet_lite_state_dict(src, model)
    assert len(mapped) == len(src) == len(model.state_dict())
    # values are carried over unchanged, e.g. the stem and the classifier
    assert torch.equal(mapped["conv_stem.weight"], src["_conv_stem.weight"])
    assert torch.equal(mapped["classifier.bias"], src["_fc.bias"])
    model.load_state_dict(mapped, strict=True)


def test_pretrained_lite0_gives_a_confident_imagenet_classifier():
    """With the real weights, timm's classifier head reproduces non-trivial ImageNet behaviour:
    different inputs give different, peaked class distributions; random init gives near-uniform ones."""
    import timm

    from defectscope.models.weights import load_efficientnet_lite_imagenet

    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_efficientnet_lite_imagenet("efficientnet_lite0", model)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 224, 224, generator=g) * 2 - 1
    with torch.no_grad():
        p = model(x).softmax(-1)
    # BN statistics were loaded: activations are finite and the outputs are far from uniform
    assert torch.isfinite(p).all() and p.max(-1).values.min() > 5 / 1000


def test_pretrained_features_beat_random_on_a_neu_linear_probe(neu_root):
    """Pooled EfficientNet-Lite0 features + logistic regression, 5-fold CV on 90 real NEU images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from defectscope.data.images import discover_labelled_images, load_stack

    items, _, _ = discover_labelled_images(neu_root)
    rng = np.random.default_rng(0)
    labels = np.array([it.label for it in items])
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), 15, replace=False) for c in range(6)])
    x = torch.from_numpy(load_stack([items[i].path for i in pick], 128)).float() / 255
    y = labels[pick]
    scores = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        bb = create_backbone("efficientnet_lite0", pretrained=pretrained).eval()
        with torch.no_grad():
            feats = bb(x).mean(dim=(2, 3)).numpy()
        # standardised features: the solver converges in about 1 s (23 s on raw random-init features)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        scores[pretrained] = cross_val_score(clf, feats, y, cv=5).mean()
    assert scores[True] > 0.85, scores
    assert scores[True] > scores[False] + 0.1, scores
